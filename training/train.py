"""Train the cifar3 ResNet18 and write a checkpoint (state dict + metadata).

    python -m training.train --data PATH/TO/IMAGES --out checkpoints/cifar3.pt

An image folder (one sub-folder per class, any names) trains on all its sub-folders, sorted by name;
``--classes`` selects and orders them. A CIFAR source (``cifar10``, a cifar-10-batches-py folder) trains on
airplane, automobile and ship unless ``--classes`` names other CIFAR-10 classes.

Presets (the device picks gpu or cpu unless --preset says otherwise):

- ``gpu``: 32x32-stem ResNet18, bf16 autocast, channels_last, data and augmentation on the GPU,
  200 epochs. ``gpu-fast``: the same schedule stretched over a 20 s budget.
- ``cpu``: the max-pool-stem variant (feature maps from 16x16), batch 32, channels_last (in float32, layer4
  in NCHW with its 2x2-map convolutions as tap products: ``training_layout``), bf16 autocast only where
  the CPU computes it natively, the first half at 24x24 input (progressive resizing), over a 14.5-minute
  budget; after the first epoch, loss-ranked sampling (``easy_keep``) draws each epoch's images, the ones
  with the highest last loss most often.

A time budget runs from start to calibrated checkpoint: the one-cycle schedule (learning rate, momentum,
input size) is a function of the fraction of the budget used, so training ends when the budget does, on
any machine, however busy. ``--steps N`` replays a budgeted run's schedule without the clock;
``--budget-clock cpu --threads 1`` measures a budget in CPU time, i.e. as on an otherwise idle machine.
docs/training.md has the recipe, the budget table and the robustness figures.

Every epoch logs train/validation loss and accuracy, learning rate, time and images/s, to stdout
and as JSON lines (``<out>.log.jsonl``) with a training-curve plot (``<out>.curves.png``). The best
epoch on the validation split is checkpointed atomically (at most every 5 s, always at the end and when
stopped early: Ctrl-C, SIGTERM); a temperature and a top-label confidence map are then fitted on the
validation split for calibrated probabilities. Quick mode for tests: ``--limit 50 --epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from cifar3.checkpoint import ModelMeta, save_checkpoint
from cifar3.hardware import describe_machine
from cifar3.inference import fit_confidence_map, fit_temperature, native_bfloat16, predict_logits
from cifar3.model import (
    IMAGENET_WEIGHTS,
    VARIANTS,
    PretrainedWeightsError,
    build_model,
    load_imagenet_weights,
)
from cifar3.preprocessing import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE, normalize
from cifar3.unknown import ENERGY, OTHER_CLASS, class_logits, fit_threshold, split_scores

from .data import (
    DEFAULT_DATA_ROOT,
    DataError,
    Dataset,
    is_cifar_source,
    limit_per_class,
    load_split,
    resolve_classes,
    stratified_split,
)
from .reporting import beside
from .unknowns import rejection_figures, synthetic_unknowns, unknown_split


@dataclass
class Recipe:
    variant: str
    epochs: int  # length of the schedule when there is no time budget
    batch_size: int
    lr: float  # peak learning rate of the one-cycle schedule
    weight_decay: float
    label_smoothing: float
    crop_padding: int  # pixels of random translation (reflect-padded crop)
    cutout: int  # side of the zeroed square, pixels; 0 = off
    warmup: float  # fraction of training spent ramping up to lr
    time_budget_s: float | None = None  # seconds from start to calibrated checkpoint; the schedule fills them
    low_res: int = 0  # progressive resizing: input side in pixels for the first part of training; 0 = off
    low_res_until: float = 0.0  # ... until this fraction of training (steps, or of a budget's time)
    bf16: bool = True  # bf16 autocast where the device computes it natively (a GPU; a CPU with AVX512-BF16/AMX)
    # With unknown images (--unknown-data): how many go into each batch per known image, and how they are learnt:
    # "other-class" (one more output, their label) or "outlier-exposure" (a uniform target over the classes).
    unknown_ratio: float = 0.25
    unknown_loss: str = OTHER_CLASS
    synthetic_unknowns: int = 6000  # synthetic unknown images added to the unknown data (training/unknowns.py)
    # Share of the images (unknown ones too) that get one photo defect (PHOTO_DEFECTS), at a random strength:
    # what uploads suffer (blur, haze, exposure, sensor noise, JPEG, faded colour, too few pixels). 0 = off.
    photo: float = 0.0
    # Exponential moving average of the weights (and BatchNorm statistics) per step, from the point where the
    # input reaches full size (progressive resizing) or half-way: its decay, 0 = off. With it, validation, the
    # best-epoch checkpoint and calibration use the average; the log also gives the raw weights' accuracy.
    ema: float = 0.0
    # Horizontal flip: random in the first epoch, then each image flipped exactly when it was not in the epoch
    # before (Jordan 2024, airbench): every pair of epochs sees both orientations of every image.
    alternating_flip: bool = False
    # Loss-ranked sampling: from the second epoch on, each image enters an epoch with a probability that rises
    # linearly with the rank of its loss when it was last trained, from easy_keep (the lowest loss) to 1 (the
    # highest), so the steps go to the images the model still gets wrong. 1 = every image every epoch.
    easy_keep: float = 1.0
    # Test-time flip: the checkpoint answers with the logits of each image and its mirror image averaged (twice
    # the forward compute per image) and is calibrated on those averages (ModelMeta.test_flip).
    test_flip: bool = False


# Hyperparameters of the recipes; docs/training.md says what each reached, where.
GPU_RECIPE = Recipe("resnet18_cifar", epochs=200, batch_size=512, lr=0.4, weight_decay=5e-4,
                    label_smoothing=0.1, crop_padding=4, cutout=12, warmup=0.25)  # fmt: skip
PRESETS = {
    "gpu": GPU_RECIPE,
    # The same recipe over 20 s of wall time, data loading and calibration included.
    "gpu-fast": replace(GPU_RECIPE, epochs=100, time_budget_s=20),
    # 2 CPU cores: a stem that reaches 16x16 feature maps (4x cheaper than the 32x32 one) through a stride-1
    # convolution and a max-pool, which at equal time beat the stride-2 convolution by about a point. Batch 32:
    # in a budget of ~6 epochs, four times the steps of batch 128 bought more accuracy than the ~20% images/s a
    # small batch costs; the first half of the budget at 24x24 input, which trains ~1.4x the images per second
    # of 32x32 on an AVX2 CPU (docs/training.md, "Recipe choices"); 14.5 minutes to the calibrated checkpoint,
    # so that with interpreter start-up the whole command stays within 15. A quarter of the images get a photo
    # defect: at equal steps that kept clean accuracy and lifted accuracy on corrupted copies from 0.90x to 0.95x
    # of clean (docs/training.md, "Robustness to ordinary photo variation"). Loss-ranked sampling (easy_keep
    # 0.3) spends the steps on the images still gotten wrong: at equal time it scored 0.64 points more than
    # every image in every epoch, on average over seven seeds (docs/training.md, "Known images only"). Test-time
    # flip added 0.32 points on average over nine seeds, for twice the forward compute per image
    # (docs/training.md, "Test-time flip", states what it costs served).
    "cpu": Recipe("resnet18_pool", epochs=8, batch_size=32, lr=0.05, weight_decay=5e-4,
                  label_smoothing=0.1, crop_padding=4, cutout=0, warmup=0.25, time_budget_s=870,
                  low_res=24, low_res_until=0.5, photo=0.25, easy_keep=0.3, test_flip=True),
}  # fmt: skip
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# Recipe fields a command-line option of the same name (--batch-size for batch_size) overrides.
OVERRIDES = ("variant", "epochs", "batch_size", "lr", "weight_decay", "low_res", "low_res_until", "warmup",
             "crop_padding", "label_smoothing", "unknown_ratio", "unknown_loss", "synthetic_unknowns", "photo",
             "ema", "alternating_flip", "easy_keep", "test_flip")  # fmt: skip
UNKNOWN_LOSSES = (OTHER_CLASS, "outlier-exposure")
OUTLIER_EXPOSURE_WEIGHT = 0.5  # Hendrycks et al. 2019's weight of the uniform-target term


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        default="cifar10",
        help="'cifar10' (download to data/), a cifar-10-batches-py folder, or an image folder "
        "with one sub-folder per class",
    )
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="download cache for --data cifar10")
    p.add_argument("--out", type=Path, default=Path("checkpoints/cifar3.pt"), help="checkpoint to write")
    p.add_argument(
        "--classes",
        help="comma-separated class names, label i is the i-th: sub-folders of an image folder (default: all of "
        "them, sorted by name), CIFAR-10 names for a CIFAR source (default: airplane,automobile,ship)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--preset",
        choices=["auto", *PRESETS],
        default="auto",
        help="training recipe; auto = gpu on CUDA, cpu otherwise; gpu-fast = gpu within a 20 s budget",
    )
    p.add_argument("--variant", choices=list(VARIANTS), help="override the preset's model variant")
    p.add_argument("--epochs", type=int, help="override the preset's length: N epochs' worth of steps, no budget")
    p.add_argument(
        "--steps",
        type=int,
        help="train exactly this many optimizer steps, no time budget (a budgeted run records its steps: "
        "this replays its schedule without the clock)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="seconds from start to calibrated checkpoint; the schedule is stretched over them and training "
        "stops when they are used (cpu preset: 870, gpu-fast: 20; 0 = no budget)",
    )
    p.add_argument(
        "--budget-clock",
        choices=list(CLOCKS),
        default="wall",
        help="what the time budget counts: wall time, or this process's CPU time (with --threads 1, what a "
        "budget would buy on an otherwise idle machine, measured on a busy one)",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="start from torchvision's ImageNet ResNet18 weights (every layer whose shape matches), cached "
        "under TORCH_HOME",
    )
    p.add_argument("--batch-size", type=int, help="override the preset's batch size")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument("--weight-decay", type=float, help="override the preset's weight decay (not on biases and norms)")
    p.add_argument(
        "--low-res",
        type=int,
        metavar="PIXELS",
        help="override the preset's progressive resizing: input side for the first part of training (0 = off)",
    )
    p.add_argument(
        "--low-res-until",
        type=float,
        metavar="FRACTION",
        help="override the preset's progressive resizing: the fraction of training at the low resolution",
    )
    p.add_argument("--warmup", type=float, metavar="FRACTION", help="override the preset's warm-up fraction")
    p.add_argument(
        "--crop-padding", type=int, metavar="PIXELS", help="override the preset's random translation (0 = none)"
    )
    p.add_argument("--label-smoothing", type=float, help="override the preset's label smoothing")
    p.add_argument(
        "--unknown-data",
        help="images that are none of the classes, to learn to say so: an image folder (any sub-folders) or a CIFAR "
        "source (its other classes). Default with a CIFAR --data: its other classes",
    )
    p.add_argument(
        "--no-unknown-data", action="store_true", help="train on the classes alone, even with a CIFAR --data"
    )
    p.add_argument("--unknown-ratio", type=float, metavar="R",
                   help="unknown images per known image in each batch (preset: 0.25)")  # fmt: skip
    p.add_argument("--unknown-loss", choices=UNKNOWN_LOSSES, help="how unknown images are learnt (preset: other-class)")
    p.add_argument("--synthetic-unknowns", type=int, metavar="N",
                   help="synthetic unknown images added to --unknown-data (noise, flat colours, shuffled tiles, "
                        "glyphs, enlarged crops; preset: 6000; 0 = none)")  # fmt: skip
    p.add_argument("--photo", type=float, metavar="SHARE",
                   help="share of the images given one photo defect at a random strength: blur, low contrast, "
                        "exposure, noise, JPEG, faded colour, pixelation (0 = none)")  # fmt: skip
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay per step (from full-size "
                        "input on) and validate, keep and calibrate it (0 = off)")  # fmt: skip
    p.add_argument(
        "--alternating-flip",
        action=argparse.BooleanOptionalAction,
        help="flip each training image in every other epoch (random in the first) instead of at random",
    )
    p.add_argument("--easy-keep", type=float, metavar="P",
                   help="loss-ranked sampling: after the first epoch, the image with the lowest last loss enters "
                        "an epoch with probability P, the highest always, linear in rank between; 1 = off")  # fmt: skip
    p.add_argument(
        "--test-flip",
        action=argparse.BooleanOptionalAction,
        help="answer with the logits of each image and its mirror image averaged (twice the forward compute), "
        "calibrated on them; python -m training.calibrate switches it for a trained checkpoint",
    )
    p.add_argument("--limit", type=int, help="use at most N training images per class (quick runs)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda given, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def _jpeg(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # One quality per group (F.jpeg takes one); drawn where the generator lives, as every draw here.
    quality = int(torch.randint(10, 61, (), generator=gen, device=gen.device))
    return F.jpeg(x.round().clamp(0, 255).to(torch.uint8).cpu(), quality=quality).to(x)


def _blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = float(torch.empty((), device=gen.device).uniform_(0.4, 1.4, generator=gen))
    return F.gaussian_blur(x, kernel_size=[5, 5], sigma=[sigma, sigma])


def _pixelate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    side = int(torch.randint(12, 25, (), generator=gen, device=gen.device))
    small = nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True)
    return nn.functional.interpolate(small, size=x.shape[-2:], mode="nearest")


def _factor(x: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """One factor per image, uniform in [low, high), shaped to broadcast over it."""
    return torch.empty(len(x), 1, 1, 1, device=x.device).uniform_(low, high, generator=gen)


def _contrast(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    grey = F.rgb_to_grayscale(x).mean(dim=(-2, -1), keepdim=True)
    return grey + _factor(x, 0.25, 1.0, gen) * (x - grey)


def _noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    sigma = _factor(x, 3.0, 30.0, gen)  # on the 0..255 scale
    return x + sigma * torch.randn(x.shape, generator=gen, device=x.device)


def _saturation(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    grey = F.rgb_to_grayscale(x)
    return grey + _factor(x, 0.0, 1.0, gen) * (x - grey)


# Photo defects for the recipe's ``photo`` share of images: float N x 3 x H x W on the 0..255 scale in and out.
PHOTO_DEFECTS = {
    "blur": _blur,
    "contrast": _contrast,
    "brightness": lambda x, gen: x * _factor(x, 0.5, 1.6, gen),
    "noise": _noise,
    "jpeg": _jpeg,
    "saturation": _saturation,
    "pixelate": _pixelate,
}


def photo_defects(images: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 batch with about ``share`` of its images given one defect each, every defect equally likely."""
    dev = images.device
    chosen = torch.rand(len(images), generator=gen, device=dev) < share
    kind = torch.randint(0, len(PHOTO_DEFECTS), (len(images),), generator=gen, device=dev)
    out = images.float()
    for i, defect in enumerate(PHOTO_DEFECTS.values()):
        idx = (chosen & (kind == i)).nonzero().flatten()
        if len(idx):
            out[idx] = defect(out[idx], gen)
    return out.round().clamp(0, 255).to(torch.uint8)


