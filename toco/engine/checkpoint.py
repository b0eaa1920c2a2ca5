"""Atomic checkpoints: a killed run never leaves a half-written file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_checkpoint(path: str | Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def check_compatible(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """Fail with a readable message when a checkpoint was trained with another backbone or class count."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint {path} does not fit this model:"]
    if mismatched:
        k, theirs, ours = mismatched[0]
        hint = ""
        if k.startswith(("classifier", "decoder.classifier")):
            hint = " (a different number of classes: check data.num_classes)"
        elif k.startswith("encoder"):
            hint = " (a different backbone: check model.backbone / model.backbone_kwargs)"
        lines.append(f"  {len(mismatched)} tensors differ in shape, e.g. {k}: checkpoint {theirs} vs model {ours}{hint}")
    if missing or unexpected:
        lines.append(f"  {len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                     f"(e.g. {unexpected[:2]}): a different backbone?")
    raise ValueError("\n".join(lines))


def export_encoder(checkpoint: str | Path, out: str | Path) -> int:
    """Write the encoder of a training checkpoint as a plain state dict, loadable as another run's
    `model.pretrained_file` (timm reads it with weights_only). Returns the number of tensors written."""
    state = load_checkpoint(checkpoint)
    model = state.get("model") if isinstance(state, dict) else None  # a bare tensor or list is no checkpoint either
    if not isinstance(model, dict):
        raise ValueError(f"checkpoint {checkpoint} has no 'model' entry: not a toco training checkpoint")
    encoder = {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")}
    if not encoder:
        raise ValueError(f"checkpoint {checkpoint} has no encoder.* tensors")
    save_checkpoint(out, encoder)
    return len(encoder)
