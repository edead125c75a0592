"""Drop-in replacements for the loss code of the survey's codebases, backed by ltfast's fused ops.

- :mod:`ltfast.compat.survey`: one module per loss file of the survey's ``Main-codebase`` (itself a
  fork of hyperconnect/LADE), with the same file names, class names, constructor signatures and
  ``create_loss(...)`` factories, so that a YAML ``def_file:`` can point at them
  (``ltfast.compat.survey.def_file("PriorCELoss")`` prints the path).
- :mod:`ltfast.compat.ensemble`: the loss classes of the survey's ``Ensemble-codebase`` (the
  RIDE/SADE pytorch-template, ``model/loss.py``): ``import ltfast.compat.ensemble as module_loss``.

Every class computes the values and gradients of the original (docs/migrating.md lists the few
deliberate differences); only the ``[N, C]`` work moves into ltfast's fused kernels.
"""
from . import ensemble, paco, survey

__all__ = ["ensemble", "paco", "survey"]