def augment(
    images: torch.Tensor, recipe: Recipe, gen: torch.Generator, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Batched on the data's device: random reflect-padded crop, horizontal flip (``flip`` says which of the
    first ``len(flip)`` images; the rest at random), optional cutout, then the recipe's share of photo defects
    (unknown images get them too: a defect must not decide known or unknown)."""
    n, _, h, w = images.shape
    dev = images.device  # gen lives there too: no host-to-device copy, no sync per batch
    pad = recipe.crop_padding
    if pad:
        padded = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
        rows = (dy.view(n, 1) + torch.arange(h, device=dev)).view(n, 1, h, 1).expand(n, 3, h, w + 2 * pad)
        images = padded.gather(2, rows)
        cols = (dx.view(n, 1) + torch.arange(w, device=dev)).view(n, 1, 1, w).expand(n, 3, h, w)
        images = images.gather(3, cols)
    drawn = torch.rand(n, generator=gen, device=dev) < 0.5
    flip = drawn if flip is None else torch.cat([flip, drawn[len(flip) :]])
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    if recipe.cutout:
        half = recipe.cutout // 2
        cy = torch.randint(0, h, (n, 1, 1), generator=gen, device=dev)
        cx = torch.randint(0, w, (n, 1, 1), generator=gen, device=dev)
        ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        hole = ((ys - cy).abs() <= half) & ((xs - cx).abs() <= half)
        images = images * (~hole).unsqueeze(1)
    if recipe.photo:
        images = photo_defects(images, recipe.photo, gen)
    return images


def layer4_side(model: nn.Module) -> int:
    """The side of layer4's feature maps for a 32x32 input: 32 over the stem's and layers 2-4's strides."""
    stem_stride = model.conv1.stride[0] * (2 if isinstance(model.maxpool, nn.MaxPool2d) else 1)
    return max(1, IMAGE_SIZE // (stem_stride * 8))


def training_layout(model: nn.Module, bf16: bool, small_maps: bool = True) -> nn.Module:
    """The memory layout training runs ``model`` in (its weights and activations), in place: channels_last,
    10-25% faster steps on CPU and GPU (training/throughput.py). On CPU in float32, for the variants whose
    layer4 sees maps of 2x2 or less, layer4 alone stays NCHW: there torch's backward of a channels_last
    convolution on such small maps copies the 512x512 weight to NCHW on every step, about a tenth of a step's
    time at batch 32; NCHW avoids that copy. (On the 4x4 maps of ``resnet18_cifar`` it did not pay.) A
    pre-hook hands layer4 its input in NCHW. For those variants the 3x3 stride-1 convolutions of layers 3 and
    4 also become ``SmallMapConv2d`` (unless ``small_maps`` is False: training/throughput.py times both),
    which computes maps of 2x2 and 1x1 as matrix products: layer4's at 32x32 input, layers 3 and 4's at
    the 16x16 input of progressive resizing. The state dict keeps its names and values."""
    model.to(memory_format=torch.channels_last)
    if next(model.parameters()).device.type == "cpu" and not bf16 and layer4_side(model) <= 2:
        model.layer4.to(memory_format=torch.contiguous_format)
        model.layer4.register_forward_pre_hook(_contiguous_input)
        if small_maps:
            # layer4's weights tap-major (its maps are small at every input size); layer3's stay
            # channels_last, the layout its convolution kernel wants on the 3x3 and 4x4 maps of larger inputs
            for layer, tap_major in ((model.layer3, False), (model.layer4, True)):
                for conv in layer.modules():
                    if type(conv) is nn.Conv2d and SmallMapConv2d.fits(conv):
                        SmallMapConv2d.adopt(conv, tap_major)
    return model


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


class SmallMapConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 convolution that computes maps of 2x2 and 1x1 as matrix products of the
    real pixels with the kernel taps that reach them. On a 2x2 map, 16 of the 36 tap-by-pixel products
    involve a real pixel, the rest fall on padding; on a 1x1 map only the centre tap does. A convolution
    kernel computes all of them, and on a CPU it spent twice as long per nominal FLOP on 2x2 maps as on
    larger ones. Other map sizes take the ordinary convolution. ``adopt(conv, tap_major=True)`` stores the
    weight tap-major (its memory ordered kernel row, kernel column, input channel, output channel), so that
    each tap is a contiguous input-by-output matrix, for a convolution that only ever sees small maps."""

    # For each (output position, input position) pair of a 2x2 map, output-major: the kernel tap between them.
    PAIR_TAPS = torch.tensor([(iy - oy + 1) * 3 + (ix - ox + 1)
                              for oy in (0, 1) for ox in (0, 1) for iy in (0, 1) for ix in (0, 1)])  # fmt: skip

    @staticmethod
    def fits(conv: nn.Conv2d) -> bool:
        return (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.bias) == (
            (3, 3), (1, 1), (1, 1), (1, 1), 1, None
        )  # fmt: skip

    @classmethod
    def adopt(cls, conv: nn.Conv2d, tap_major: bool = True) -> None:
        """Turn ``conv`` into this class in place (same Parameter, same values), its weight tap-major or as
        it was."""
        conv.__class__ = cls
        if tap_major:
            conv.weight.data = conv.weight.data.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n, c_in, c_out = x.shape[0], weight.shape[1], weight.shape[0]
        if x.shape[-2:] == (1, 1):
            return (x.reshape(n, c_in) @ weight[:, :, 1, 1].t()).reshape(n, c_out, 1, 1)
        if x.shape[-2:] != (2, 2):
            return super()._conv_forward(x, weight, bias)
        taps = weight.permute(2, 3, 1, 0).reshape(9, c_in, c_out)  # a view where the weight is tap-major
        pixels = x.permute(2, 3, 0, 1).reshape(4, n, c_in)  # input position, image, channel
        products = torch.bmm(pixels.repeat(4, 1, 1), taps.index_select(0, self.PAIR_TAPS.to(x.device)))
        out = products.reshape(4, 4, n, c_out).sum(1)  # each output position sums its four input positions
        return out.reshape(2, 2, n, c_out).permute(2, 3, 0, 1)


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; weight decay on weights only, not on biases and norm scales; on a GPU
    the fused kernel (one launch for the whole update)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=0.9,
        nesterov=True,
        fused=next(model.parameters()).is_cuda,
    )


def make_objective(recipe: Recipe, num_classes: int):
    """The training loss of a batch whose first ``len(targets)`` images are known and the rest unknown."""
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)

    def objective(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = len(targets)
        if len(outputs) == known:
            return criterion(outputs, targets)
        if recipe.unknown_loss == OTHER_CLASS:  # the unknowns' label is the output after the classes
            return criterion(outputs, torch.cat([targets, targets.new_full((len(outputs) - known,), num_classes)]))
        uniform = -outputs[known:].log_softmax(1).mean(1).mean()  # cross-entropy to the uniform distribution
        return criterion(outputs[:known], targets) + OUTLIER_EXPOSURE_WEIGHT * uniform

    return objective


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective,
    images: torch.Tensor,
    targets: torch.Tensor,
    recipe: Recipe,
    gen: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
    size: int,
    bf16: bool,
    flip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch (the known images, labelled by ``targets``, then any unknown ones),
    augmented and normalized on its device, resized to ``size`` (antialiased: what a smaller photo of the same
    object looks like), channels_last, under bf16 autocast if ``bf16``: (loss, the known images' logits), both
    still on the device (reading them would wait for a GPU). ``flip``: which known images to flip (else random)."""
    inputs = normalize(augment(images, recipe, gen, flip), mean, std)
    if size != inputs.shape[-1]:
        inputs = nn.functional.interpolate(inputs, size=(size, size), mode="bilinear", antialias=True)
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = model(inputs)
        loss = objective(outputs.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), outputs[: len(targets)].detach()


def one_cycle(progress: float, recipe: Recipe) -> tuple[float, float]:
    """(learning rate, momentum) at ``progress`` (0..1): the shape of torch's OneCycleLR (cosine from lr/25
    up to lr over the warm-up fraction, then cosine down to lr/25e4; momentum mirrored 0.95 -> 0.85 -> 0.95),
    as a function of progress instead of a step count fixed in advance, so a time budget can drive it."""

    def cosine(start: float, end: float, t: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * min(max(t, 0.0), 1.0)) + 1)

    lowest, highest = recipe.lr / 25, recipe.lr
    if progress < recipe.warmup:
        t = progress / recipe.warmup
        return cosine(lowest, highest, t), cosine(0.95, 0.85, t)
    t = (progress - recipe.warmup) / (1 - recipe.warmup)
    return cosine(highest, lowest / 1e4, t), cosine(0.85, 0.95, t)


