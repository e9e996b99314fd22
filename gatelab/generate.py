"""Sampling text from a character language model checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .models import SequenceModel

__all__ = ["sample", "generate_text"]


@torch.no_grad()
def sample(model: SequenceModel, prime: list[int], length: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> list[int]:
    """``length`` token ids drawn one at a time after reading ``prime`` (at least one id).

    Each id is drawn from softmax(logits / temperature); ``temperature = 0`` takes the most likely one.
    """
    if not prime:
        raise ValueError("sample needs at least one prime token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.eval()
    device = model.head.weight.device
    out, state = model(torch.tensor([prime], device=device))  # (1, T, V)
    ids: list[int] = []
    for _ in range(length):
        logits = out[0, -1].double()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=0)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        ids.append(nxt)
        out, state = model(torch.tensor([[nxt]], device=device), None, state)  # one step, carrying the state
    return ids


def generate_text(checkpoint: str | Path, length: int = 200, temperature: float = 1.0, prime: str = "",
                  seed: int = 0) -> str:
    """Text sampled from a ``charlm`` checkpoint: ``prime`` followed by ``length`` new characters."""
    from .train import load_model

    model, _, payload = load_model(checkpoint)
    vocab = payload["trainer"]["task"].get("vocab")
    if vocab is None:
        raise CheckpointError(f"{checkpoint}: not a language-model checkpoint (task "
                              f"{payload['trainer']['task']['name']!r}); generate needs a charlm run")
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(prime) - set(index))
    if unknown:
        raise ValueError(f"the prime text has characters the model never saw: {unknown}")
    start = prime or ("\n" if "\n" in index else vocab[0])
    ids = sample(model, [index[c] for c in start], length, temperature, torch.Generator().manual_seed(seed))
    return prime + "".join(vocab[i] for i in ids)
