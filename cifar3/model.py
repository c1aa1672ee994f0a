"""The ResNet18 definition: the only place that says what the network is.

torchvision's resnet18 with its stem adapted to 32x32 inputs. Variants differ only in the stem:

- ``resnet18_cifar``: 3x3 stride-1 convolution, no max-pool. Feature maps 32-16-8-4. The accurate
  one (GPU recipe); ~0.56 GFLOPs per image.
- ``resnet18_fast``: 3x3 stride-2 convolution, no max-pool. Feature maps 16-8-4-2, a quarter of the
  compute: the CPU quick preset.
- ``resnet18_imagenet``: torchvision's own 7x7 stride-2 stem with max-pool (8-4-2-1), the cheapest.

The checkpoint records the variant, so whoever loads it rebuilds the same network.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18

# variant -> (stem stride, keep max-pool); None means torchvision's unchanged 7x7 stem.
VARIANTS: dict[str, tuple[int, bool] | None] = {
    "resnet18_cifar": (1, False),
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
