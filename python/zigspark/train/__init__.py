"""Training: crash-safe checkpoints (checkpoint), weight EMA (ema), the generator's flow-matching loop
(generator), multi-process data parallelism (distributed) and progress lines (progress).

Submodules are imported on first use, so `import zigspark.train.checkpoint` stays light.
"""

import importlib

_EXPORTS = {
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "has_checkpoint": "checkpoint",
    "Checkpoint": "checkpoint", "EMA": "ema", "train_generator": "generator", "TrainingDiverged": "generator",
    "TrainResult": "generator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
