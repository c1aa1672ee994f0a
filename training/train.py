"""Train the cifar3 ResNet18 and write a checkpoint (state dict + metadata).

    python -m training.train --data ../shared/data/cifar3/train --out checkpoints/cifar3.pt

Presets (the device picks gpu or cpu unless --preset says otherwise):

- ``gpu``: 32x32-stem ResNet18, bf16 autocast, channels_last, data and augmentation on the GPU,
  200 epochs (72-95 s on one H200). ``gpu-fast``: the same, as many epochs as fit in 20 s.
- ``cpu``: the stride-2-stem variant, sized to finish in about 12 minutes on 2 cores.

Every epoch logs train/validation loss and accuracy, learning rate, time and images/s, to stdout
and as JSON lines (``<out>.log.jsonl``) with a training-curve plot (``<out>.curves.png``). The best
epoch on the validation split is checkpointed atomically (at most every 5 s, always at the end and when
stopped early: Ctrl-C, SIGTERM); a temperature is then fitted on the validation split for calibrated
probabilities. Quick mode for tests: ``--limit 50 --epochs 1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from cifar3.checkpoint import ModelMeta, save_checkpoint
from cifar3.classes import DEFAULT_CLASSES, parse_classes
from cifar3.inference import fit_temperature, memory_format, predict_logits
from cifar3.model import VARIANTS, build_model
from cifar3.preprocessing import CIFAR10_MEAN, CIFAR10_STD, IMAGE_SIZE, normalize
from training.data import DEFAULT_DATA_ROOT, DataError, Dataset, limit_per_class, load_split, stratified_split


@dataclass
class Recipe:
    variant: str
    epochs: int
    batch_size: int
    lr: float  # peak learning rate of the one-cycle schedule
    weight_decay: float
    label_smoothing: float
    crop_padding: int  # pixels of random translation (reflect-padded crop)
    cutout: int  # side of the zeroed square, pixels; 0 = off
    warmup: float  # fraction of steps spent ramping up to lr
    time_budget_min: float | None = None  # wall-clock budget: train as many epochs (<= epochs) as fit


# Hyperparameters of the recipes; the README's "Measured results" says what each reached, where.
# One H200: 98.3-98.4% validation in 72-95 s (200 epochs at ~33-47k img/s); 100 epochs gave 97.9%.
GPU_RECIPE = Recipe("resnet18_cifar", epochs=200, batch_size=512, lr=0.4, weight_decay=5e-4,
                    label_smoothing=0.1, crop_padding=4, cutout=12, warmup=0.25)  # fmt: skip
PRESETS = {
    "gpu": GPU_RECIPE,
    # The same recipe, as many epochs as fit in 20 s of wall time (data loading and calibration included):
    # 22-47 epochs and 96.1-96.9% validation on one H200.
    "gpu-fast": replace(GPU_RECIPE, epochs=100, time_budget_min=20 / 60),
    # 2-core CPU: the stride-2 stem (4x cheaper) and a 14-minute budget; ~8 epochs fit at 146 img/s.
    "cpu": Recipe("resnet18_fast", epochs=10, batch_size=128, lr=0.2, weight_decay=5e-4,
                  label_smoothing=0.1, crop_padding=4, cutout=0, warmup=0.25, time_budget_min=14.0),
}  # fmt: skip


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
        default=",".join(DEFAULT_CLASSES),
        help="comma-separated CIFAR-10 class names; label i is the i-th name",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--preset",
        choices=["auto", *PRESETS],
        default="auto",
        help="training recipe; auto = gpu on CUDA, cpu otherwise; gpu-fast = gpu within a 20 s budget",
    )
    p.add_argument("--variant", choices=list(VARIANTS), help="override the preset's model variant")
    p.add_argument("--epochs", type=int, help="override the preset's epoch count (and its time budget)")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="train as many epochs as fit in this wall time (cpu preset: 14, gpu-fast: 1/3; 0 = no budget)",
    )
    p.add_argument("--batch-size", type=int, help="override the preset's batch size")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
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


def augment(images: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """Batched on the data's device: random reflect-padded crop, horizontal flip, optional cutout."""
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
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)
    if recipe.cutout:
        half = recipe.cutout // 2
        cy = torch.randint(0, h, (n, 1, 1), generator=gen, device=dev)
        cx = torch.randint(0, w, (n, 1, 1), generator=gen, device=dev)
        ys, xs = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
        hole = ((ys - cy).abs() <= half) & ((xs - cx).abs() <= half)
        images = images * (~hole).unsqueeze(1)
    return images


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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    recipe: Recipe,
    gen: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a uint8 batch, augmented and normalized on its device, bf16 autocast on a
    GPU: (loss, logits), both still on the device (reading them would wait for the GPU)."""
    device = images.device
    inputs = normalize(augment(images, recipe, gen), mean, std).contiguous(memory_format=memory_format(device))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        outputs = model(inputs)
        loss = criterion(outputs.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), outputs.detach()


def probe_epoch_seconds(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, mean, std, val: Dataset
) -> float:
    """Seconds one epoch (training + validation) will take here, timed on a throwaway copy of the model."""
    probe = copy.deepcopy(model).train()
    optimizer = build_optimizer(probe, recipe)  # the same update as in training
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    gen = torch.Generator(images.device).manual_seed(0)
    batch = min(recipe.batch_size, len(images))

    def step() -> None:
        train_step(probe, optimizer, criterion, images[:batch], labels[:batch], recipe, gen, mean, std)

    def sync() -> None:
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: allocator, kernels (and cuDNN's algorithm search on a GPU)
    sync()
    start, steps = time.perf_counter(), 0
    while steps < 3 or time.perf_counter() - start < 0.5:  # a GPU step is milliseconds: time enough of them
        step()
        steps += 1
        if steps % 4 == 0:
            sync()
    sync()
    per_image = (time.perf_counter() - start) / (steps * batch)
    evaluate_split(probe, val, mean, std, 0.0)  # warm-up: the validation batch shapes
    start = time.perf_counter()
    evaluate_split(probe, val, mean, std, 0.0)
    validation = time.perf_counter() - start
    # + 10%: per-epoch logging and syncs, the odd save, and a GPU's rate varying by ~10% epoch to epoch
    return 1.10 * (per_image * len(images) + validation)


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
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.kept = state, copy.deepcopy(meta)  # one assignment: weights and metadata always match
        self.unsaved = True

    def save(self, force: bool = False) -> bool:
        """Write the kept weights if they are new and (force or) the interval has passed; True if written."""
        if not self.unsaved or not (force or time.perf_counter() - self.saved_at >= self.every_s):
            return False
        save_checkpoint(self.path, *self.kept)
        self.unsaved, self.saved_at = False, time.perf_counter()
        return True


def plan_epochs(budget_s: float, elapsed_s: float, per_epoch_s: float, cap: int) -> int:
    """Epochs that fit in what is left of a wall-time budget, keeping 10% of it (at most 20 s) for the
    calibration and the last save; at least 1, at most ``cap`` (the preset's epochs)."""
    reserve = min(20.0, 0.1 * budget_s)
    return max(1, min(cap, int((budget_s - elapsed_s - reserve) / per_epoch_s)))


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    gen: torch.Generator,
    mean: torch.Tensor,
    std: torch.Tensor,
    desc: str,
) -> tuple[float, float, int]:
    """One pass over the shuffled training images (the last partial batch dropped), augmented on their
    device: (mean loss, accuracy, images seen). Nothing in the loop waits for a GPU: losses and hits
    are summed on the device and read once at the end."""
    device = images.device
    model.train()
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    order = torch.randperm(len(images), generator=gen, device=device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = 0
    steps = max(1, len(images) // recipe.batch_size)
    for step in tqdm(range(steps), desc=desc, unit="batch", disable=None, leave=False):
        idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        targets = labels[idx]
        loss, outputs = train_step(model, optimizer, criterion, images[idx], targets, recipe, gen, mean, std)
        scheduler.step()
        loss_sum += loss * len(idx)
        correct += (outputs.argmax(1) == targets).sum()
        seen += len(idx)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the steps above were only queued
    return loss_sum.item() / seen, correct.item() / seen, seen


def evaluate_split(
    model: nn.Module, data: Dataset, mean, std, label_smoothing: float
) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, logits) on a held-out split."""
    model.eval()
    logits = predict_logits(model, data.images, mean, std)
    loss = nn.functional.cross_entropy(logits, data.labels, label_smoothing=label_smoothing).item()
    return loss, (logits.argmax(1) == data.labels).float().mean().item(), logits


def describe_machine(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or '<CPU model>, N cores', for reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "CPU"
    return f"{cpu}, {os.cpu_count()} cores"


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
    overrides = {"variant": args.variant, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    recipe = Recipe(**{**asdict(PRESETS[preset]), **{k: v for k, v in overrides.items() if v is not None}})
    if args.epochs is not None:
        recipe.time_budget_min = None  # explicit epochs win
    if args.time_budget is not None:
        recipe.time_budget_min = args.time_budget or None
    classes = parse_classes(args.classes)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator(device).manual_seed(args.seed)  # shuffling and augmentation, on the data's device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape throughout: pick the fastest kernels once
    started = time.perf_counter()

    data = limit_per_class(load_split(args.data, classes, "train", args.data_root), args.limit, args.seed)
    train_set, val_set = stratified_split(data, args.val_fraction, args.seed)
    print(
        f"data: {data.source}: {len(train_set)} train / {len(val_set)} validation images, "
        f"classes {classes}; preset {preset} on {device}: {asdict(recipe)}",
        flush=True,
    )
    train_images, train_labels = train_set.images.to(device), train_set.labels.to(device)
    data_load_s = time.perf_counter() - started
    mean, std = list(CIFAR10_MEAN), list(CIFAR10_STD)
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)  # copied once, not per step

    model = build_model(recipe.variant, len(classes)).to(device, memory_format=memory_format(device))
    optimizer = build_optimizer(model, recipe)
    steps_per_epoch = max(1, len(train_set) // recipe.batch_size)  # drop the last partial batch
    if recipe.time_budget_min:
        budget = recipe.time_budget_min * 60
        per_epoch = probe_epoch_seconds(model, train_images, train_labels, recipe, mean_t, std_t, val_set)
        recipe.epochs = plan_epochs(budget, time.perf_counter() - started, per_epoch, recipe.epochs)
        print(
            f"time budget {budget:.0f} s: ~{per_epoch:.2f}s per epoch measured, training {recipe.epochs} epochs",
            flush=True,
        )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(  # needs a few steps per phase: pad tiny runs
        optimizer, max_lr=recipe.lr, total_steps=max(8, recipe.epochs * steps_per_epoch), pct_start=recipe.warmup
    )

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
        },
    )
    log_path, plot_path = args.out.with_suffix(".log.jsonl"), args.out.with_suffix(".curves.png")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    history: list[dict] = []
    best_acc = -1.0
    best = BestSnapshot(args.out)
    try:
        for epoch in range(1, recipe.epochs + 1):
            epoch_start = time.perf_counter()
            train_loss, train_acc, seen = train_epoch(
                model,
                optimizer,
                scheduler,
                train_images,
                train_labels,
                recipe,
                gen,
                mean_t,
                std_t,
                f"epoch {epoch}/{recipe.epochs}",
            )
            train_time = time.perf_counter() - epoch_start
            val_loss, val_acc, _ = evaluate_split(model, val_set, mean, std, recipe.label_smoothing)
            record = {
                "epoch": epoch,
                "train_loss": round(train_loss, 5),
                "train_acc": round(train_acc, 5),
                "val_loss": round(val_loss, 5),
                "val_acc": round(val_acc, 5),
                "lr": round(scheduler.get_last_lr()[0], 6),
                "epoch_time_s": round(time.perf_counter() - epoch_start, 2),
                "images_per_s": round(seen / train_time, 1),
                "best": val_acc > best_acc,
            }
            if val_acc > best_acc:
                best_acc = val_acc
                meta.val_accuracy, meta.epoch = round(val_acc, 5), epoch
                meta.created = datetime.now(UTC).isoformat(timespec="seconds")
                best.keep(model, meta)
            saved = best.save(force=epoch == recipe.epochs)
            history.append(record)
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            note = "  -> new best" if record["best"] else ""
            if saved:
                note += " checkpoint saved" if record["best"] else f"  -> best so far (epoch {best.meta.epoch}) saved"
                note += f" to {args.out}"
            print(
                f"epoch {epoch:3d}/{recipe.epochs}  train loss {record['train_loss']:.4f} "
                f"acc {record['train_acc']:.4f}  val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}  "
                f"lr {record['lr']:.5f}  {record['epoch_time_s']:.1f}s  {record['images_per_s']:.0f} img/s{note}",
                flush=True,
            )
    except BaseException:  # Ctrl-C, SIGTERM (see main), out of memory...
        best.save(force=True)  # the best epoch so far, if any, is on disk before we stop
        raise

    # Calibrate the best epoch's model on the validation split; the handler divides logits by T.
    model.load_state_dict(best.state)
    meta = copy.deepcopy(best.meta)
    _, _, val_logits = evaluate_split(model, val_set, mean, std, 0.0)
    meta.temperature = round(fit_temperature(val_logits, val_set.labels), 5)
    save_checkpoint(args.out, model, meta)
    checkpoint_ready_s = time.perf_counter() - started
    plot_curves(history, plot_path)
    summary = {
        "checkpoint": str(args.out),
        "val_accuracy": meta.val_accuracy,
        "best_epoch": meta.epoch,
        "temperature": meta.temperature,
        "preset": preset,
        "variant": recipe.variant,
        "device": str(device),
        "wall_time_s": round(time.perf_counter() - started, 1),  # data loading to the plot written
        "data_load_s": round(data_load_s, 2),
        "checkpoint_ready_s": round(checkpoint_ready_s, 2),  # data loading to the calibrated checkpoint
        "log": str(log_path),
        "curves": str(plot_path),
        "epochs": recipe.epochs,
        "machine": describe_machine(device),
        "torch": str(torch.__version__),
    }
    args.out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, `kill`, a job runner: stop like Ctrl-C does
    try:
        train(args)
    except (DataError, ValueError) as exc:
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
