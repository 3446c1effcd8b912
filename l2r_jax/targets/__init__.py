"""Target classifiers: `create(name, weights)` returns a `Target` (see base.py).

Families register themselves on import: vit (ViT Ti/S/B/L-16, small patch-4 variants), resnet
(ResNet-18/50, the CIFAR-10 ResNet), efficientnet_lite (EfficientNet-Lite0, real ImageNet weights).
"""
from l2r_jax.targets.base import Target, create, match_variables, names, register  # noqa: F401
from l2r_jax.targets import efficientnet_lite, resnet, vit  # noqa: F401,E402  (registration)
