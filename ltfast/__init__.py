"""ltfast: fused long-tailed recognition losses for PyTorch.

    import ltfast
    loss = ltfast.balanced_softmax_loss(logits, target, ltfast.priors.log_prior(class_counts))
    criterion = ltfast.nn.BalancedSoftmaxLoss(class_counts)   # drop-in for nn.CrossEntropyLoss

The ops themselves are ``torch.ops.ltfast.*`` (registered when this package is imported).
"""
# Each module imports what it uses (ltfast/_meta.py registers the fake kernels wherever the ops are
# first reached), so the order of these imports does not matter.
from . import _extension, _meta, nn, priors, reference  # noqa: F401  (_meta: the fake kernels)
from .ops import (adjusted_cross_entropy, balanced_softmax_loss, diverse_expert_loss, equalization_loss, lade_loss,
                  lade_regularizer, paco_loss, ride_loss, softmax_equalization_loss)
from .soft_targets import mixed_cross_entropy, probability_cross_entropy

__version__ = "0.1.0"
__all__ = ["adjusted_cross_entropy", "balanced_softmax_loss", "lade_loss", "lade_regularizer",
           "softmax_equalization_loss", "equalization_loss", "mixed_cross_entropy",
           "probability_cross_entropy", "diverse_expert_loss", "ride_loss", "paco_loss", "nn", "priors", "reference",
           "has_cuda_kernels", "cpu_capability", "set_forward_gradient"]

has_cuda_kernels = _extension.has_cuda_kernels
cpu_capability = _extension.cpu_capability
set_forward_gradient = _extension.set_forward_gradient
