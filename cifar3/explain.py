"""Grad-CAM explanations: where in the image the evidence for a class lies.

captum's ``LayerGradCam`` (the library TorchServe's own vision handlers use) on the float32 model the
checkpoint describes, fed the same normalized batch as predictions. Each heat map is upsampled
bilinearly to the model's input grid (``image_size`` x ``image_size``, 32 x 32) and scaled to [0, 1]
by its own maximum, so 1 marks the strongest evidence *in that image*; a map of zeros means the layer
holds no positive evidence for the class asked about (e.g. a class the model rules out).

Which layer: a Grad-CAM map has the resolution of the layer it is taken at, and 32 x 32 inputs leave
the last residual stage of ``resnet18_fast`` only 2 x 2 cells (``resnet18_cifar``: 4 x 4). On the
coloured-square test (tests/test_explain.py) the peak of a 2 x 2 map landed on the object for about
1 image in 10 and of a 4 x 4 map for about half, the 8 x 8 maps for all. So the default is the deepest
residual stage whose output is still at least ``MIN_GRID`` x ``MIN_GRID`` (8 x 8): ``layer2`` of
``resnet18_fast``, ``layer3`` of ``resnet18_cifar``. reports/faithfulness.md compares the stages on the
real validation split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

METHOD = "grad-cam"
STAGES = ("layer1", "layer2", "layer3", "layer4")  # torchvision ResNet's residual stages, input to output
MIN_GRID = 8  # cells per side the explained layer must keep (see the module docstring)


def stage_grids(model: nn.Module, image_size: int) -> dict[str, int]:
    """{stage name: cells per side of its output} for an image_size x image_size input."""
    grids: dict[str, int] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: grids.__setitem__(name, out.shape[-1])
        )
        for name in STAGES
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return grids


def default_layer(model: nn.Module, image_size: int) -> str:
    """The deepest stage whose output keeps at least MIN_GRID cells per side (layer1 if none does)."""
    grids = stage_grids(model, image_size)
    return next((name for name in reversed(STAGES) if grids[name] >= MIN_GRID), STAGES[0])


class GradCam:
    """Grad-CAM heat maps for a float32 model in eval mode (its weights are never changed)."""

    def __init__(self, model: nn.Module, image_size: int, layer: str | None = None):
        self.model = model.float().eval().requires_grad_(False)  # gradients flow to activations only
        self.image_size = image_size
        self.layer = layer or default_layer(self.model, image_size)
        if self.layer not in STAGES:
            raise ValueError(f"unknown layer {self.layer!r}; choose one of {', '.join(STAGES)}")
        self.grid = stage_grids(self.model, image_size)[self.layer]
        self._cam = LayerGradCam(self.model, self.model.get_submodule(self.layer))

    def heatmaps(self, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        """Normalized float batch N x 3 x H x W and one class index per image -> N x H x W maps in [0, 1]."""
        if len(targets) != len(batch):
            raise ValueError(f"{len(targets)} targets for {len(batch)} images")
        device = next(self.model.parameters()).device
        with torch.enable_grad():  # the handler's other paths run under inference_mode
            cams = self._cam.attribute(
                batch.to(device, torch.float32), target=[int(t) for t in targets], relu_attributions=True
            )
        maps = LayerAttribution.interpolate(cams.detach(), (self.image_size, self.image_size), "bilinear")[:, 0]
        peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
        return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), 0.0).clamp(0, 1).cpu()

    def describe(self) -> dict:
        """What every explanation says about how it was made."""
        return {"method": METHOD, "layer": self.layer, "layer_grid": self.grid, "grid": self.image_size}
