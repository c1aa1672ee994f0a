"""Training side: data sources and their errors, the real train/evaluate CLIs, checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
import signal
import subprocess

import numpy as np
import pytest
import torch
import torchvision
from conftest import PYTHON, ROOT, free_ports, run_cli, start_server
from PIL import Image
from synthetic import class_images, encode, write_image_folder
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bench.flip_tta import flip_accuracies
from cifar3.checkpoint import CheckpointError, ModelMeta, load_checkpoint, save_checkpoint
from cifar3.classes import CIFAR10_CLASSES, DEFAULT_CLASSES, parse_classes
from cifar3.hardware import AVX2_ENV
from cifar3.inference import (
    fit_confidence_map,
    fit_temperature,
    inference_dtype,
    native_bfloat16,
    predict_logits,
    prepare_for_inference,
)
from cifar3.model import VARIANTS, PretrainedWeightsError, build_model, imagenet_weights_path, load_imagenet_weights
from cifar3.preprocessing import CIFAR10_MEAN, CIFAR10_STD, decode_image, normalize, pil_to_uint8
from cifar3.unknown import calibrate_confidence
from training.corruptions import CORRUPTIONS, UPSCALED_SIZE, write_corrupted_folders
from training.data import DEFAULT_DATA_ROOT, DataError, limit_per_class, load_split, resolve_classes, stratified_split
from training.evaluate import expected_calibration_error, validation_split
from training.reporting import beside, report_file, write_report
from training.train import (
    PHOTO_DEFECTS,
    BestSnapshot,
    Progress,
    Recipe,
    SmallMapConv2d,
    augment,
    ema_start,
    epoch_flips,
    epoch_sample,
    make_objective,
    one_cycle,
    photo_defects,
    train_epoch,
    training_layout,
)

CLASSES = ["airplane", "automobile", "ship"]


# --- data sources -------------------------------------------------------------------------------


def test_cifar_batches_keep_only_requested_classes_in_list_order(cifar_dir):
    train = load_split(str(cifar_dir), ["ship", "airplane"], "train")
    test = load_split(str(cifar_dir.parent), ["ship", "airplane"], "test")  # the parent folder works too
    assert train.images.shape == (60, 3, 32, 32) and train.images.dtype == torch.uint8
    assert sorted(train.labels.tolist()) == [0] * 30 + [1] * 30
    assert len(test) == 20
    # label 0 is "ship" (green images), label 1 "airplane" (blue): order follows --classes, not CIFAR's.
    green = train.images[train.labels == 0].float().mean((0, 2, 3))
    assert green[1] > green[0] and green[1] > green[2]


def test_image_folder_is_read_with_labels_by_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=5, fmt="jpg")
    data = load_split(str(root), CLASSES, "test")
    assert len(data) == 15 and data.labels.bincount().tolist() == [5, 5, 5]
    assert data.paths[0].endswith("airplane/0000.jpg")


def test_training_decodes_an_exif_rotated_photo_as_the_server_does(tmp_path):
    # Upright: red top half, blue bottom half. Stored turned a quarter to the left, with the EXIF orientation
    # (6: turn 90 degrees clockwise to display) that a phone writes.
    upright = np.zeros((64, 64, 3), np.uint8)
    upright[:32, :, 0], upright[32:, :, 2] = 255, 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    for c in CLASSES:
        (tmp_path / c).mkdir()
        stored.save(tmp_path / c / "photo.jpg", quality=95, exif=exif)
    data = load_split(str(tmp_path), CLASSES, "train")
    served = pil_to_uint8(decode_image((tmp_path / "ship" / "photo.jpg").read_bytes()))
    assert torch.equal(data.images[CLASSES.index("ship")], served)
    top, bottom = served[:, :16].float().mean((1, 2)), served[:, 16:].float().mean((1, 2))
    assert top[0] > 200 > top[2] + 150 and bottom[2] > 200 > bottom[0] + 150  # red above blue: turned upright


def test_more_classes_can_be_configured(cifar_dir):
    classes = parse_classes("airplane,automobile,ship,truck")
    assert load_split(str(cifar_dir), classes, "train").labels.unique().tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "data path not found"),
        (lambda p: write_image_folder(p / "two", 3, classes=("airplane", "ship")), "no folder for class automobile"),
        (lambda p: [(p / "e" / c).mkdir(parents=True) for c in CLASSES] and p / "e", "no images"),
    ],
    ids=["missing-path", "missing-class-folder", "no-images"],
)
def test_data_errors_say_what_is_wrong(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_split(str(make(tmp_path)), CLASSES, "train")


def test_unreadable_images_are_counted_and_named(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=3)
    (root / "ship" / "broken.png").write_bytes(b"not a png")
    (root / "airplane" / "cut.png").write_bytes((root / "airplane" / "0000.png").read_bytes()[:40])
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*airplane/cut.png.*ship/broken.png"):
        load_split(str(root), CLASSES, "train")


def write_own_classes(root, per_class: int) -> None:
    """An image folder with classes of the user's own, not CIFAR-10's: songbird (blue noise), lorry (red)."""
    for name, colour_of in (("songbird", "airplane"), ("lorry", "automobile")):
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(class_images(colour_of, per_class)):
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")


def test_cifar_class_names_are_checked_for_cifar_sources_only(cifar_dir, tmp_path):
    for source in ("cifar10", str(cifar_dir)):  # "cifar10": refused before any download
        with pytest.raises(ValueError, match="unknown class name.*zebra.*CIFAR-10 has airplane"):
            resolve_classes(source, "airplane,zebra")
    assert resolve_classes(str(cifar_dir)) == list(DEFAULT_CLASSES)
    assert resolve_classes(str(cifar_dir), "truck,bird") == ["truck", "bird"]
    folder = write_image_folder(tmp_path / "mine", 1, classes=("zebra", "airplane"))
    assert resolve_classes(str(folder), "zebra,airplane") == ["zebra", "airplane"]
    with pytest.raises(ValueError, match="at least two distinct"):
        parse_classes("zebra,zebra")


def test_an_image_folders_classes_are_its_sub_folders_sorted_unless_classes_picks_them(tmp_path):
    root = tmp_path / "mine"
    write_own_classes(root, per_class=2)
    (root / ".thumbnails").mkdir()  # hidden folders and loose files are not classes
    (root / "notes.txt").write_text("x")
    assert resolve_classes(str(root)) == ["lorry", "songbird"]
    assert resolve_classes(str(root), "songbird,lorry") == ["songbird", "lorry"]
    data = load_split(str(root), ["songbird", "lorry"], "train")
    assert data.paths[0].endswith("songbird/0000.png") and data.labels.tolist() == [0, 0, 1, 1]
    # Unknown images kept beside the class folders are --unknown-data, never a class.
    write_own_classes(tmp_path / "elsewhere", per_class=1)
    (tmp_path / "elsewhere" / "songbird").rename(root / "other")
    assert resolve_classes(str(root), unknown_data=str(root / "other")) == ["lorry", "songbird"]
    assert resolve_classes(str(root)) == ["lorry", "other", "songbird"]
    with pytest.raises(DataError, match="--classes names other, the --unknown-data folder"):
        resolve_classes(str(root), "lorry,other", unknown_data=str(root / "other"))
    with pytest.raises(DataError, match="--unknown-data is the --data folder itself"):
        resolve_classes(str(root), unknown_data=str(root))
    one = write_image_folder(tmp_path / "one", 1, classes=("lorry",))
    with pytest.raises(DataError, match=r"needs one sub-folder per class, at least two \(found: lorry\)"):
        resolve_classes(str(one))


@pytest.mark.cli
def test_cifar10_download_failure_is_a_clear_message(tmp_path):
    """torchvision's CIFAR-10 download, made to fail for sure (a proxy nobody listens on, so nothing is
    fetched on a machine that is online): the CLI says to pass a local path instead, without a traceback."""
    closed = free_ports(1)[0]
    proxy = {name: f"http://127.0.0.1:{closed}" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    out = tmp_path / "x.pt"
    result = run_cli(
        PYTHON, "-m", "training.train", "--data", "cifar10", "--data-root", str(tmp_path / "data"),
        "--out", str(out), "--limit", "5", "--epochs", "1", env={**proxy, "no_proxy": "", "NO_PROXY": ""},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "could not download CIFAR-10" in result.stderr and "Pass --data PATH" in result.stderr
    assert not out.exists()


def test_split_is_stratified_and_seeded(cifar_dir):
    data = load_split(str(cifar_dir), CLASSES, "train")
    train_a, val_a = stratified_split(data, 0.2, seed=1)
    train_b, val_b = stratified_split(data, 0.2, seed=1)
    assert torch.equal(val_a.images, val_b.images) and len(train_a) + len(val_a) == len(data)
    assert val_a.labels.bincount().tolist() == [6, 6, 6]
    assert limit_per_class(data, 4, seed=0).labels.bincount().tolist() == [4, 4, 4]


# --- model and checkpoint -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_maps_32px_images_to_class_logits(variant):
    model = build_model(variant, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def trained_looking_model(variant: str) -> torch.nn.Module:
    """A fresh model whose BatchNorms hold non-trivial running statistics, as after training."""
    torch.manual_seed(0)
    model = build_model(variant, 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_model_folds_batchnorm_and_computes_the_same_function(variant):
    model = trained_looking_model(variant)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        prepared = prepare_for_inference(model)
        got = prepared(images)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy was folded


def test_inference_dtype_names_and_auto():
    cpu = torch.device("cpu")
    assert inference_dtype("float32", cpu) == torch.float32 and inference_dtype("bfloat16", cpu) == torch.bfloat16
    assert inference_dtype("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)
    with pytest.raises(ValueError, match="choose auto, float32, bfloat16"):
        inference_dtype("int8", cpu)


def test_bfloat16_model_is_close_to_float32_and_the_same_at_any_batch_size():
    model = trained_looking_model("resnet18_fast")
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    bf16 = prepare_for_inference(model, torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    one_by_one = predict_logits(bf16, images, CIFAR10_MEAN, CIFAR10_STD, batch_size=1).softmax(1)
    together = predict_logits(bf16, images, CIFAR10_MEAN, CIFAR10_STD).softmax(1)
    float32 = predict_logits(prepare_for_inference(model), images, CIFAR10_MEAN, CIFAR10_STD).softmax(1)
    assert torch.allclose(one_by_one, together, atol=1e-4)  # served batches of any size agree with evaluate
    assert torch.allclose(together, float32, atol=0.05) and not torch.equal(together, float32)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = build_model("resnet18_fast", 3).eval()
    meta = ModelMeta("resnet18_fast", CLASSES, 32, list(CIFAR10_MEAN), list(CIFAR10_STD), temperature=1.7,
                     confidence_map=[1.4, -1.1])  # fmt: skip
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, meta)
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled code
    assert set(raw) == {"format_version", "meta", "state_dict"}
    rebuilt, meta2 = load_checkpoint(path)
    assert meta2 == meta
    logits = torch.randn(6, 3)
    assert torch.equal(meta2.scores(logits)[0], calibrate_confidence((logits / 1.7).softmax(1), [1.4, -1.1]))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write leaves no temp file behind


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    meta = ModelMeta("resnet18_fast", CLASSES, 32, list(CIFAR10_MEAN), list(CIFAR10_STD), val_accuracy=0.5)
    save_checkpoint(path, build_model("resnet18_fast", 3), meta)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, build_model("resnet18_fast", 3), meta)
    assert load_checkpoint(path)[1].val_accuracy == 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_best_snapshot_writes_at_most_every_interval_and_on_force(tmp_path):
    path = tmp_path / "best.pt"
    meta = ModelMeta("resnet18_fast", CLASSES, 32, list(CIFAR10_MEAN), list(CIFAR10_STD))
    best = BestSnapshot(path, every_s=3600)
    assert not best.save(force=True)  # nothing kept yet: nothing to write
    model = build_model("resnet18_fast", 3)
    meta.epoch = 1
    best.keep(model, meta)
    assert best.save() and load_checkpoint(path)[1].epoch == 1  # the first best is written at once
    with torch.no_grad():
        model.fc.bias.fill_(7.0)  # the kept copy must not follow the live model
    meta.epoch = 2
    best.keep(model, meta)
    meta.epoch = 99  # nor later changes to the caller's metadata
    assert not best.save() and load_checkpoint(path)[1].epoch == 1  # within the interval: kept in memory
    assert best.save(force=True)  # the end of training, or Ctrl-C
    rebuilt, saved_meta = load_checkpoint(path)
    assert saved_meta.epoch == 2 and torch.equal(rebuilt.fc.bias, torch.full((3,), 7.0))
    assert not best.save(force=True)  # already on disk


def test_normalize_takes_per_channel_lists_or_tensors():
    batch = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    from_lists = normalize(batch, list(CIFAR10_MEAN), list(CIFAR10_STD))
    from_tensors = normalize(batch, torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD))
    assert torch.equal(from_lists, from_tensors)
    assert torch.allclose(from_lists[:, 0], (batch[:, 0].float() / 255 - CIFAR10_MEAN[0]) / CIFAR10_STD[0])


def test_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a cifar3 checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_temperature_scaling_softens_overconfident_logits():
    labels = torch.tensor([0, 1, 2] * 20)
    logits = torch.nn.functional.one_hot(labels, 3).float() * 20
    logits[::4] = logits[::4].roll(1, dims=1)  # a quarter confidently wrong
    temperature = fit_temperature(logits, labels)
    assert temperature > 2


def label_smoothed_predictions(n: int, seed: int, a: float = 1.6, b: float = -1.2):
    """3-class probabilities whose top-label confidence c is right with chance sigmoid(a logit(c) + b): with
    a > 1 and b < 0, middling confidences too high and near-certain ones too low, as label smoothing leaves
    them; one temperature cannot fix both."""
    gen = torch.Generator().manual_seed(seed)
    top = 0.4 + 0.6 * torch.rand(n, generator=gen) ** 0.25  # most near 1, like a trained model's
    right = torch.rand(n, generator=gen) < torch.sigmoid(a * torch.logit(top) + b)
    labels = torch.randint(0, 3, (n,), generator=gen)
    predicted = torch.where(right, labels, (labels + torch.randint(1, 3, (n,), generator=gen)) % 3)
    split = torch.rand(n, generator=gen)  # how the other two classes share the rest
    others = torch.stack([split, 1 - split], 1) * (1 - top).unsqueeze(1)
    probs = torch.zeros(n, 3)
    probs[torch.arange(n), predicted] = top
    rest = torch.tensor([[j for j in range(3) if j != k] for k in predicted.tolist()])
    probs.scatter_(1, rest, others)
    return probs, labels


def test_top_label_confidence_map_fixes_what_a_temperature_cannot():
    probs, labels = label_smoothed_predictions(20_000, seed=0)
    confidence_map = fit_confidence_map(probs, labels)
    assert confidence_map[0] == pytest.approx(1.6, abs=0.15) and confidence_map[1] == pytest.approx(-1.2, abs=0.3)
    fresh, fresh_labels = label_smoothed_predictions(20_000, seed=1)
    calibrated = calibrate_confidence(fresh, confidence_map)
    before = expected_calibration_error(fresh.numpy(), fresh_labels.numpy())
    after = expected_calibration_error(calibrated.numpy(), fresh_labels.numpy())
    assert before > 0.03 and after < 0.01
    # same predictions, still probabilities
    assert torch.equal(calibrated.argmax(1), fresh.argmax(1))
    assert torch.allclose(calibrated.sum(1), torch.ones(len(fresh)), atol=1e-5)
    # the order of confidences kept, where the runner-up does not hold the top class up (above 0.8 it cannot)
    confident = fresh.max(1).values >= 0.8
    order = fresh.max(1).values[confident].argsort()
    assert (calibrated.max(1).values[confident][order].diff() >= 0).all()


def test_confidence_map_keeps_the_prediction_at_the_edges():
    probs = torch.tensor([[0.34, 0.33, 0.33], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.45, 0.44, 0.11]])
    saturated = torch.tensor([30.0, 0.0, 0.0]).softmax(0)  # the others ~1e-13 each
    # maps that lower every confidence a lot, one from a typical fit, one that raises every confidence
    for confidence_map in ([0.05, -3.0], [0.2, -3.0], [1.6, -1.2], [5.0, 4.0]):
        for batch in (probs, torch.cat([probs, saturated[None]]), probs.bfloat16()):
            calibrated = calibrate_confidence(batch, confidence_map)
            assert torch.isfinite(calibrated).all() and (calibrated >= 0).all()
            assert torch.allclose(calibrated.sum(1), torch.ones(len(batch)), atol=1e-5)
            top = calibrated.max(1).values
            assert (calibrated[:, 0] == top).all() and (calibrated[:, 1:] < top[:, None]).all(), confidence_map
        two_classes = calibrate_confidence(torch.tensor([[1.0, 0.0], [0.7, 0.3]]), confidence_map)
        assert (two_classes.argmax(1) == 0).all() and (two_classes[:, 1] < two_classes[:, 0]).all()
    assert torch.equal(calibrate_confidence(probs, []), probs)  # checkpoints without a map
    logits = torch.randn(5, 3, requires_grad=True)  # explanations take gradients through it
    calibrate_confidence(logits.softmax(1), [1.6, -1.2])[:, 1].sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_no_confidence_map_where_the_data_cannot_support_one():
    probs, labels = label_smoothed_predictions(2_000, seed=2)
    assert fit_confidence_map(probs, probs.argmax(1)) == []  # every prediction right
    assert fit_confidence_map(probs, (probs.argmax(1) + 1) % 3) == []  # every prediction wrong
    few_wrong = probs.argmax(1).clone()
    few_wrong[probs.max(1).values.argsort()[:10]] += 1  # 10 wrong, the least confident: too few, and a step
    assert fit_confidence_map(probs, few_wrong % 3) == []
    assert len(fit_confidence_map(probs, labels)) == 2


# --- the CLIs ------------------------------------------------------------------------------------


def test_train_cli_smoke_writes_checkpoint_log_and_curves(tiny_checkpoint):
    _, meta = load_checkpoint(tiny_checkpoint)
    assert meta.classes == CLASSES and meta.variant == "resnet18_pool" and meta.image_size == 32
    assert 0.0 <= meta.val_accuracy <= 1.0 and meta.temperature > 0 and meta.created
    assert meta.confidence_map == [] or meta.confidence_map[0] > 0
    assert meta.train_config["epochs"] == 4 and meta.train_config["preset"] == "cpu"
    records = [json.loads(line) for line in tiny_checkpoint.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and records[-1]["steps"] == 20  # 162 images, 5 steps each
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s"} <= set(records[0])
    assert Image.open(tiny_checkpoint.with_suffix(".curves.png")).size[0] > 200


@pytest.mark.cli
def test_training_is_reproducible(tmp_path, image_folder):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.pt"
        result = run_cli(
            PYTHON,
            "-m",
            "training.train",
            "--data",
            str(image_folder),
            "--out",
            str(out),
            "--limit",
            "12",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--variant",
            "resnet18_imagenet",
        )
        assert result.returncode == 0, result.stderr
        outs.append(torch.load(out, weights_only=True)["state_dict"])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


@pytest.mark.cli
def test_time_budget_is_used_to_its_end(tmp_path, image_folder):
    """The schedule is stretched over the budget: training stops when the budget (less the calibration's
    reserve) is used, not a whole epoch early; the steps taken are recorded for replaying with --steps."""
    out = tmp_path / "budget.pt"
    result = run_cli(
        PYTHON, "-m", "training.train", "--data", str(image_folder), "--out", str(out), "--preset", "gpu-fast",
        "--device", "cpu", "--variant", "resnet18_imagenet", "--limit", "10", "--batch-size", "8",
        "--time-budget", "9",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "as many steps as fit in a 9 s budget (wall clock)" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert summary["epochs"] == len(records) and summary["steps"] == records[-1]["steps"]
    # Used to its end less the reserve (two validation passes + 2 s, a third of so short a budget); the upper
    # bound is loose because on a busy machine one step and the last validation can each take seconds.
    assert 0.6 * 9 <= summary["checkpoint_ready_s"] <= 9 + 30
    assert load_checkpoint(out)[1].train_config["steps"] <= summary["steps"]


@pytest.mark.cli
def test_steps_replays_a_schedule_without_the_clock(tmp_path, image_folder):
    out = tmp_path / "steps.pt"
    result = run_cli(PYTHON, "-m", "training.train", "--data", str(image_folder), "--out", str(out), "--limit", "10",
                     "--batch-size", "8", "--variant", "resnet18_imagenet", "--steps", "5")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "training 5 steps (2 epochs)" in result.stdout  # 27 training images: 3 full batches per epoch
    records = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert records[0]["steps"] == 3 and records[-1]["steps"] == 5  # later epochs: loss-ranked sampling
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 5
    # trained on its classes alone: the post-hoc energy score, its threshold accepting 95% of the validation images
    unknown = load_checkpoint(out)[1].unknown
    assert unknown["method"] == "post-hoc" and unknown["score"] == "energy" and unknown["known_accepted"] >= 0.95
    assert "auroc" not in unknown and unknown["validation_images"]["unknown"] == 0


def test_one_cycle_has_torchs_one_cycle_shape():
    """The progress-driven schedule follows torch's OneCycleLR (learning rate and momentum) step by step."""
    recipe = Recipe("resnet18_fast", epochs=1, batch_size=8, lr=0.2, weight_decay=0, label_smoothing=0,
                    crop_padding=0, cutout=0, warmup=0.25)  # fmt: skip
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2, momentum=0.9)
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.2, total_steps=1000, pct_start=0.25)
    for step in range(1000):
        lr, momentum = one_cycle(step / 1000, recipe)
        group = optimizer.param_groups[0]
        assert lr == pytest.approx(group["lr"], abs=0.002), step  # 1% of the peak: steps vs a fraction
        assert momentum == pytest.approx(group["momentum"], abs=2e-3), step
        optimizer.step()
        reference.step()
    assert one_cycle(0.25, recipe) == pytest.approx((0.2, 0.85)) and one_cycle(1.0, recipe)[0] < 1e-5