class Progress:
    """How far training is, 0..1; the learning rate, momentum and input size are functions of it.

    With a step count: steps done / steps. With a time budget: time since training began / time until the
    budget's end less a reserve for the final validation, calibration and save. A slower or busier machine
    therefore trains fewer steps on the same schedule, and every budget is used to its end (no whole epoch
    left over because it would not fit)."""

    def __init__(self, steps: int | None = None, budget_end: float | None = None, clock=time.perf_counter):
        self.steps, self.budget_end, self.clock = steps, budget_end, clock
        self.step = 0
        self.begin = clock()
        self.reserve = 0.0 if budget_end is None else 0.03 * (budget_end - self.begin)  # until measured

    def reserve_for(self, validation_s: float, validations: int = 1, calibration: float = 1.0) -> None:
        """The end of a budgeted run: the last epoch's ``validations``, the calibration (``calibration``
        validations' worth: twice the known split's with test-time flip, and the unknown split's), and a save
        (a second or two)."""
        self.reserve = (validations + calibration) * validation_s + 2.0

    def __call__(self) -> float:
        if self.budget_end is None:
            return self.step / self.steps
        return (self.clock() - self.begin) / max(1e-9, self.budget_end - self.reserve - self.begin)

    @property
    def done(self) -> bool:
        """Progress 1 reached, after at least one step (a budget spent on loading data still trains once)."""
        return self.step > 0 and self() >= 1.0


