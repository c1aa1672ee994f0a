"""The ResNet18 definition: the only place that says what the network is.

torchvision's resnet18 with its stem adapted to 32x32 inputs. Variants differ only in the stem:

- ``resnet18_cifar``: 3x3 stride-1 convolution, no max-pool. Feature maps 32-16-8-4. The accurate
  one (GPU recipe); ~0.56 GFLOPs per image.
- ``resnet18_pool``: 3x3 stride-1 convolution, then torchvision's 3x3 stride-2 max-pool. Feature maps
  16-8-4-2 like ``resnet18_fast`` and the same cost to within a few percent (only the stem runs at 32x32),
  but the stem sees every pixel: the CPU preset (docs/training.md, "Recipe choices").
- ``resnet18_fast``: 3x3 stride-2 convolution, no max-pool. Feature maps 16-8-4-2, a quarter of the
  compute of ``resnet18_cifar``.
- ``resnet18_imagenet``: torchvision's own 7x7 stride-2 stem with max-pool (8-4-2-1), the cheapest.

The checkpoint records the variant, so whoever loads it rebuilds the same network.

``load_imagenet_weights`` starts a model from torchvision's ImageNet weights (``--pretrained``).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1

# variant -> (stem stride, keep max-pool); None means torchvision's unchanged 7x7 stem.
VARIANTS: dict[str, tuple[int, bool] | None] = {
    "resnet18_cifar": (1, False),
    "resnet18_pool": (1, True),
    "resnet18_fast": (2, False),
    "resnet18_imagenet": None,
}


def build_model(variant: str, num_classes: int) -> nn.Module:
    """A freshly initialised ResNet18 of the given variant with num_classes outputs."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    model = resnet18(weights=None, num_classes=num_classes)
    stem = VARIANTS[variant]
    if stem is not None:
        stride, keep_maxpool = stem
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stride, padding=1, bias=False)
        if not keep_maxpool:
            model.maxpool = nn.Identity()
    return model


class PretrainedWeightsError(RuntimeError):
    """The ImageNet weights can be neither found in the cache nor downloaded; the message says where to put them."""


def imagenet_weights_path() -> Path:
    """Where torchvision's weights API caches (and looks for) the ResNet18 ImageNet weights: under TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_WEIGHTS.url).path).name


def load_imagenet_weights(model: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every tensor of torchvision's ResNet18 ImageNet weights whose name and shape match into ``model``
    (a 3x3 stem and a 3-class head do not match, everything else does): (loaded names, skipped names).

    The weights come through torchvision's own API, from the cache under TORCH_HOME, downloaded there once
    if missing. Offline without the file: PretrainedWeightsError naming the path to put it at."""
    try:
        pretrained = IMAGENET_WEIGHTS.get_state_dict(progress=False, weights_only=True)
    except Exception as exc:  # URLError, timeouts, HTTP errors, a truncated file: no usable weights
        raise PretrainedWeightsError(
            f"--pretrained: could not load torchvision's ResNet18 ImageNet weights ({exc.__class__.__name__}: "
            f"{exc}). Offline? On a machine that is online, download {IMAGENET_WEIGHTS.url} and put the file at "
            f"{imagenet_weights_path()} (the cache under TORCH_HOME), or train without --pretrained."
        ) from None
    own = model.state_dict()
    matching = {k: v for k, v in pretrained.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(matching, strict=False)
    return sorted(matching), sorted(set(own) - set(matching))
