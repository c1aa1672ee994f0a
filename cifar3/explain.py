"""Explanations: where in the image the evidence for a class lies, by one of several methods.

Every method answers, per image, a heat map of the model's input grid (``image_size`` x ``image_size``) in
[0, 1], scaled by its own maximum: 1 marks the strongest evidence *in that image*; a map of zeros means the
method found no positive evidence for the class asked about. Only the classes are explained (index <
``len(meta.classes)``), never the other-class output a checkpoint may have.

The methods are captum's (the library TorchServe's own vision handlers use), in three families:

- **Grad-CAM** (``grad-cam-layer1`` .. ``grad-cam-layer4``, ``LayerGradCam``) and its unpooled variant
  ``gradient-x-activation`` (``LayerGradientXActivation`` at ``layer1``): one forward and one backward pass
  of the float32 model, a map with the resolution of the stage (for ``resnet18_pool``: 16, 8, 4, 2 cells per
  side). The stem's max-pool makes each cell of a stage the same square block of input pixels, so a cell's
  value belongs at the centre of its block: bilinear upsampling with ``align_corners=False`` puts it there.
- **Perturbation** (``occlusion``, ``feature-ablation``): the image with one patch at a time set to the data
  set's mean colour (0 after normalisation), all copies in one batch through ``forward`` (the handler passes
  its serving engine); a pixel's value is how much the class's calibrated probability fell without it.
- **Input gradient** (``input-x-gradient``, ``InputXGradient``): per pixel, the gradient of the class's logit
  times the pixel's difference from the data set's mean colour, summed over colour channels: to first order,
  what setting the pixel to the mean colour costs the class. One forward and one backward pass.
- **Path** (``integrated-gradients``): the class's calibrated probability integrated along the straight path
  from the mean-colour image to the image; per pixel, summed over colour channels. The attributions add up to
  the probability the image gained over the mean-colour image, so a pixel's value says what removing it costs.

A checkpoint that answers with test-time flip (``ModelMeta.test_flip``) is explained as it answers: every
method differentiates or perturbs the logits averaged over the image and its mirror image. The layer methods
add the two views' maps, the mirror image's mirrored back: each view's activations get the gradient of the
averaged logit, which is half of its own.

Gradient methods explain the class's logit (its probability saturates at 1 for confident images and its
gradient vanishes); perturbation and path methods explain the calibrated probability, which they never
differentiate at one point only. Which method serves by default, and why: docs/explanations.md, from
reports/faithfulness.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cifar3.inference import answer_logits

STAGES = ("layer1", "layer2", "layer3", "layer4")  # torchvision ResNet's residual stages, input to output
OCCLUSION_WINDOW, OCCLUSION_STRIDE = 8, 4  # pixels; 7 x 7 = 49 masked copies of a 32 x 32 image
ABLATION_BLOCK = 4  # pixels per side of FeatureAblation's blocks; 8 x 8 = 64 masked copies
IG_STEPS = 16  # points on the integration path, one batch

METHODS = (
    *(f"grad-cam-{stage}" for stage in STAGES),
    "gradient-x-activation",
    "input-x-gradient",
    "occlusion",
    "feature-ablation",
    "integrated-gradients",
)
DEFAULT_METHOD = "input-x-gradient"  # chosen by reports/faithfulness.md (docs/explanations.md)


class UnknownMethod(ValueError):
    """A method name that is not one of METHODS; the message lists them."""


def check_method(name: str) -> str:
    if name not in METHODS:
        raise UnknownMethod(f"unknown explanation method {name[:100]!r}: choose one of {', '.join(METHODS)}")
    return name


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


def scaled(maps: torch.Tensor) -> torch.Tensor:
    """N x H x W attributions -> their positive part divided by each map's maximum (all zeros stay zeros)."""
    maps = maps.detach().float().clamp_min(0)
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), 0.0).clamp(0, 1).cpu()


