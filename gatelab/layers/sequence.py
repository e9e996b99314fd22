"""Bringing torch's input forms to one: time-major padded data plus optional lengths, and back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence


@dataclass
class SequenceBatch:
    """A batch in the form the engines run on.

    ``data`` is ``(T, B, F)``; ``lengths`` is ``(B,)`` int64 on ``data``'s device, or ``None`` when
    every sequence runs all ``T`` steps. ``packed`` keeps the caller's ``PackedSequence`` so the
    output can be packed the same way.
    """

    data: Tensor
    lengths: Tensor | None
    packed: PackedSequence | None
    batched: bool
    batch_first: bool

    @property
    def batch_size(self) -> int:
        return self.data.shape[1]

    def restore(self, out: Tensor) -> Tensor | PackedSequence:
        """Return ``out (T, B, F)`` in the caller's form (packed, batch-first, unbatched)."""
        if self.packed is not None:
            p = self.packed
            order = p.sorted_indices if p.sorted_indices is not None else torch.arange(out.shape[1], device=out.device)
            out = out[:, order]
            data = torch.cat([out[t, :n] for t, n in enumerate(p.batch_sizes.tolist())])
            return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        if not self.batched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out


def to_sequence_batch(
    input: Tensor | PackedSequence, input_size: int, batch_first: bool, lengths: Tensor | None, owner: str
) -> SequenceBatch:
    """Validate ``input`` and bring it to a :class:`SequenceBatch`."""
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError(f"{owner}: lengths are given by the PackedSequence; do not pass lengths too")
        data, lens = pad_packed_sequence(input)  # (T, B, F), original batch order
        _check_features(data, input_size, owner)
        return SequenceBatch(data, lens.to(data.device), input, True, batch_first)
    if not isinstance(input, Tensor):
        raise TypeError(f"{owner}: input must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        layout = "(batch, seq, features)" if batch_first else "(seq, batch, features)"
        raise ValueError(
            f"{owner}: expected input of shape {layout} or unbatched (seq, features), got {tuple(input.shape)}"
        )
    _check_features(input, input_size, owner)
    if input.shape[0 if input.dim() == 2 or not batch_first else 1] == 0:
        raise ValueError(f"{owner}: expected at least one time step, got an input of shape {tuple(input.shape)} "
                         f"(torch's RNNs refuse empty sequences too)")
    if not input.is_floating_point():
        raise TypeError(f"{owner}: input must be a floating-point tensor, got {input.dtype}")
    batched = input.dim() == 3
    data = input if not batched else (input.transpose(0, 1) if batch_first else input)
    if not batched:
        data = data.unsqueeze(1)
    if lengths is not None:
        lengths = check_lengths(lengths, data.shape[0], data.shape[1], owner).to(data.device)
    return SequenceBatch(data, lengths, None, batched, batch_first)


def check_lengths(lengths: Tensor | list[int], T: int, B: int, owner: str) -> Tensor:
    if not isinstance(lengths, (Tensor, list, tuple)):
        raise TypeError(f"{owner}: lengths must be a tensor or list of {B} integers, got {type(lengths).__name__}")
    try:
        lengths = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{owner}: lengths must be {B} integers, got {lengths!r}") from None
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"{owner}: expected lengths as {B} integers (one per sequence), got {lengths.dtype} values")
    if lengths.dim() != 1 or lengths.shape[0] != B or lengths.is_floating_point():
        raise ValueError(f"{owner}: expected lengths as {B} integers (one per sequence), got {tuple(lengths.shape)} "
                         f"{lengths.dtype}")
    # (traced, the values are unknown: a compiled or exported graph does not check them; there a length
    # below 1 leaves a sequence at its initial state and one above T runs all T steps)
    if B and not torch.compiler.is_compiling() and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"{owner}: every length must be in 1..{T} (the sequence length), got "
                         f"min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths.long()


def _check_features(x: Tensor, input_size: int, owner: str) -> None:
    if x.shape[-1] != input_size:
        raise ValueError(f"{owner}: expected {input_size} input features (input_size), got shape {tuple(x.shape)}")
