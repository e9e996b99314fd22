"""Exporting a trained run: ``gatelab export RUN_DIR_OR_CHECKPOINT --onnx OUT | --safetensors OUT`` and
its Python twin :func:`export_run`; :func:`load_safetensors` reads a safetensors export back.

* safetensors: the model's weights under their state_dict names (the recurrent layers' are torch's,
  ``layers.0.weight_ih_l0`` ...), with the resolved config (TOML) and the task's shape in the file's
  metadata, and the config also written beside it (``OUT.toml``), so the weights load into a fresh
  model without gatelab's checkpoint format (and without pickle).
* ONNX: :func:`gatelab.onnx.export` of the model (ONNX's recurrent nodes, else a Scan over time), batch-first input
  ``x (B, T, features)`` (or token ids) and ``lengths (B,)``, both dimensions dynamic.

A run directory exports its ``best.pt`` when there is one, else ``last.pt``. Every file is written
atomically (:func:`gatelab.checkpoint.atomic_write`); the ONNX file holds its weights (no external
data file).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .checkpoint import CheckpointError, atomic_write
from .config import from_dict, to_toml
from .models import SequenceModel, build_model
from .tasks.base import MissingExtraError


def checkpoint_of(path: str | Path) -> Path:
    """The checkpoint a path names: a file as is; a run directory's ``best.pt``, else its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: a folder without best.pt or last.pt (not a run directory)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:
        raise MissingExtraError("--safetensors needs the safetensors package, gatelab's onnx extra: "
                                "pip install 'gatelab[onnx]'") from err
    return safetensors.torch


def _example(model: SequenceModel, shape: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-first example input (two sequences of 5 steps) and its lengths, for tracing."""
    if model.embedding is not None or shape["kind"] == "lm":
        x = torch.zeros(2, 5, dtype=torch.int64)
    else:
        x = torch.zeros(2, 5, shape["input_size"])
    return x, torch.tensor([5, 4])


def export_run(path: str | Path, *, onnx: str | Path | None = None, safetensors: str | Path | None = None) -> dict:
    """Export the run or checkpoint at ``path`` as ONNX and/or safetensors (see the module docstring);
    returns ``{"checkpoint": ..., "onnx": ..., "safetensors": ..., "config": ...}``, the paths written."""
    from .train import load_model

    if onnx is None and safetensors is None:
        raise ValueError("export_run: say what to write: onnx=PATH and/or safetensors=PATH")
    source = checkpoint_of(path)
    model, config, payload = load_model(source)
    shape = payload["trainer"]["task"]
    written: dict[str, Any] = {"checkpoint": str(source)}
    if safetensors is not None:
        st = _safetensors()
        out = Path(safetensors)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        metadata = {"gatelab_config": to_toml(config), "gatelab_task": json.dumps(shape),
                    "gatelab_step": str(payload.get("step"))}
        atomic_write(out, st.save(tensors, metadata=metadata))
        beside = out.with_suffix(".toml")
        atomic_write(beside, to_toml(config))
        written.update(safetensors=str(out), config=str(beside))
    if onnx is not None:
        from .onnx import export

        out = Path(onnx)
        x, lengths = _example(model, shape)
        program = export(model, (x, lengths), dynamic_shapes=({0: "B", 1: "T"}, {0: "B"}))
        atomic_write(out, program.model_proto.SerializeToString())  # one file: the weights inside
        written["onnx"] = str(out)
    return written


def load_safetensors(path: str | Path) -> SequenceModel:
    """The model of a safetensors export (eval mode), rebuilt from the config and task shape in its
    metadata; loading runs no code from the file."""
    st = _safetensors()
    path = Path(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "gatelab_config" not in meta or "gatelab_task" not in meta:
        raise CheckpointError(f"{path}: not a gatelab export (no gatelab_config / gatelab_task metadata)")
    config = from_dict(tomllib.loads(meta["gatelab_config"]))
    model = build_model(config.model, SimpleNamespace(**json.loads(meta["gatelab_task"])))
    model.load_state_dict(st.load_file(str(path)))
    return model.eval()


__all__ = ["checkpoint_of", "export_run", "load_safetensors"]
