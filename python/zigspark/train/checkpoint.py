"""Checkpoints that survive a crash at any instant.

A checkpoint is a directory DIR holding

    model.safetensors   the model's state_dict                       (always)
    config.json         the caller's JSON config, e.g. {"model": model.config, ...}   (always)
    ema.safetensors     the EMA weights, same names as the model      (if an EMA is given)
    optimizer.pt        optimizer.state_dict() through torch.save     (if an optimizer is given)
    state.pt            the loop's state (step, RNG states, data position, losses ...) through torch.save
    state.json          the JSON-able top-level entries of that state, for people reading the directory

Write protocol (the previous checkpoint is intact until the new one is complete):

    1. write every file into a fresh sibling  P/.DIR.tmp-<random>  and fsync each file and the directory;
    2. if DIR holds a checkpoint: rename DIR → P/.DIR.old                          (fsync P)
    3. rename P/.DIR.tmp-<random> → DIR                                              (fsync P)
    4. delete P/.DIR.old

Renames within one directory are atomic, so whenever the process dies there is exactly one complete
checkpoint to read: DIR (after 3, or before 2) or P/.DIR.old (between 2 and 3). Readers look at DIR first and
then at .DIR.old; the next save moves a stranded .DIR.old back and removes stale temporary directories.
Files in DIR that are not part of the checkpoint (a sample grid someone saved there) are hard-linked (or
copied) into the new version, so they survive the swap. A directory that exists, is not empty and holds no
checkpoint is never replaced: that would delete someone's files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from . import safetensors_io

MODEL_FILE, EMA_FILE, CONFIG_FILE = "model.safetensors", "ema.safetensors", "config.json"
OPTIMIZER_FILE, STATE_FILE, STATE_JSON_FILE = "optimizer.pt", "state.pt", "state.json"
CHECKPOINT_FILES = (MODEL_FILE, EMA_FILE, CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE, STATE_JSON_FILE)


@dataclass
class Checkpoint:
    """What load_checkpoint returns. `path` is the directory actually read (DIR, or its .old sibling after a
    crash mid-swap)."""

    config: Dict[str, Any]
    model_state: Dict[str, torch.Tensor]
    ema_state: Optional[Dict[str, torch.Tensor]] = None
    optimizer_state: Optional[Dict[str, Any]] = None
    state: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


def _absolute(directory) -> Path:
    # "." or "run/" must have a real name for the siblings (.run.old, .run.tmp-*) to sit next to it.
    return Path(os.path.abspath(directory))


def _sibling(directory: Path, suffix: str) -> Path:
    return directory.parent / f".{directory.name}.{suffix}"


def _is_complete(directory: Path) -> bool:
    return (directory / MODEL_FILE).is_file() and (directory / CONFIG_FILE).is_file()


def _readable_checkpoint(directory: Path) -> Optional[Path]:
    """DIR if it holds a checkpoint, else the previous version stranded by a crash mid-swap, else None."""
    if _is_complete(directory):
        return directory
    old = _sibling(directory, "old")
    if _is_complete(old):
        return old
    return None


def has_checkpoint(directory) -> bool:
    """True if `directory` (or the copy a crash mid-save left beside it) holds a complete checkpoint."""
    return _readable_checkpoint(_absolute(directory)) is not None


def _fsync_dir(directory: Path) -> None:
    # Makes renames and new directory entries durable. Not possible on every OS (Windows): best effort.
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


def _tensor_state(obj, what: str) -> Dict[str, torch.Tensor]:
    """{name: tensor} of a module (DDP-wrapped or not), an EMA, or a mapping of tensors."""
    if isinstance(obj, torch.nn.parallel.DistributedDataParallel):
        obj = obj.module
    if hasattr(obj, "state_dict") and not isinstance(obj, Mapping):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{what} must be an nn.Module, an EMA or a dict of tensors, got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"{what} must hold only tensors; {bad[:3]} are not")
    return dict(obj)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _json_summary(state: Mapping[str, Any]) -> Dict[str, Any]:
    summary = {}
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        summary[key] = value
    return summary


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_foreign_entries(old: Path, new: Path) -> None:
    """Bring the files in `old` that are not checkpoint files along into the new version."""
    for entry in old.iterdir():
        if entry.name in CHECKPOINT_FILES:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _recover(directory: Path) -> None:
    """Finish or undo a swap that a crash interrupted, and remove stale temporary directories."""
    old = _sibling(directory, "old")
    if old.exists():
        if _is_complete(directory) or not _is_complete(old):
            shutil.rmtree(old)                  # died after step 3 (or during step 4): the new version is in place
        else:                                   # died between steps 2 and 3: put the previous version back
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
            if not directory.exists():
                os.replace(old, directory)
                _fsync_dir(directory.parent)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(directory, *, model, config: Mapping[str, Any], ema=None, optimizer=None,
                    state: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write a checkpoint into `directory` (created if missing; the previous one is replaced).

    Args:
        directory: the checkpoint directory DIR.
        model: nn.Module (DDP-wrapped is fine) or a {name: tensor} state dict → model.safetensors.
        config: JSON-able dict → config.json. Put what rebuilds the model here (e.g. {"model": model.config}).
        ema: optional EMA / nn.Module / {name: tensor} → ema.safetensors.
        optimizer: optional torch.optim.Optimizer (or its state_dict) → optimizer.pt.
        state: optional dict (tensors allowed, e.g. RNG states) → state.pt, and its JSON-able top-level
            entries → state.json.

    Returns the directory. Only one process may save into a directory at a time (rank 0 under DDP).
    """
    directory = _absolute(directory)
    model_state = _tensor_state(model, "model")
    ema_state = None if ema is None else _tensor_state(ema, "ema")
    try:
        config_text = json.dumps(dict(config))
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be JSON-serialisable (it becomes config.json): {e}") from None
    if optimizer is not None and hasattr(optimizer, "state_dict"):
        optimizer = optimizer.state_dict()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} exists and is a file; choose another --out path")

    directory.parent.mkdir(parents=True, exist_ok=True)
    _recover(directory)
    if directory.exists() and any(directory.iterdir()) and not _is_complete(directory):
        raise ValueError(f"{directory} holds files but no checkpoint; refusing to replace it. "
                         f"Choose a new or empty --out directory")

    tmp = _sibling(directory, f"tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        safetensors_io.save_file(model_state, tmp / MODEL_FILE, metadata={"format": "pt"})
        if ema_state is not None:
            safetensors_io.save_file(ema_state, tmp / EMA_FILE, metadata={"format": "pt"})
        if optimizer is not None:
            _torch_save(optimizer, tmp / OPTIMIZER_FILE)
        if state is not None:
            _torch_save(dict(state), tmp / STATE_FILE)
            _write_json(tmp / STATE_JSON_FILE, _json_summary(state))
        _write_json(tmp / CONFIG_FILE, json.loads(config_text))
        if directory.exists():
            _carry_foreign_entries(directory, tmp)
        _fsync_dir(tmp)

        old = _sibling(directory, "old")
        if directory.exists():
            os.replace(directory, old)                                   # step 2
            _fsync_dir(directory.parent)
        os.replace(tmp, directory)                                       # step 3
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(_sibling(directory, "old"), ignore_errors=True)        # step 4
    return directory


def load_checkpoint(directory, map_location="cpu") -> Checkpoint:
    """Read the checkpoint in `directory` (tensors placed on `map_location`).

    Raises FileNotFoundError naming the directory when it holds no checkpoint.
    """
    source = _readable_checkpoint(_absolute(directory))
    if source is None:
        raise FileNotFoundError(
            f"no checkpoint in {directory}: expected {MODEL_FILE} and {CONFIG_FILE}; "
            f"train with `zigspark train-generator --out {directory}` first")
    with open(source / CONFIG_FILE) as f:
        config = json.load(f)
    model_state = safetensors_io.load_file(source / MODEL_FILE, device=map_location)
    ema_state = (safetensors_io.load_file(source / EMA_FILE, device=map_location)
                 if (source / EMA_FILE).is_file() else None)
    optimizer_state = (torch.load(source / OPTIMIZER_FILE, map_location=map_location, weights_only=True)
                       if (source / OPTIMIZER_FILE).is_file() else None)
    state = (torch.load(source / STATE_FILE, map_location="cpu", weights_only=True)
             if (source / STATE_FILE).is_file() else {})
    return Checkpoint(config=config, model_state=model_state, ema_state=ema_state,
                      optimizer_state=optimizer_state, state=state, path=source)