class Explainer:
    """Heat maps by one method for a float32 model in eval mode (its weights are never changed).

    ``probs``: normalized batch -> calibrated N x C class probabilities (``meta.scores(...)[0]``). Perturbation
    methods run only this, so it may be the serving engine; the others differentiate it or the model.
    ``test_flip``: the model answers with the logits of the image and its mirror image averaged (``probs``
    does too), so the gradient methods differentiate that average.
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        num_classes: int,
        method: str,
        probs: Callable[[torch.Tensor], torch.Tensor],
        test_flip: bool = False,
    ):
        self.model = model.float().eval().requires_grad_(False)  # gradients flow to activations and inputs only
        self.test_flip = test_flip
        self.image_size, self.num_classes, self.method = image_size, num_classes, check_method(method)
        self.probs = probs
        self.layer = method.removeprefix("grad-cam-") if method.startswith("grad-cam-") else None
        if method == "gradient-x-activation":
            self.layer = "layer1"  # the finest stage: this variant keeps every cell's own gradient
        self.grid = stage_grids(self.model, image_size)[self.layer] if self.layer else image_size

    def heatmaps(self, batch: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
        """Normalized float batch N x 3 x H x W and one class index per image -> N x H x W maps in [0, 1]."""
        # captum is imported by the first explanation only: a worker that only predicts never loads it.
        from captum.attr import (
            FeatureAblation,
            InputXGradient,
            IntegratedGradients,
            LayerAttribution,
            LayerGradCam,
            LayerGradientXActivation,
            Occlusion,
        )

        if len(targets) != len(batch):
            raise ValueError(f"{len(targets)} targets for {len(batch)} images")
        if any(not 0 <= int(t) < self.num_classes for t in targets):
            raise ValueError(f"targets must be class indices below {self.num_classes}: {list(targets)}")
        device = next(self.model.parameters()).device
        batch, targets = batch.to(device, torch.float32), [int(t) for t in targets]
        size = (self.image_size, self.image_size)
        with torch.enable_grad():  # the handler's other paths run under inference_mode
            if self.layer:
                kind = LayerGradCam if self.method.startswith("grad-cam-") else LayerGradientXActivation
                attribution = kind(self.model, self.model.get_submodule(self.layer))

                def pixel_maps(views: torch.Tensor) -> torch.Tensor:
                    layer_maps = attribution.attribute(views, target=targets)
                    if kind is LayerGradientXActivation:
                        layer_maps = layer_maps.sum(1, keepdim=True)
                    return LayerAttribution.interpolate(layer_maps.detach(), size, "bilinear")[:, 0]

                maps = pixel_maps(batch)
                if self.test_flip:
                    maps = (maps + pixel_maps(batch.flip(-1)).flip(-1)) / 2
                return scaled(maps)
            if self.method == "input-x-gradient":
                return scaled(
                    InputXGradient(self.forward).attribute(batch.clone().requires_grad_(), target=targets).sum(1)
                )
            if self.method == "integrated-gradients":
                ig = IntegratedGradients(self.probs)
                attributions = ig.attribute(batch, baselines=0.0, target=targets, n_steps=IG_STEPS,
                                            internal_batch_size=len(batch) * IG_STEPS)  # fmt: skip
                return scaled(attributions.sum(1))
        with torch.no_grad():
            if self.method == "occlusion":
                window, stride = OCCLUSION_WINDOW, OCCLUSION_STRIDE
                copies = ((self.image_size - window) // stride + 1) ** 2
                attributions = Occlusion(self.probs).attribute(
                    batch, sliding_window_shapes=(3, window, window), strides=(3, stride, stride), baselines=0.0,
                    target=targets, perturbations_per_eval=copies,
                )  # fmt: skip
            else:  # feature-ablation: non-overlapping blocks, one feature each
                cells = self.image_size // ABLATION_BLOCK
                blocks = torch.arange(cells * cells, device=device).view(cells, cells)
                mask = blocks.repeat_interleave(ABLATION_BLOCK, 0).repeat_interleave(ABLATION_BLOCK, 1)[None, None]
                attributions = FeatureAblation(self.probs).attribute(
                    batch, baselines=0.0, target=targets, feature_mask=mask, perturbations_per_eval=cells * cells
                )
        return scaled(attributions[:, 0])  # every channel of a pixel was removed together: one value per pixel

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The logits the checkpoint answers with, differentiable: the model's, or with test-time flip the
        average over the image and its mirror image."""
        return answer_logits(self.model, batch, self.test_flip)

    def describe(self) -> dict:
        """What every explanation says about how it was made."""
        about = {"method": self.method, "grid": self.image_size, "test_flip": self.test_flip}
        if self.layer:
            about |= {"layer": self.layer, "layer_grid": self.grid}
        elif self.method == "occlusion":
            about |= {"window": OCCLUSION_WINDOW, "stride": OCCLUSION_STRIDE}
        elif self.method == "feature-ablation":
            about |= {"window": ABLATION_BLOCK, "stride": ABLATION_BLOCK}
        elif self.method == "integrated-gradients":
            about |= {"steps": IG_STEPS}
        return about


def build_explainer(model: nn.Module, meta, method: str, engine: Callable | None = None) -> Explainer:
    """An Explainer for a checkpoint's float32 ``model`` and ``meta``. ``engine`` (normalized batch -> logits,
    e.g. the serving engine, which averages the flips itself where the checkpoint says so) runs the
    perturbation methods' masked copies; default: the model itself."""
    model = model.float().eval()

    def probs(batch: torch.Tensor) -> torch.Tensor:
        if engine is not None and method in ("occlusion", "feature-ablation"):
            return meta.scores(engine(batch))[0]
        return meta.scores(explainer.forward(batch))[0]

    explainer = Explainer(model, meta.image_size, len(meta.classes), method, probs, meta.test_flip)
    return explainer
