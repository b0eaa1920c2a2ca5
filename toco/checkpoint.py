"""Checkpoints: atomic saves (a killed run never leaves a half-written file behind), weights-only loads, and a
readable error when a checkpoint does not fit the model a config describes."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch

from toco.errors import UserError
from toco.files import atomic_write


class CheckpointError(UserError):
    """A checkpoint that cannot be used with this config; the message says why."""


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """A checkpoint's contents; never unpickles code (`weights_only=True`). CheckpointError, in our words, for a
    missing, empty, damaged or foreign file. `mmap` reads tensors only when they are used (a shape check reads
    almost nothing); a file in torch's legacy format, which cannot be mapped, is read whole."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its save was cut off, or it is not a checkpoint")
    with open(path, "rb") as f:  # torch.save writes a zip archive; the legacy format is a bare pickle
        archive = f.read(4) == b"PK\x03\x04"
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and archive)
    except pickle.UnpicklingError:
        what = ("holds Python objects other than tensors and plain containers, and toco loads weights only (it never "
                "runs code from a file)") if archive else "is not a PyTorch checkpoint"
        raise CheckpointError(f"checkpoint {path} {what}") from None
    except (RuntimeError, EOFError, ValueError):
        what = "is damaged: truncated, or altered after it was saved" if archive else "is not a PyTorch checkpoint"
        raise CheckpointError(f"checkpoint {path} {what}") from None


def model_weights(state, path: str | Path) -> dict:
    """The weights a run validates inside a training checkpoint: its weight average when it kept one
    (train.ema_decay), else its model; or a bare state dict."""
    weights = state.get("ema_model", state.get("model", state)) if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(f"checkpoint {path} holds no model weights (expected a 'model' state dict)")
    return weights


def check_resumable(state, path: str | Path) -> None:
    """A run resumes from a full training state (last.pt), not from weights alone (best.pt)."""
    missing = [k for k in ("model", "optimizer", "scheduler", "iteration", "rng") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} holds no training state ({', '.join(missing)} missing): resume "
                              f"from the run's last.pt; best.pt holds the best weights only")


def check_compatible(model: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """Fail with a readable message when a checkpoint was trained with another backbone or class count."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint {path} does not fit the model of this config:"]
    if mismatched:
        k, theirs, ours = mismatched[0]
        hint = ""
        if k.startswith(("classifier", "decoder.classifier")):
            hint = " (a different number of classes: check data.num_classes)"
        elif k.startswith("encoder"):
            hint = " (a different backbone: check model.backbone / model.backbone_kwargs)"
        lines.append(f"{len(mismatched)} tensors differ in shape, e.g. {k}: checkpoint {theirs} vs model {ours}{hint}")
    if missing or unexpected:
        lines.append(f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                     f"(e.g. {unexpected[:2]}): a different backbone?")
    raise CheckpointError(" ".join(lines))


def export_encoder(checkpoint: str | Path, out: str | Path) -> int:
    """Write the encoder of a training checkpoint as a plain state dict, loadable as another run's
    `model.pretrained_file` (timm reads it with weights_only). Returns the number of tensors written."""
    state = load_checkpoint(checkpoint)
    model = state.get("model") if isinstance(state, dict) else None  # a bare tensor or list is no checkpoint either
    if not isinstance(model, dict):
        raise CheckpointError(f"checkpoint {checkpoint} has no 'model' entry: not a toco training checkpoint")
    encoder = {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")}
    if not encoder:
        raise CheckpointError(f"checkpoint {checkpoint} has no encoder.* tensors")
    save_checkpoint(out, encoder)
    return len(encoder)


def checkpoint_config(checkpoint: str | Path, config: str | Path | None = None, overrides=None):
    """The config a checkpoint was trained with: `config` if given, else the config.yaml the training loop saved
    beside the checkpoint, which may name keys renamed since (toco.config.RENAMED)."""
    from toco.config import load_config

    beside = Path(checkpoint).parent / "config.yaml"
    if config is None and not beside.is_file():
        raise CheckpointError(f"no config.yaml beside {checkpoint}: pass the training config")
    given = Path(config) if config is not None else beside
    return load_config(given, overrides, saved=given.resolve() == beside.resolve())


def load_trained_model(cfg, checkpoint: str | Path, device: torch.device | str = "cpu"):
    """The model `cfg` describes with the checkpoint's weights, in eval mode. A checkpoint of another backbone or
    class count raises CheckpointError naming what differs."""
    from toco.models import build_model

    weights = model_weights(load_checkpoint(checkpoint), checkpoint)
    model = build_model(dataclasses.replace(cfg.model, pretrained=False), cfg.data.num_classes)
    check_compatible(model, weights, checkpoint)
    model.load_state_dict(weights)
    return model.to(device).eval()


def check_checkpoint_fits(cfg, checkpoint: str | Path, resumable: bool = False) -> None:
    """Fail before any work when a checkpoint does not fit the config's model (built on the meta device: no
    memory, no weights read twice), or, `resumable`, holds no training state."""
    from toco.models import build_model

    state = load_checkpoint(checkpoint, mmap=True)
    if resumable:
        check_resumable(state, checkpoint)
    weights = model_weights(state, checkpoint)
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, pretrained=False), cfg.data.num_classes)
    check_compatible(model, weights, checkpoint)
