"""``python -m ltfast.evaluate RUN_DIR_OR_CHECKPOINT [--split test|val] [--list FILE] [--logit-adjust TAU|auto]
[--tau-norm TAU|auto] [section.key=value ...]``: see ``ltfast.train.evaluation``."""
import sys

from ltfast.train.evaluation import evaluate_run, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
