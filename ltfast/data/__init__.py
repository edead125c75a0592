"""Data for long-tailed training: list files and long-tailed splits (``datasets``), class-aware
samplers backed by the ``ltfast.class_aware_sample`` ops (``samplers``), a device-resident loader
for in-memory sets (``loaders``), and the image loaders: the DALI pipeline (``dali``, which
imports DALI only when used, and its ``make_image_loader``), its PIL/torchvision baseline
(``pil``), the augmentation both apply (``augmentation``) and what else they share
(``image_loader``)."""
from .datasets import (FASHION_MNIST_CLASSES, InMemoryDataset, ListDataset, check_files_exist, check_labels,
                       class_counts, fashion_mnist_lt,
                       load_fashion_mnist, long_tailed_counts, long_tailed_indices, read_list_file,
                       write_jpeg_folder, write_list_file)
from .loaders import DeviceTensorLoader
from .samplers import (ClassBalancedSampler, InstanceSampler, LongTailSampler, ProgressivelyBalancedSampler,
                       ReversedSampler, SquareRootSampler, make_sampler)

__all__ = ["FASHION_MNIST_CLASSES", "InMemoryDataset", "ListDataset", "check_files_exist", "check_labels", "class_counts", "fashion_mnist_lt",
           "load_fashion_mnist", "long_tailed_counts", "long_tailed_indices", "read_list_file", "write_jpeg_folder",
           "write_list_file", "DeviceTensorLoader", "ClassBalancedSampler", "InstanceSampler", "LongTailSampler",
           "ProgressivelyBalancedSampler", "ReversedSampler", "SquareRootSampler", "make_sampler"]