def test_progress_counts_steps_or_the_budgets_clock():
    by_steps = Progress(steps=4)
    by_steps.step = 3
    assert by_steps() == 0.75 and not by_steps.done
    assert not Progress(budget_end=0.0).done  # out of time before the first step: it still trains one
    now = [100.0]
    timed = Progress(budget_end=200.0, clock=lambda: now[0])  # 100 s left; 3% reserved until measured
    now[0] = 148.5
    assert timed() == pytest.approx(0.5) and not timed.done
    timed.reserve_for(validation_s=4.0)  # 2 x 4 s + 2 s kept for the last validation, calibration and save
    timed.step = 1
    now[0] = 190.0
    assert timed() == pytest.approx(1.0) and timed.done
    # test-time flip doubles the calibration's passes; an unknown split as large as the known one doubles them again
    timed.reserve_for(validation_s=4.0, calibration=4.0)  # (1 + 4) x 4 s + 2 s
    assert timed() == pytest.approx(90.0 / 78.0) and timed.done
    now[0] = 178.0
    assert timed() == pytest.approx(1.0)


def test_progressive_resizing_trains_small_inputs_first(image_folder):
    """low_res=24 until half-way: the network sees 24x24 batches, then 32x32 ones."""
    recipe = Recipe("resnet18_fast", epochs=1, batch_size=10, lr=0.05, weight_decay=0, label_smoothing=0,
                    crop_padding=4, cutout=0, warmup=0.25, low_res=24, low_res_until=0.5)  # fmt: skip
    data = load_split(str(image_folder), CLASSES, "train")
    model = build_model("resnet18_fast", 3)
    sizes = []
    model.conv1.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[-1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    progress = Progress(steps=4)
    seen = train_epoch(model, optimizer, progress, data.images[:40], data.labels[:40], recipe, gen, mean, std,
                       False, "test", make_objective(recipe, 3))[2]  # fmt: skip
    assert sizes == [24, 24, 32, 32] and seen == 40 and progress.done


def test_alternating_flip_shows_each_image_both_ways_in_every_two_epochs():
    """augment flips exactly the known images it is told to (unknown ones after them at random), and
    epoch_flips gives each image the other orientation in the next epoch and the same one two epochs on."""
    recipe = Recipe("resnet18_fast", epochs=1, batch_size=8, lr=0.05, weight_decay=0, label_smoothing=0,
                    crop_padding=0, cutout=0, warmup=0.25)  # fmt: skip
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    first = torch.tensor([True, False, True, True, False, False])  # the first 6 are known, 2 unknown
    out = augment(images, recipe, torch.Generator().manual_seed(0), first)
    for i, flipped in enumerate(first.tolist()):
        assert torch.equal(out[i], images[i].flip(2) if flipped else images[i])
    assert all(torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(2)) for i in (6, 7))
    assert torch.equal(epoch_flips(first, 1), first) and torch.equal(epoch_flips(first, 3), first)
    assert torch.equal(epoch_flips(first, 2), ~first) and torch.equal(epoch_flips(first, 4), ~first)


