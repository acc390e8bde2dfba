"""Checkpoints: atomic writes, safe loads, RNG state, and the resume compatibility check.

Every checkpoint is a dict of tensors and plain Python containers, so it is always read with
`torch.load(weights_only=True)`: a checkpoint is a file users download and share, and a full
unpickler would run whatever code a tampered file names. Anything that is not plain data (a
pickled object with a `__reduce__` payload, a numpy array, a dataclass) is refused before it runs.

Writes go to a temporary file in the same directory, are fsynced and then `os.replace`d, so a
crash (even `kill -9`) leaves either the previous checkpoint or the new one, never half of one.

Keys of every checkpoint: `format`, `model` (the weights to evaluate with: the EMA weights when
EMA is on), `config` (the resolved ExperimentConfig as a dict), `label_names`, `in_channels`,
`channels` (window names), `fold`, `k`, `epoch` (epochs completed). `last.ckpt` adds `train_state`
(raw weights, optimizer, schedule, grad scaler, EMA, RNG states, best scores and the early-stopping
counter).
"""

from __future__ import annotations

import os
import pickle
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "cttrain-ckpt/1"

# Config keys that change the model's shape or what it sees; resuming across them cannot work.
_SHAPE_KEYS = ("data.slices", "data.channels")
_SOFT_IGNORED = ("training.epochs", "training.device", "training.log_every", "data.num_workers",
                 "data.prefetch", "data.pin_memory", "data.cache", "model.compile", "model.channels_last")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, unsafe or incompatible; the message names the file."""


def save_checkpoint(payload: Mapping[str, Any], path: str | Path) -> Path:
    """Write `payload` (plain tensors and containers) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(dict(payload, format=FORMAT), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a cttrain checkpoint with `weights_only=True`; any problem raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused to load: the file holds objects other than tensors and "
                              f"plain containers (tampered, or not a cttrain checkpoint){_unsafe_global(exc)}"
                              ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/... for damaged files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint (corrupt or truncated): {reason[:160]}"
                              ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cttrain checkpoint (expected format {FORMAT!r})")
    missing = [key for key in ("model", "config", "label_names", "in_channels", "epoch") if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def _unsafe_global(exc: Exception) -> str:
    """The object torch's weights-only unpickler refused (e.g. `GLOBAL io.open`), when it says so."""
    match = re.search(r"Unsupported global: (GLOBAL [\w.]+)", str(exc))
    return f": it names {match.group(1)}" if match else ""


# ---------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA when present) generator states as plain tensors/lists."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when this process has as many devices)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].cpu().numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ---------------------------------------------------------------------------------- compatibility
def _flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resume_differences(ckpt: Mapping[str, Any], path: str | Path, cfg: Mapping[str, Any], *,
                       in_channels: int, label_names: list[str], fold: int, k: int) -> list[str]:
    """Check that `ckpt` can be resumed under `cfg` (a config dict).

    Raises CheckpointError when the model or data shape differs (model section, slices, channels,
    labels, fold); returns the other changed keys (`key: old -> new`) so the caller can warn."""
    old, new = _flatten(ckpt["config"]), _flatten(cfg)
    changed = {key for key in set(old) | set(new) if old.get(key) != new.get(key)}
    hard = sorted(key for key in changed if key in _SHAPE_KEYS or
                  (key.startswith("model.") and key not in _SOFT_IGNORED))
    problems = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in hard]
    if int(ckpt["in_channels"]) != in_channels:
        problems.append(f"input channels: {ckpt['in_channels']} -> {in_channels}")
    if list(ckpt["label_names"]) != list(label_names):
        problems.append("label names differ")
    if (ckpt.get("fold"), ckpt.get("k")) != (fold, k):
        problems.append(f"fold {ckpt.get('fold')}/{ckpt.get('k')} -> {fold}/{k}")
    if problems:
        raise CheckpointError(f"{path}: cannot resume with a different model/data setup: "
                              f"{'; '.join(problems)}")
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(changed - set(hard))
            if key not in _SOFT_IGNORED]


# -------------------------------------------------------------------------------------- predict
def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint was trained with and load its (EMA, when used) weights.

    Returns `(model in eval mode on device, config dict)`; the model also carries `label_names`,
    `in_channels` and `channels` (the store windows it was trained on, by name) for the caller."""
    from ctprep.config import ConfigError, build
    from cttrain.config import ExperimentConfig
    from cttrain.models import build_model

    ckpt = load_checkpoint(path)
    try:
        cfg = build(ExperimentConfig, dict(ckpt["config"]), "checkpoint config")
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its config no longer matches this cttrain version: {exc}") from None
    model = build_model(cfg.model, int(ckpt["in_channels"]), len(ckpt["label_names"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {str(exc).splitlines()[0]}") from None
    model.label_names = list(ckpt["label_names"])
    model.in_channels = int(ckpt["in_channels"])
    model.channels = list(ckpt.get("channels", cfg.data.channels))
    model.floor_prior = ckpt.get("floor_prior")  # model.floor_prior: the fold's fitted floor (cttrain/prior.py)
    if cfg.model.floor_prior and model.floor_prior is None:
        raise CheckpointError(f"{path}: trained with model.floor_prior but holds no floor_prior parameters")
    return model.to(device).eval(), dict(ckpt["config"])
