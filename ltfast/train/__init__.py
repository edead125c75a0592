"""ltfast.train: a thin long-tail trainer (``python -m ltfast.train --config <yaml> [key=value ...]``).

Layers, each importing only those below it (checked by import-linter, pyproject.toml):
- CLIs:     __main__.py (train), evaluation.py (``python -m ltfast.evaluate``), test_time.py (SADE's
            test-time aggregation, ``python -m ltfast.train.test_time``)
- trainer:  trainer.py, the loop; it calls the methods' hooks and names none of them
- engine:   engine.py, the run context (device, precision, ranks), build_model, evaluate
- config:   config.py, the schema by section, with the keys the losses and methods declare
- methods:  methods/, one file per long-tail method and the registry (``methods.available()``)
- parts:    models/ (architectures, the head rule), losses.py (the loss table), data.py
- support:  errors, schema, checkpoint, distributed, metrics, posthoc, schedule, optimization, runlog
"""
from .config import ConfigError, load_config
from .trainer import train

__all__ = ["ConfigError", "load_config", "train"]