def test_loss_ranked_sampling_keeps_hard_and_untrained_images_and_records_each_loss(image_folder):
    """epoch_sample keeps an image with a probability rising from easy_keep (lowest last loss) to 1 (highest),
    and always one not yet trained; train_epoch trains only the drawn images and records their losses."""
    loss = torch.cat([torch.arange(1000.0), torch.full((10,), torch.inf)])
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([epoch_sample(loss, 0.2, gen) for _ in range(200)]).float().mean(0)
    assert kept[1000:].eq(1).all()
    assert kept[:100].mean() == pytest.approx(0.24, abs=0.02) and kept[900:1000].mean() == pytest.approx(0.95, abs=0.02)
    assert epoch_sample(loss, 1.0, gen).all()
    recipe = Recipe("resnet18_fast", epochs=1, batch_size=10, lr=0.05, weight_decay=0, label_smoothing=0,
                    crop_padding=4, cutout=0, warmup=0.25, easy_keep=0.1)  # fmt: skip
    data = load_split(str(image_folder), CLASSES, "train")
    model = build_model("resnet18_fast", 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    last_loss = torch.full((40,), torch.inf)
    args = (data.images[:40], data.labels[:40], recipe, gen, mean, std, False, "test", make_objective(recipe, 3))
    assert train_epoch(model, optimizer, Progress(steps=100), *args, last_loss=last_loss)[2] == 40
    assert last_loss.isfinite().all() and last_loss.gt(0).all()
    last_loss[:20], last_loss[20:] = 0.0, torch.inf  # 10-54% of the first 20 are drawn, all of the others
    seen = [train_epoch(model, optimizer, Progress(steps=100), *args, last_loss=last_loss.clone())[2] for _ in range(4)]
    assert all(n in (20, 30) for n in seen)  # whole batches of 10


def test_easy_keep_outside_its_range_is_a_cli_error(tmp_path, capsys):
    from training.train import main

    for value in ("0", "1.5"):
        assert main(["--data", str(tmp_path), "--out", str(tmp_path / "x.pt"), "--easy-keep", value]) == 2
        assert capsys.readouterr().err == "error: --easy-keep must be in (0, 1]\n"


def test_weight_average_starts_at_full_size_input_and_follows_each_step(image_folder):
    """The average's first update copies the weights of the first full-size step (nothing from the 24x24 half);
    each later one moves it by 1 - decay towards the new weights."""
    recipe = Recipe("resnet18_fast", epochs=1, batch_size=10, lr=0.05, weight_decay=0, label_smoothing=0,
                    crop_padding=4, cutout=0, warmup=0.25, low_res=24, low_res_until=0.5, ema=0.75)  # fmt: skip
    assert ema_start(recipe) == 0.5 and ema_start(Recipe(**{**recipe.__dict__, "low_res": 0})) == 0.5
    data = load_split(str(image_folder), CLASSES, "train")
    model = build_model("resnet18_fast", 3)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    after_step = []
    optimizer.register_step_post_hook(lambda *_: after_step.append(model.fc.weight.detach().clone()))
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
    train_epoch(model, optimizer, Progress(steps=4), data.images[:40], data.labels[:40], recipe, gen, mean, std,
                False, "test", make_objective(recipe, 3), average=average)  # fmt: skip
    assert len(after_step) == 4 and average.n_averaged.item() == 2  # steps 3 and 4 are at 32x32
    expected = 0.75 * after_step[2] + 0.25 * after_step[3]
    assert torch.allclose(average.module.fc.weight, expected, atol=1e-6)
    assert not torch.allclose(average.module.fc.weight, after_step[3], atol=1e-4)
    bn = average.module.bn1.running_mean
    assert not torch.equal(bn, torch.zeros_like(bn))  # BatchNorm statistics are averaged too


@pytest.mark.cli
def test_ema_run_validates_and_keeps_the_average_and_logs_the_raw_weights(tmp_path, image_folder):
    out = tmp_path / "ema.pt"
    result = run_cli(PYTHON, "-m", "training.train", "--data", str(image_folder), "--out", str(out), "--limit", "10",
                     "--batch-size", "8", "--variant", "resnet18_imagenet", "--steps", "9", "--ema", "0.5",
                     "--weight-decay", "0.002", "--easy-keep", "1", "--no-test-flip")  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    # 3 steps an epoch, averaging from step 5 (half-way at 24x24 input): epochs 2 and 3 validate the average
    assert "raw_val_acc" not in records[0] and all("raw_val_acc" in r for r in records[1:])
    meta = load_checkpoint(out)[1]
    assert meta.train_config["ema"] == 0.5 and meta.train_config["weight_decay"] == 0.002
    assert not meta.test_flip  # so what the checkpoint answers is what chose the epoch:
    assert meta.val_accuracy == max(r["val_acc"] for r in records)


@pytest.mark.cli
def test_bfloat16_autocast_only_where_native():
    """Under the AVX2 emulation (an ordinary CPU) training stays in float32 even on a CPU with AVX512-BF16."""
    code = "import torch; from cifar3.inference import native_bfloat16; print(native_bfloat16(torch.device('cpu')))"
    emulated = run_cli(PYTHON, "-c", code, env=AVX2_ENV)
    assert emulated.returncode == 0, emulated.stderr
    assert emulated.stdout.strip() == "False"
    native = run_cli(PYTHON, "-c", code)
    assert native.stdout.strip() == str(native_bfloat16(torch.device("cpu")))


@pytest.mark.parametrize(
    ("variant", "bf16", "nchw_layer4", "small_maps"),
    [("resnet18_pool", False, True, True), ("resnet18_pool", True, False, False), ("resnet18_fast", False, True, True),
     ("resnet18_imagenet", False, True, True), ("resnet18_cifar", False, False, False)],
)  # fmt: skip
@pytest.mark.parametrize("size", [32, 16])
def test_training_layout_keeps_small_layer4_maps_nchw_in_float32_on_cpu(variant, bf16, nchw_layer4, small_maps, size):
    torch.manual_seed(0)
    plain = build_model(variant, 3).eval()
    laid = training_layout(build_model(variant, 3), bf16).eval()
    laid.load_state_dict(plain.state_dict())
    for (name, a), b in zip(laid.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # same names, same values, whatever the layout
    conv3, conv4, weight1 = laid.layer3[1].conv2, laid.layer4[1].conv2, laid.layer1[0].conv1.weight
    assert weight1.is_contiguous(memory_format=torch.channels_last) and not weight1.is_contiguous()
    # small maps: layer4's weight tap-major and layer3's channels_last, else NCHW exactly where expected
    assert isinstance(conv4, SmallMapConv2d) is small_maps and isinstance(conv3, SmallMapConv2d) is small_maps
    assert conv4.weight.is_contiguous() is (nchw_layer4 and not small_maps)
    assert conv4.weight.permute(2, 3, 1, 0).is_contiguous() is small_maps
    assert conv3.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    laid.layer4.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    laid.layer4.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    x = torch.randn(8, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(laid(x), plain(x), rtol=1e-4, atol=1e-4)
    # layer4's input side (its stride halves it)
    side = {"resnet18_cifar": 8, "resnet18_imagenet": 2}.get(variant, 4) * size // 32
    assert seen == [side, nchw_layer4]  # layer4 got its input in NCHW exactly where its weights are
    laid.train(), plain.train()
    laid(x).square().sum().backward(), plain(x).square().sum().backward()
    for (name, p), q in zip(laid.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3, msg=name)  # training learns the same


@pytest.mark.parametrize("tap_major", [True, False])
@pytest.mark.parametrize("side", [2, 1, 3])
def test_small_map_conv_equals_the_convolution_and_its_gradients(side, tap_major):
    """On 2x2 and 1x1 maps the tap products; on other sizes the ordinary convolution it falls back to."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False)
    fast = copy.deepcopy(conv)
    if not tap_major:
        fast.to(memory_format=torch.channels_last)
    assert SmallMapConv2d.fits(fast) and not SmallMapConv2d.fits(nn.Conv2d(16, 24, 3, stride=2, padding=1))
    SmallMapConv2d.adopt(fast, tap_major)
    assert torch.equal(fast.weight, conv.weight) and fast.weight.permute(2, 3, 1, 0).is_contiguous() is tap_major
    x = torch.randn(5, 16, side, side, requires_grad=True)
    out, expected = fast(x), conv(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(
        torch.autograd.grad(out, (x, fast.weight), grad), torch.autograd.grad(expected, (x, conv.weight), grad),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


# --- --pretrained ----------------------------------------------------------------------------------


def no_network_env(tmp_path) -> dict:
    """An empty TORCH_HOME and a proxy nobody listens on: no download can happen, online or not."""
    closed = free_ports(1)[0]
    proxy = {name: f"http://127.0.0.1:{closed}" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}
    return {**proxy, "no_proxy": "", "NO_PROXY": "", "TORCH_HOME": str(tmp_path / "torch-home")}


def fake_imagenet_weights() -> dict[str, torch.Tensor]:
    """Random weights in the shapes of torchvision's ImageNet ResNet18 (1000 classes, 7x7 stem)."""
    return torchvision.models.resnet18(weights=None).state_dict()


def test_pretrained_loads_every_matching_layer_from_the_cache(tmp_path, monkeypatch):
    """Random weights saved under torchvision's file name in TORCH_HOME stand in for the real download."""
    for name, value in no_network_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    path = imagenet_weights_path()
    assert path.is_relative_to(tmp_path / "torch-home") and path.name.startswith("resnet18-")
    path.parent.mkdir(parents=True)
    imagenet = fake_imagenet_weights()
    torch.save(imagenet, path)
    model = build_model("resnet18_fast", 3)
    untouched = model.state_dict()["layer4.1.conv2.weight"].clone()
    loaded, skipped = load_imagenet_weights(model)
    assert skipped == ["conv1.weight", "fc.bias", "fc.weight"]  # 3x3 stem and 3-class head differ in shape
    assert len(loaded) == len(imagenet) - 3
    state = model.state_dict()
    assert all(torch.equal(state[name], imagenet[name]) for name in loaded)
    assert not torch.equal(state["layer4.1.conv2.weight"], untouched)
    assert len(load_imagenet_weights(build_model("resnet18_imagenet", 3))[0]) == len(imagenet) - 2  # its stem fits


@pytest.mark.cli
def test_pretrained_offline_is_one_clear_error_naming_the_file(tmp_path, monkeypatch, image_folder):
    env = no_network_env(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PretrainedWeightsError, match="put the file at .*torch-home/hub/checkpoints/resnet18-"):
        load_imagenet_weights(build_model("resnet18_fast", 3))
    train = [PYTHON, "-m", "training.train", "--data", str(image_folder), "--out", str(tmp_path / "p.pt"),
             "--limit", "10", "--epochs", "1", "--pretrained"]  # fmt: skip
    result = run_cli(*train, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: --pretrained: could not load")
    assert str(imagenet_weights_path()) in result.stderr
    imagenet_weights_path().parent.mkdir(parents=True, exist_ok=True)  # the failed download may have made it
    torch.save(fake_imagenet_weights(), imagenet_weights_path())
    result = run_cli(*train, env=env)
    assert result.returncode == 0, result.stderr
    assert f"--pretrained: {len(fake_imagenet_weights()) - 3} ImageNet tensors loaded" in result.stdout
    assert load_checkpoint(tmp_path / "p.pt")[1].train_config["pretrained"] == "IMAGENET1K_V1"


# --- corrupted copies of the validation split ------------------------------------------------------


def test_corrupted_folders_change_the_pixels_and_keep_the_labels(tmp_path, image_folder):
    data = limit_per_class(load_split(str(image_folder), CLASSES, "train"), 2, seed=0)
    names = write_corrupted_folders(data, CLASSES, tmp_path / "c", seed=0)
    assert names == ["clean", *CORRUPTIONS] and len(CORRUPTIONS) == 11
    clean = load_split(str(tmp_path / "c" / "clean"), CLASSES, "test")
    assert torch.equal(clean.images, data.images) and torch.equal(clean.labels, data.labels)  # lossless
    for name in CORRUPTIONS:
        corrupted = load_split(str(tmp_path / "c" / name), CLASSES, "test")  # read as an upload is: resized to 32
        assert torch.equal(corrupted.labels, data.labels), name
        if name != "upscaled":  # bicubic up and down again: nearly the same pixels
            assert (corrupted.images.float() - data.images.float()).abs().mean() > 2, name
    with Image.open(next((tmp_path / "c" / "upscaled" / "ship").iterdir())) as large:
        assert large.size == (UPSCALED_SIZE, UPSCALED_SIZE)
    again = tmp_path / "again"
    write_corrupted_folders(data, CLASSES, again, seed=0)  # the same command writes the same pixels
    noisy = next((tmp_path / "c" / "shot_noise" / "ship").iterdir())
    assert noisy.read_bytes() == (again / "shot_noise" / "ship" / noisy.name).read_bytes()


@pytest.mark.cli
def test_corruptions_cli_evaluates_each_folder_like_evaluate(tmp_path, tiny_checkpoint):
    report = tmp_path / "report" / "corruptions-0.5"  # a dot in the name stays in the report's file names
    result = run_cli(PYTHON, "-m", "training.corruptions", "--checkpoint", str(tiny_checkpoint), "--out",
                     str(tmp_path / "c"), "--evaluate", str(tiny_checkpoint), "--report", str(report))  # fmt: skip
    assert result.returncode == 0, result.stderr
    accuracy = json.loads(result.stdout.strip().splitlines()[-1])[str(tiny_checkpoint)]
    validation = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(tiny_checkpoint), "--validation",
                         "--report-dir", str(tmp_path / "val"))  # fmt: skip
    assert accuracy["clean"] == json.loads(validation.stdout.strip().splitlines()[-1])["accuracy"]
    blur = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(tiny_checkpoint), "--data",
                   str(tmp_path / "c" / "blur"), "--report-dir", str(tmp_path / "blur"))  # fmt: skip
    assert accuracy["blur"] == json.loads(blur.stdout.strip().splitlines()[-1])["accuracy"]
    mean = sum(accuracy[name] for name in CORRUPTIONS) / len(CORRUPTIONS)
    assert accuracy["mean_corrupted"] == pytest.approx(mean, abs=1e-5)
    table = (tmp_path / "report" / "corruptions-0.5.md").read_text()
    assert all(f"| {name} |" in table for name in ["clean", *CORRUPTIONS]) and "mean over corruptions" in table
    assert json.loads((tmp_path / "report" / "corruptions-0.5.json").read_text())["n"] == 18


@pytest.mark.cli
def test_sigterm_stops_training_with_the_best_epoch_on_disk(tmp_path, image_folder):
    out = tmp_path / "term.pt"
    cmd = [PYTHON, "-u", "-m", "training.train", "--data", str(image_folder), "--out", str(out), "--limit", "10",
           "--batch-size", "8", "--variant", "resnet18_imagenet", "--epochs", "500"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:  # wait for a finished epoch, then stop the run as `timeout` or `kill` would
            if line.startswith("epoch   2 "):
                proc.send_signal(signal.SIGTERM)
                break
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted; the best checkpoint so far" in stderr and "Traceback" not in stderr
    _, meta = load_checkpoint(out)  # the best of the finished epochs, written before exiting
    assert meta.epoch in (1, 2) and meta.val_accuracy is not None


@pytest.mark.cli
def test_train_cli_errors_are_one_clear_line(tmp_path):
    result = run_cli(
        PYTHON, "-m", "training.train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: data path not found")
    result = run_cli(PYTHON, "-m", "training.train", "--classes", "airplane,unicorn", "--out", str(tmp_path / "x.pt"))
    assert result.returncode == 2 and "unknown class name(s): unicorn" in result.stderr


@pytest.mark.cli
def test_train_help_documents_every_flag():
    result = run_cli(PYTHON, "-m", "training.train", "--help")
    for flag in (
        "--data",
        "--out",
        "--classes",
        "--device",
        "--preset",
        "--epochs",
        "--limit",
        "--seed",
        "--val-fraction",
        "--low-res-until",
        "--warmup",
    ):
        assert flag in result.stdout


@pytest.mark.cli
def test_evaluate_cli_writes_report_and_ends_with_json(tmp_path, tiny_checkpoint, cifar_dir, image_folder):
    report = tmp_path / "report"
    result = run_cli(
        PYTHON,
        "-m",
        "training.evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(image_folder),
        "--report-dir",
        str(report),
        "--predictions",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((report / "metrics.json").read_text())
    assert summary["n"] == metrics["n"] == 180  # an image folder is evaluated whole
    assert summary["accuracy"] == metrics["accuracy"]
    assert "precision" in result.stdout and "recall" in result.stdout
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == 180
    assert np.trace(matrix) / 180 == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert set(metrics["per_class"]["ship"]) == {"precision", "recall", "f1-score", "support"}
    assert 0.0 <= metrics["ece"] <= 1.0
    assert Image.open(report / "confusion_matrix.png").size[0] > 200
    rows = (report / "predictions.csv").read_text().splitlines()
    assert len(rows) == 181 and rows[0] == "path,label,pred_class,airplane,automobile,ship,unknown_score,unknown"
    # The test split of a CIFAR folder is used for cifar-style sources.
    result = run_cli(
        PYTHON,
        "-m",
        "training.evaluate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--data",
        str(cifar_dir),
        "--report-dir",
        str(tmp_path / "r2"),
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 30


@pytest.fixture(scope="module")
def own_classes_checkpoint(tmp_path_factory):
    """The README's training command, quick mode, on an image folder of classes CIFAR-10 does not have (no
    --classes: the folder's sub-folders are the classes)."""
    root = tmp_path_factory.mktemp("own") / "images"
    write_own_classes(root, per_class=20)
    out = root.parent / "checkpoints" / "cifar3.pt"
    result = run_cli(PYTHON, "-m", "training.train", "--data", str(root), "--out", str(out),
                     "--epochs", "2", "--batch-size", "8", "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.cli
def test_own_classes_train_and_evaluate_under_their_folder_names(own_classes_checkpoint, tmp_path):
    _, meta = load_checkpoint(own_classes_checkpoint)
    assert meta.classes == ["lorry", "songbird"]
    report = tmp_path / "report"
    result = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(own_classes_checkpoint), "--data",
                     meta.train_config["data"], "--report-dir", str(report), "--predictions")  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == metrics["n"] == 40
    assert metrics["classes"] == ["lorry", "songbird"] and metrics["per_class"]["songbird"]["support"] == 20
    rows = (report / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,label,pred_class,lorry,songbird")
    labels = {row.split(",")[0].split("/")[-2]: row.split(",")[1] for row in rows[1:]}  # folder -> its label
    assert labels == {"lorry": "lorry", "songbird": "songbird"}
    validation = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(own_classes_checkpoint),
                         "--validation", "--report-dir", str(tmp_path / "validation"))  # fmt: skip
    summary = json.loads(validation.stdout.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["accuracy"] == pytest.approx(meta.val_accuracy, abs=1e-4)


@pytest.mark.server
@pytest.mark.slow
def test_own_classes_are_archived_served_and_answered(own_classes_checkpoint, tmp_path):
    """scripts/archive.sh and a real TorchServe: the answer and the description name the folder's classes."""
    store = tmp_path / "store"
    archived = run_cli("bash", str(ROOT / "scripts" / "archive.sh"), str(own_classes_checkpoint),
                       env={"MODEL_STORE": str(store)})  # fmt: skip
    assert archived.returncode == 0, archived.stdout[-2000:] + archived.stderr[-2000:]
    server = start_server(tmp_path / "ts", store)
    try:
        client = server.client()
        answer = client.predict(encode(Image.fromarray(class_images("airplane", 1, seed=5)[0])))
        described = client.describe(customized=True)["customizedMetadata"]
    finally:
        server.stop()
    assert list(answer.probs) == ["lorry", "songbird"] and answer.pred_class in answer.probs
    assert sum(answer.probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert described["classes"] == ["lorry", "songbird"]


@pytest.mark.cli
def test_calibrate_switches_test_flip_and_refits_what_answers_depend_on(tiny_checkpoint, tmp_path):
    one_view = tmp_path / "one-view.pt"
    result = run_cli(PYTHON, "-m", "training.calibrate", "--checkpoint", str(tiny_checkpoint), "--no-test-flip",
                     "--out", str(one_view))  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["before"]["test_flip"] is True and line["after"]["test_flip"] is False
    (flip_model, flip_meta), (model, meta) = load_checkpoint(tiny_checkpoint), load_checkpoint(one_view)
    assert all(torch.equal(a, b) for a, b in zip(flip_model.state_dict().values(), model.state_dict().values()))
    assert not meta.test_flip and meta.temperature != flip_meta.temperature
    assert meta.unknown["threshold"] != flip_meta.unknown["threshold"]
    assert meta.unknown["validation_images"] == flip_meta.unknown["validation_images"]  # the same splits
    # what the checkpoint now says of its validation split is what evaluate measures on it, answering one view
    report = tmp_path / "report"
    evaluated = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(one_view), "--validation",
                        "--dtype", "float32", "--report-dir", str(report))  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["test_flip"] is False and metrics["accuracy"] == pytest.approx(meta.val_accuracy, abs=1e-4)
    # and back: the calibration training wrote
    assert run_cli(PYTHON, "-m", "training.calibrate", "--checkpoint", str(one_view), "--test-flip").returncode == 0
    back = load_checkpoint(one_view)[1]
    assert back.test_flip and back.val_accuracy == flip_meta.val_accuracy
    # 18 validation images, all but a few right: the NLL is nearly flat in T, so the fit ends wherever LBFGS's
    # tolerance does, and training computed the logits in its own memory layout
    assert back.temperature == pytest.approx(flip_meta.temperature, rel=0.05)
    assert back.unknown["threshold"] == pytest.approx(flip_meta.unknown["threshold"], rel=0.05)


@pytest.mark.cli
def test_calibrate_keeps_a_checkpoint_without_an_unknown_record_answering_without_a_threshold(
    own_classes_checkpoint, tmp_path
):
    model, meta = load_checkpoint(own_classes_checkpoint)  # no other-class output, trained without unknown images
    old = tmp_path / "old.pt"
    save_checkpoint(old, model, dataclasses.replace(meta, unknown={}))  # as written before unknown images
    result = run_cli(PYTHON, "-m", "training.calibrate", "--checkpoint", str(old), "--no-test-flip",
                     "--data", meta.train_config["data"])  # fmt: skip
    assert result.returncode == 0, result.stderr
    switched = load_checkpoint(old)[1]
    assert switched.unknown == {} and not switched.test_flip and switched.train_config["test_flip"] is False


@pytest.mark.cli
def test_calibrate_errors_are_one_clear_line(tmp_path):
    result = run_cli(PYTHON, "-m", "training.calibrate", "--checkpoint", str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:") and "checkpoint not found" in result.stderr


@pytest.mark.cli
def test_evaluate_cli_missing_checkpoint(tmp_path):
    result = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", "x")
    assert result.returncode == 2 and result.stderr.startswith("error: checkpoint not found")
    assert "Traceback" not in result.stderr


def test_no_constant_is_retyped_outside_its_module():
    """Normalisation constants live in cifar3/preprocessing.py and class names in cifar3/classes.py; no other
    module spells them out: a model's classes and their order come from its checkpoint, a CIFAR source's labels
    from its own batches.meta, looked up by name."""
    import ast

    owners = {ROOT / "cifar3" / "classes.py", ROOT / "cifar3" / "preprocessing.py"}
    modules = [p for folder in ("cifar3", "handler", "ui", "scripts", "training", "bench")
               for p in sorted((ROOT / folder).rglob("*.py")) if p not in owners]  # fmt: skip
    assert len(modules) > 30 and ROOT / "handler" / "cifar3_handler.py" in modules
    for path in modules:
        text = path.read_text()
        assert "0.4914" not in text and "0.2470" not in text, path
        strings = {node.value for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Constant)}
        assert not strings & set(CIFAR10_CLASSES), f"{path} spells out class names {strings & set(CIFAR10_CLASSES)}"


@pytest.mark.cli
def test_evaluate_validation_split_reproduces_the_selection_accuracy(tmp_path, tiny_checkpoint):
    result = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(tiny_checkpoint), "--validation",
                     "--report-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    _, meta = load_checkpoint(tiny_checkpoint)
    assert summary["n"] == 18  # 10% of 180, stratified
    assert summary["accuracy"] == pytest.approx(meta.val_accuracy, abs=1e-4)


def test_report_files_keep_a_dot_in_the_report_name(tmp_path):
    assert report_file(tmp_path / "lr-0.1", ".json") == tmp_path / "lr-0.1.json"
    assert report_file(tmp_path / "budget.md", ".json") == tmp_path / "budget.json"  # the same report
    write_report(tmp_path / "new" / "photo-0.25", {"accuracy": 0.9}, "| table |\n")
    assert sorted(path.name for path in (tmp_path / "new").iterdir()) == ["photo-0.25.json", "photo-0.25.md"]
    assert json.loads((tmp_path / "new" / "photo-0.25.json").read_text()) == {"accuracy": 0.9}
    # a checkpoint's own files: its name's .pt replaced, or the suffix appended to a name without it
    assert beside(tmp_path / "cifar3.pt", ".summary.json") == tmp_path / "cifar3.summary.json"
    assert beside(tmp_path / "lr-0.1", ".log.jsonl") == tmp_path / "lr-0.1.log.jsonl"


@pytest.mark.slow
def test_budget_trains_the_preset_emulated_within_each_scaled_budget(tmp_path, image_folder):
    """training.budget: a probe and one budgeted run per budget, all on torch's AVX2 kernels, one table."""
    report = tmp_path / "budget-0.6"
    result = run_cli(PYTHON, "-m", "training.budget", "--data", str(image_folder), "--minutes", "0.6",
                     "--probe-seconds", "0.5", "--jobs", "1", "--checkpoints", str(tmp_path),
                     "--report", str(report))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "budget-0.6.json").read_text())
    assert data["probe"]["capability"] == "AVX2" and data["scale"] == pytest.approx(107 / data["probe"]["rate"], 1e-3)
    (run,) = data["runs"]
    assert run["cpu_budget_s"] == pytest.approx((0.6 * 60 - 30) * data["scale"], abs=0.1)
    summary = run["summary"]
    assert summary["budget_clock"] == "cpu" and summary["steps"] >= 1 and summary["cpu_capability"] == "AVX2"
    assert summary["cpu_time_s"] >= run["cpu_budget_s"] * 0.5  # the budget was used, not skipped
    assert (tmp_path / "budget-avx2-0.6min.pt").is_file()
    assert "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m training.train" in run["command"]
    assert "| 0.6 min |" in (tmp_path / "budget-0.6.md").read_text()


def test_photo_defects_touch_about_their_share_and_each_defect_changes_an_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (400, 3, 32, 32), dtype=torch.uint8, generator=gen)
    assert torch.equal(photo_defects(images, 0.0, gen), images)
    out = photo_defects(images, 0.5, gen)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    changed = (out != images).flatten(1).any(1).float().mean().item()
    assert 0.4 < changed < 0.6, changed
    # Every defect, on its own, changes a smooth image but keeps it an image of the same size.
    smooth = torch.nn.functional.avg_pool2d(images[:8].float(), 5, stride=1, padding=2)
    for name, defect in PHOTO_DEFECTS.items():
        result = defect(smooth.clone(), gen)
        assert result.shape == smooth.shape, name
        assert (result - smooth).abs().mean() > 0.5, name


# --- flip test-time augmentation (bench/flip_tta.py) ----------------------------------------------------------


def test_flip_tta_scores_the_images_their_mirrors_and_the_average(tiny_checkpoint, tmp_path):
    model, meta = load_checkpoint(tiny_checkpoint)
    data = validation_split(meta, DEFAULT_DATA_ROOT)
    got = flip_accuracies(model, meta, data)
    mirrored = flip_accuracies(model, meta, dataclasses.replace(data, images=data.images.flip(-1)))
    # mirroring the images swaps what the images and their mirrors score and leaves the average as it was
    assert (mirrored["images"], mirrored["mirror images"]) == (got["mirror images"], got["images"])
    assert mirrored["flip TTA"] == got["flip TTA"]
    result = run_cli(PYTHON, "-m", "bench.flip_tta", str(tiny_checkpoint), "--report", str(tmp_path / "tta-0.1"))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "tta-0.1.json").read_text())
    assert [row["n"] for row in report["rows"]] == [len(data)]
    assert report["rows"][0]["accuracy"] == pytest.approx(got)
    assert report["mean_gain"] == pytest.approx(got["flip TTA"] - got["images"])
