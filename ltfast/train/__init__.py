"""ltfast.train: a thin long-tail trainer (``python -m ltfast.train --config <yaml> [key=value ...]``).

- config.py:   the schema of every knob, YAML + overrides, errors that name the key
- trainer.py:  the loop (DDP, bf16, checkpoints, resume, best-val selection, test, summary)
- metrics.py:  per-class counts, many/medium/few, UA/RA, the per-class plot
- models.py:   torchvision models from scratch, a small ResNet for 28x28
- experts.py:  multi-expert models (RIDE / SADE) and their output
- test_time.py: SADE's test-time aggregation on shifted test sets (python -m ltfast.train.test_time)
- schedule.py: lr as a pure function of the step
"""
from .config import ConfigError, load_config
from .trainer import train

__all__ = ["ConfigError", "load_config", "train"]