class BestSnapshot:
    """The best epoch's weights, kept in memory and written to disk (atomically) at most every
    ``every_s`` seconds and at the end: a GPU epoch takes well under a second, a 45 MB save about a tenth
    of one. On a CPU every epoch is longer than that, so each new best is written at once."""

    def __init__(self, path: Path, every_s: float = 5.0):
        self.path, self.every_s = path, every_s
        self.kept: tuple[dict[str, torch.Tensor], ModelMeta] | None = None  # weights and their metadata
        self.unsaved = False
        self.saved_at = -float("inf")

    @property
    def state(self) -> dict[str, torch.Tensor] | None:
        return self.kept[0] if self.kept else None

    @property
    def meta(self) -> ModelMeta | None:
        return self.kept[1] if self.kept else None

    def keep(self, model: nn.Module, meta: ModelMeta) -> None:
        # contiguous: training may store a weight in another layout (training_layout); checkpoints hold NCHW
        state = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
        self.kept = state, copy.deepcopy(meta)  # one assignment: weights and metadata always match
        self.unsaved = True

    def save(self, force: bool = False) -> bool:
        """Write the kept weights if they are new and (force or) the interval has passed; True if written."""
        if not self.unsaved or not (force or time.perf_counter() - self.saved_at >= self.every_s):
            return False
        save_checkpoint(self.path, *self.kept)
        self.unsaved, self.saved_at = False, time.perf_counter()
        return True


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    gen: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
    bf16: bool,
    desc: str,
    objective,
    unknown: torch.Tensor | None = None,
    average: AveragedModel | None = None,
    flips: torch.Tensor | None = None,
    last_loss: torch.Tensor | None = None,
) -> tuple[float, float, int]:
    """One pass over the shuffled training images (with ``last_loss``, over those ``epoch_sample`` draws; the
    last partial batch dropped), augmented on their device, stopping early when ``progress`` reaches 1: (mean
    loss, accuracy, images seen). Each step first sets the learning rate, momentum and input size for the
    current progress. Nothing in the loop waits for a
    GPU except every 10th step on a time budget (so that the clock measures work done, not work queued):
    losses and hits are summed on the device and read once at the end. With ``unknown`` images, each batch
    adds ``recipe.unknown_ratio`` of them per known image, drawn at random. ``average`` (the recipe's ``ema``)
    takes in the weights after every step from ``ema_start(recipe)`` on. ``flips``: which of ``images`` this
    epoch flips (``recipe.alternating_flip``), else each is flipped at random. ``last_loss``: each image's
    loss when it was last trained (inf before), updated here; with it, ``epoch_sample`` picks the images."""
    device = images.device
    model.train()
    unknown_per_batch = round(recipe.batch_size * recipe.unknown_ratio) if unknown is not None else 0
    order = torch.randperm(len(images), generator=gen, device=device)
    if last_loss is not None:
        drawn = order[epoch_sample(last_loss, recipe.easy_keep, gen)[order]]
        order = drawn if len(drawn) else order  # a handful of images can all be left out; train them all then
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    steps = max(1, len(order) // recipe.batch_size)
    for step in tqdm(range(steps), desc=desc, unit="batch", disable=None, leave=False):
        if device.type == "cuda" and progress.budget_end is not None and step % 10 == 0:
            torch.cuda.synchronize()
        if progress.done:
            break
        done = min(1.0, progress())
        lr, momentum = one_cycle(done, recipe)
        for group in optimizer.param_groups:
            group["lr"], group["momentum"] = lr, momentum
        size = recipe.low_res if recipe.low_res and done < recipe.low_res_until else IMAGE_SIZE
        idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        targets, batch = labels[idx], images[idx]
        if unknown_per_batch:
            drawn = torch.randint(0, len(unknown), (unknown_per_batch,), generator=gen, device=device)
            batch = torch.cat([batch, unknown[drawn]])
        flip = flips[idx] if flips is not None else None
        loss, outputs = train_step(
            model, optimizer, objective, batch, targets, recipe, gen, mean, std, size, bf16, flip
        )  # fmt: skip
        if last_loss is not None:
            last_loss[idx] = nn.functional.cross_entropy(outputs.float(), targets, reduction="none")
        if average is not None and done >= ema_start(recipe):
            average.update_parameters(model)
        progress.step += 1
        loss_sum += loss * len(idx)
        correct += (outputs.argmax(1) == targets).sum()
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the steps above were only queued
    return loss_sum.item() / max(1, seen), correct.item() / max(1, seen), seen


def epoch_sample(last_loss: torch.Tensor, easy_keep: float, gen: torch.Generator) -> torch.Tensor:
    """Which images enter the next epoch: each with probability easy_keep + (1 - easy_keep) x the rank of its last
    loss (0 for the lowest, 1 for the highest; images not yet trained, at inf, always enter)."""
    rank = last_loss.argsort().argsort().float() / max(1, len(last_loss) - 1)
    keep = torch.where(last_loss.isinf(), 1.0, easy_keep + (1 - easy_keep) * rank)
    return torch.rand(len(last_loss), generator=gen, device=last_loss.device) < keep


def epoch_flips(first: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images epoch ``epoch`` (from 1) flips under ``alternating_flip``: ``first`` in odd epochs, the
    others in even ones."""
    return first ^ (epoch % 2 == 0)


def ema_start(recipe: Recipe) -> float:
    """Where the weight average begins: at full-size input (earlier weights and BatchNorm statistics belong to
    the smaller input), else half-way. The first update copies the weights, so no random start is averaged in."""
    return recipe.low_res_until if recipe.low_res else 0.5


def evaluate_split(
    model: nn.Module, data: Dataset, mean, std, label_smoothing: float, num_classes: int
) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy among the classes, all logits) on a held-out split of known images."""
    model.eval()
    logits = predict_logits(model, data.images, mean, std)
    loss = nn.functional.cross_entropy(logits, data.labels, label_smoothing=label_smoothing).item()
    accuracy = (class_logits(logits, num_classes).argmax(1) == data.labels).float().mean().item()
    return loss, accuracy, logits


def unknown_source(args: argparse.Namespace) -> str | None:
    """Where the unknown images come from: --unknown-data, else a CIFAR --data's other classes, else nowhere."""
    if args.no_unknown_data:
        return None
    if args.unknown_data:
        return args.unknown_data
    return args.data if is_cifar_source(args.data) else None


def load_unknown_data(
    args: argparse.Namespace, classes: list[str], recipe: Recipe, train_set: Dataset
) -> tuple[torch.Tensor | None, Dataset | None]:
    """(uint8 unknown training images with the synthetic ones, the unknown validation split), or (None, None).

    The validation split is carved like the known one (same fraction and seed, stratified by source) and holds
    no synthetic images: the stored threshold's figures are measured on real unknown images."""
    source = unknown_source(args)
    if source is None:
        return None, None
    train, val = unknown_split(source, classes, args.data_root, args.limit, args.val_fraction, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    synthetic = synthetic_unknowns(recipe.synthetic_unknowns, train_set.images, gen, train.images)
    print(
        f"unknown data: {train.source}: {len(train)} train / {len(val)} validation images from "
        f"{len(train.sources)} source(s), + {len(synthetic)} synthetic; {recipe.unknown_loss}",
        flush=True,
    )
    return torch.cat([train.images, synthetic]), val


def unknown_decision(
    model: nn.Module, meta: ModelMeta, val_logits: torch.Tensor, unknown_val: Dataset | None, unknown_loss: str,
    unknown_data: str | None,
) -> dict:  # fmt: skip
    """The checkpoint's ``unknown`` metadata: the score, the threshold that accepts KNOWN_ACCEPTED of the known
    validation images, and what it does on them and on the unknown validation images (``unknown_data``'s
    split, learnt with ``unknown_loss``)."""
    classes = len(meta.classes)
    score = OTHER_CLASS if meta.unknown.get("score") == OTHER_CLASS else ENERGY
    decision = {"score": score}
    known_scores = split_scores(val_logits, classes, meta.temperature, decision)[1]
    unknown_scores = None
    if unknown_val is not None:
        logits = predict_logits(model.eval(), unknown_val.images, meta.mean, meta.std, test_flip=meta.test_flip)
        unknown_scores = split_scores(logits, classes, meta.temperature, decision)[1]
    threshold = fit_threshold(known_scores)
    method = unknown_loss if unknown_val is not None else "post-hoc"
    return {
        "method": method,
        **decision,
        "threshold": threshold,
        **rejection_figures(known_scores, unknown_scores, threshold),
        "unknown_data": unknown_data,
        "validation_images": {
            "known": len(known_scores),
            "unknown": 0 if unknown_scores is None else len(unknown_scores),
        },
    }


def calibrate(
    model: nn.Module, meta: ModelMeta, val_set: Dataset, unknown_val: Dataset | None, unknown_loss: str,
    unknown_data: str | None,
) -> None:  # fmt: skip
    """Fit what ``meta`` answers with to the validation split, on the logits the checkpoint answers with
    (``meta.test_flip``): the temperature the handler divides the logits by, the top-label confidence map
    (cifar3/unknown.py, calibrate_confidence), the unknown-image threshold and its figures; and
    ``meta.val_accuracy``, the split's accuracy as answered. Training calls it once, on the best epoch's
    model; ``python -m training.calibrate`` again, on a trained checkpoint."""
    classes = len(meta.classes)
    val_logits = predict_logits(model.eval(), val_set.images, meta.mean, meta.std, test_flip=meta.test_flip)
    meta.val_accuracy = round((class_logits(val_logits, classes).argmax(1) == val_set.labels).float().mean().item(), 5)
    meta.temperature = round(fit_temperature(class_logits(val_logits, classes), val_set.labels), 5)
    temperature_only = split_scores(val_logits, classes, meta.temperature, meta.unknown)[0]
    meta.confidence_map = fit_confidence_map(temperature_only, val_set.labels)
    meta.unknown = unknown_decision(model, meta, val_logits, unknown_val, unknown_loss, unknown_data)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    preset = args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    overrides = {field: getattr(args, field) for field in OVERRIDES}
    recipe = Recipe(**{**asdict(PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None}})
    if args.epochs is not None or args.steps is not None:
        recipe.time_budget_s = None  # an explicit length wins
    if args.time_budget is not None:
        recipe.time_budget_s = args.time_budget or None
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be at least 1")
    if not 0 < recipe.easy_keep <= 1:
        raise ValueError("--easy-keep must be in (0, 1]")
    classes = resolve_classes(args.data, args.classes, args.unknown_data)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)  # shuffling and augmentation, on the data's device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape throughout: pick the fastest kernels once
    started = time.perf_counter()
    clock = CLOCKS[args.budget_clock]
    budget_end = clock() + recipe.time_budget_s if recipe.time_budget_s else None

    data = limit_per_class(load_split(args.data, classes, "train", args.data_root), args.limit, args.seed)
    train_set, val_set = stratified_split(data, args.val_fraction, args.seed)
    print(
        f"data: {data.source}: {len(train_set)} train / {len(val_set)} validation images, "
        f"classes {classes}; preset {preset} on {device}: {asdict(recipe)}",
        flush=True,
    )
    unknown_train, unknown_val = load_unknown_data(args, classes, recipe, train_set)
    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    unknown_images = unknown_train.to(device) if unknown_train is not None else None
    data_load_s = time.perf_counter() - started
    mean, std = list(CIFAR10_MEAN), list(CIFAR10_STD)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)  # copied once, not per step

    with_other_output = unknown_images is not None and recipe.unknown_loss == OTHER_CLASS
    model = build_model(recipe.variant, len(classes) + with_other_output)
    if args.pretrained:
        loaded, skipped = load_imagenet_weights(model)
        print(f"--pretrained: {len(loaded)} ImageNet tensors loaded; freshly initialised: {', '.join(skipped)}")
    bf16 = recipe.bf16 and native_bfloat16(device)  # False under ATEN_CPU_CAPABILITY=avx2 too
    model = training_layout(model.to(device), bf16)
    optimizer = build_optimizer(model, recipe)
    average = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True) if recipe.ema else None
    )
    steps_per_epoch = max(1, len(train_set) // recipe.batch_size)  # drop the last partial batch
    first_flips = torch.rand(len(train_images), generator=gen, device=device) < 0.5 if recipe.alternating_flip else None
    last_loss = torch.full((len(train_images),), math.inf, device=device) if recipe.easy_keep < 1 else None
    if budget_end is not None:
        progress = Progress(budget_end=budget_end, clock=clock)
        planned = f"as many steps as fit in a {recipe.time_budget_s:.0f} s budget ({args.budget_clock} clock)"
    else:
        progress = Progress(steps=args.steps or recipe.epochs * steps_per_epoch)
        recipe.epochs = math.ceil(progress.steps / steps_per_epoch)
        planned = f"{progress.steps} steps ({recipe.epochs} epochs)"
    print(f"training {planned}; {'bf16 autocast' if bf16 else 'float32'}", flush=True)

    meta = ModelMeta(
        variant=recipe.variant,
        classes=classes,
        image_size=IMAGE_SIZE,
        mean=mean,
        std=std,
        train_config={
            **asdict(recipe),
            "preset": preset,
            "data": str(args.data),
            "limit": args.limit,
            "val_fraction": args.val_fraction,
            "seed": args.seed,
            "device": str(device),
            "torch": str(torch.__version__),
            "train_images": len(train_set),
            "bf16": bf16,
            "budget_clock": args.budget_clock,
            "pretrained": IMAGENET_WEIGHTS.name if args.pretrained else None,
            "unknown_data": unknown_source(args) if unknown_images is not None else None,
        },
        unknown={"score": OTHER_CLASS} if with_other_output else {},
    )
    objective = make_objective(recipe, len(classes))
    log_path, plot_path = beside(args.out, ".log.jsonl"), beside(args.out, ".curves.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    history: list[dict] = []
    best_acc = -1.0
    best = BestSnapshot(args.out)
    epoch = 0
    try:
        while not progress.done:
            epoch += 1
            epoch_start = time.perf_counter()
            train_loss, train_acc, seen = train_epoch(
                model, optimizer, progress, train_images, train_labels, recipe, gen, mean_t, std_t, bf16,
                f"epoch {epoch}", objective, unknown_images, average,
                None if first_flips is None else epoch_flips(first_flips, epoch), last_loss,
            )  # fmt: skip
            if not seen:  # the budget ran out between the check above and the first step
                epoch -= 1
                break
            train_time = time.perf_counter() - epoch_start
            validation_start = clock()  # the budget's clock: wall time, or CPU time on a busy machine
            val_loss, val_acc, _ = evaluate_split(model, val_set, mean, std, recipe.label_smoothing, len(classes))
            if epoch == 1:
                unknown_share = len(unknown_val) / len(val_set) if unknown_val is not None else 0.0
                calibration = (1 + recipe.test_flip) * (1 + unknown_share)  # forward passes over the splits
                progress.reserve_for(clock() - validation_start, 1 + (average is not None), calibration)
            validated, raw = model, {}
            if average is not None and average.n_averaged.item():  # validate, keep and calibrate the average
                raw = {"raw_val_loss": round(val_loss, 5), "raw_val_acc": round(val_acc, 5)}
                validated = average.module
                val_loss, val_acc, _ = evaluate_split(
                    validated, val_set, mean, std, recipe.label_smoothing, len(classes)
                )
            record = {
                "epoch": epoch,
                "steps": progress.step,
                "train_loss": round(train_loss, 5),
                "train_acc": round(train_acc, 5),
                "val_loss": round(val_loss, 5),
                "val_acc": round(val_acc, 5),
                **raw,
                "lr": round(optimizer.param_groups[0]["lr"], 6),
                "epoch_time_s": round(time.perf_counter() - epoch_start, 2),
                "images_per_s": round(seen / train_time, 1),
                "best": val_acc > best_acc,
            }
            if val_acc > best_acc:
                best_acc = val_acc
                meta.val_accuracy, meta.epoch = round(val_acc, 5), epoch
                meta.train_config["steps"] = progress.step
                meta.created = datetime.now(UTC).isoformat(timespec="seconds")
                best.keep(validated, meta)
            saved = best.save(force=progress.done)
            history.append(record)
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            if budget_end is not None:
                label = f" ({min(1.0, progress()):.0%} of the budget)"
            else:  # loss-ranked sampling makes epochs shorter than planned: the steps tell how far it is
                label = f"/{recipe.epochs}" if last_loss is None else f" ({min(1.0, progress()):.0%} of the steps)"
            note = "  -> new best" if record["best"] else ""
            if saved:
                note += " checkpoint saved" if record["best"] else f"  -> best so far (epoch {best.meta.epoch}) saved"
                note += f" to {args.out}"
            print(
                f"epoch {epoch:3d}{label}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.4f}  val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}  "
                f"lr {record['lr']:.5f}  {record['epoch_time_s']:.1f}s  {record['images_per_s']:.0f} img/s{note}",
                flush=True,
            )
    except BaseException:  # Ctrl-C, SIGTERM (see main), out of memory...
        best.save(force=True)  # the best epoch so far, if any, is on disk before we stop
        raise

    best.save(force=True)
    model.load_state_dict(best.state)
    meta = copy.deepcopy(best.meta)
    meta.test_flip = recipe.test_flip
    calibrate(model, meta, val_set, unknown_val, recipe.unknown_loss, unknown_source(args))
    save_checkpoint(args.out, model, meta)
    checkpoint_ready_s = time.perf_counter() - started
    plot_curves(history, plot_path)
    summary = {
        "checkpoint": str(args.out),
        "val_accuracy": meta.val_accuracy,  # as the checkpoint answers (test_flip included)
        "val_accuracy_best_epoch": best.meta.val_accuracy,  # the images alone, which chose the epoch
        "test_flip": meta.test_flip,
        "unknown": meta.unknown,
        "best_epoch": meta.epoch,
        "temperature": meta.temperature,
        "confidence_map": meta.confidence_map,
        "preset": preset,
        "variant": recipe.variant,
        "device": str(device),
        "wall_time_s": round(time.perf_counter() - started, 1),  # data loading to the plot written
        "data_load_s": round(data_load_s, 2),
        "checkpoint_ready_s": round(checkpoint_ready_s, 2),  # data loading to the calibrated checkpoint
        "log": str(log_path),
        "curves": str(plot_path),
        "epochs": epoch,  # the last one may be partial on a time budget
        "steps": progress.step,
        "batch_size": recipe.batch_size,
        "budget_clock": args.budget_clock,
        "cpu_time_s": round(time.process_time(), 1),
        "machine": describe_machine(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 under ATEN_CPU_CAPABILITY=avx2
        "torch": str(torch.__version__),
    }
    beside(args.out, ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, `kill`, a job runner: stop like Ctrl-C does
    try:
        train(args)
    except (DataError, ValueError, PretrainedWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; the best checkpoint so far (if any) is intact at {args.out} "
            "(not yet calibrated: temperature 1.0)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
