"""Images that are none of the classes: the score, the stored threshold, training with unknowns, evaluate's
figures, and the answers of a real TorchServe."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import requests
import torch
from conftest import PYTHON, run_cli
from PIL import Image
from synthetic import UNKNOWN_COLOURS, class_images, encode, sample_image

from cifar3.checkpoint import FORMAT_VERSION, ModelMeta, load_checkpoint, save_checkpoint
from cifar3.engine import Engine, load_engine, predict_scores
from cifar3.model import build_model
from cifar3.preprocessing import CIFAR10_MEAN, CIFAR10_STD
from cifar3.unknown import ENERGY, OTHER_CLASS, decision, fit_threshold, split_scores
from training.data import Dataset
from training.evaluate import evaluate
from training.train import build_parser, unknown_source
from training.unknowns import (
    CHECK_KINDS,
    SYNTHETIC_KINDS,
    load_unknowns,
    rejection_figures,
    synthetic_unknowns,
    write_check_set,
)

CLASSES = ["airplane", "automobile", "ship"]


# -- the score and the decision ---------------------------------------------------------------------------


def test_other_class_score_is_the_other_outputs_probability_and_probs_stay_over_the_classes():
    logits = torch.tensor([[2.0, 0.5, -1.0, 5.0], [0.0, 0.0, 0.0, -5.0]])
    probs, score = split_scores(logits, 3, 2.0, {"score": OTHER_CLASS})
    assert torch.allclose(probs, torch.softmax(logits[:, :3] / 2.0, 1))
    assert torch.allclose(score, torch.softmax(logits / 2.0, 1)[:, 3])
    assert score[0] > 0.5 > score[1]


def test_energy_score_is_minus_logsumexp_and_is_the_default_of_old_checkpoints():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.2]])
    probs, score = split_scores(logits, 3, 1.0, {})
    assert torch.allclose(score, -torch.logsumexp(logits, 1))
    assert score[0] < score[1]  # strong evidence for a class: lower score
    assert torch.allclose(probs.sum(1), torch.ones(2))


def test_threshold_accepts_at_least_the_asked_share_and_no_more_than_needed():
    scores = torch.arange(100, dtype=torch.float32)
    threshold = fit_threshold(scores, 0.95)
    assert threshold == 94.0 and int((scores <= threshold).sum()) == 95
    assert fit_threshold(torch.tensor([0.3]), 0.95) == pytest.approx(0.3)


def test_decision_from_checkpoint_override_or_none():
    stored = {"score": OTHER_CLASS, "threshold": 0.4, "known_accepted": 0.95}
    assert decision(stored) == decision(stored, None)
    assert (decision(stored).threshold, decision(stored).source) == (0.4, "checkpoint")
    override = decision(stored, 0.9)
    assert (override.threshold, override.source) == (0.9, "model-config")
    assert override.is_unknown(0.91) and not override.is_unknown(0.9)
    old = decision({})
    assert (old.score, old.threshold, old.source) == (ENERGY, None, "none") and not old.is_unknown(1e9)
    with pytest.raises(ValueError, match="finite"):
        decision(stored, "nan")


def test_rejection_figures_on_a_case_with_a_known_answer():
    known, unknown = torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.tensor([2.5, 4.0, 5.0, 6.0])
    figures = rejection_figures(known, unknown, threshold=2.0)
    # accepted: 0, 1, 2 of the known; rejected: every unknown. AUROC: 2.5 outranks 3 of 4 known, the rest all 4.
    assert figures == {"known_accepted": 0.75, "unknown_rejected": 1.0, "auroc": 0.9375}


class BrightnessEngine(Engine):
    """A real Engine whose other-class probability is the image's mean brightness: a model with a known answer."""

    name, dtype, device = "brightness", torch.float32, torch.device("cpu")

    def __call__(self, batch):
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        brightness = (batch * std + mean).mean((1, 2, 3)).clamp(1e-4, 1 - 1e-4)
        # softmax over [0, 0, 0, z] gives the last output sigmoid(z - log 3): choose z so that it is the brightness
        other = torch.logit(brightness) + math.log(3)
        return torch.cat([torch.zeros(len(batch), 3), other.view(-1, 1)], 1)

    @property
    def threads(self):
        return 1


def flat_images(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()


def test_evaluate_reports_auroc_and_rejected_share_per_source_on_a_known_answer():
    meta = ModelMeta("resnet18_pool", CLASSES, 32, list(CIFAR10_MEAN), list(CIFAR10_STD),
                     unknown={"score": OTHER_CLASS, "threshold": 0.5})  # fmt: skip
    known = flat_images([10, 20, 30, 40])
    unknown = Dataset(flat_images([35, 200, 210, 220]), torch.tensor([0, 0, 1, 1]), "made here")
    unknown.sources = ["dim", "bright"]
    metrics, probs, scores = evaluate(BrightnessEngine(), meta, known, torch.tensor([0, 1, 2, 0]), unknown)
    figures = metrics["unknown"]
    assert scores == pytest.approx([10 / 255, 20 / 255, 30 / 255, 40 / 255], abs=1e-4)
    assert figures["known_accepted"] == 1.0 and figures["unknown_rejected"] == 0.75
    assert figures["auroc"] == 0.9375  # 35 outranks 3 of the 4 known images, the others all of them
    assert figures["per_source"]["dim"] == {"n": 2, "known_accepted": 1.0, "unknown_rejected": 0.5, "auroc": 0.875}
    assert figures["per_source"]["bright"]["unknown_rejected"] == 1.0
    assert probs.shape == (4, 3)


# -- data ---------------------------------------------------------------------------------------------------


def test_unknown_folder_of_any_layout_is_read_with_its_top_level_sources(tmp_path, unknown_folder):
    data = load_unknowns(str(unknown_folder), tmp_path)
    assert data.sources == sorted(UNKNOWN_COLOURS) and len(data) == 120
    assert torch.bincount(data.labels).tolist() == [60, 60]


def test_cifar_source_gives_its_other_classes(cifar_dir, tmp_path):
    data = load_unknowns(str(cifar_dir), tmp_path, "test", CLASSES)
    assert data.sources == ["bird", "cat", "deer", "dog", "frog", "horse", "truck"]
    assert len(data) == 7 * 10


def test_synthetic_unknowns_are_uint8_images_and_shuffled_tiles_keep_their_pixels():
    known = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    unknown = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    images = synthetic_unknowns(12, known, torch.Generator().manual_seed(0), unknown)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    assert len(SYNTHETIC_KINDS) == 6  # two of each, in SYNTHETIC_KINDS order
    for image in images[6:8]:  # shuffled tiles of the one known image
        tiles = {image[:, y : y + 8, x : x + 8].numpy().tobytes() for y in range(0, 32, 8) for x in range(0, 32, 8)}
        source = {known[0, :, y : y + 8, x : x + 8].numpy().tobytes() for y in range(0, 32, 8) for x in range(0, 32, 8)}
        assert tiles == source
        assert not torch.equal(image, known[0])
    assert images[4:6].float().std((2, 3)).max() < 10  # flat colours: almost no variation within a channel
    assert len(synthetic_unknowns(12, known, torch.Generator().manual_seed(0))) == 12  # no unknown images: tiles


def test_check_set_writes_every_kind(tmp_path, unknown_folder):
    written = write_check_set(tmp_path / "check", 3, crops_from=unknown_folder)
    assert written == dict.fromkeys(CHECK_KINDS, 3)
    for kind in CHECK_KINDS:
        with Image.open(next((tmp_path / "check" / kind).iterdir())) as image:
            assert image.mode == "RGB"


# -- training and old checkpoints -------------------------------------------------------------------------------


def train_quick(cifar_dir, out, *extra):
    done = run_cli(PYTHON, "-m", "training.train", "--data", str(cifar_dir), "--out", str(out), "--steps", "2",
                   "--batch-size", "16", "--device", "cpu", "--synthetic-unknowns", "8", *extra)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return load_checkpoint(out)


@pytest.mark.cli
def test_a_cifar_source_trains_with_its_other_classes_unless_told_not_to(cifar_dir, tmp_path):
    model, meta = train_quick(cifar_dir, tmp_path / "with.pt")
    assert meta.unknown["score"] == OTHER_CLASS and meta.num_outputs == 4 and model.fc.out_features == 4
    assert meta.unknown["validation_images"]["unknown"] > 0 and 0 <= meta.unknown["auroc"] <= 1
    assert meta.unknown["known_accepted"] >= 0.95 and meta.train_config["unknown_data"] == str(cifar_dir)
    parse = build_parser().parse_args
    assert unknown_source(parse(["--data", str(cifar_dir), "--no-unknown-data"])) is None
    assert unknown_source(parse(["--data", "cifar10"])) == "cifar10"
    assert unknown_source(parse(["--data", str(tmp_path)])) is None  # an image folder: only --unknown-data
    assert unknown_source(parse(["--data", str(tmp_path), "--unknown-data", "X"])) == "X"


@pytest.mark.cli
def test_bad_unknown_data_is_a_clear_error(image_folder, tmp_path):
    done = run_cli(PYTHON, "-m", "training.train", "--data", str(image_folder), "--unknown-data",
                   str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt"), "--steps", "1")  # fmt: skip
    assert done.returncode == 2 and "--unknown-data: not a folder" in done.stderr and "Traceback" not in done.stderr


def test_a_checkpoint_from_before_unknown_images_loads_and_answers_the_energy_score(tmp_path):
    path = tmp_path / "old.pt"
    meta = ModelMeta("resnet18_fast", CLASSES, 32, list(CIFAR10_MEAN), list(CIFAR10_STD), temperature=1.5)
    save_checkpoint(path, build_model("resnet18_fast", 3), meta)
    payload = torch.load(path, weights_only=True)
    del payload["meta"]["unknown"]  # written by a version that did not know the field
    assert payload["format_version"] == FORMAT_VERSION
    torch.save(payload, path)
    engine, loaded = load_engine(path, "torch", dtype="float32", threads=1)
    assert loaded.unknown == {} and loaded.num_outputs == 3
    probs, scores = predict_scores(engine, loaded, flat_images([0, 128, 255]))
    assert probs.shape == (3, 3) and torch.isfinite(scores).all()


# -- a real TorchServe --------------------------------------------------------------------------------------------


def grey_and_yellow() -> list[bytes]:
    return [encode(Image.fromarray(pixels)) for name in UNKNOWN_COLOURS for pixels in class_images(name, 2, seed=31)]


def describe(server) -> dict:
    response = requests.get(f"{server.management_url}/models/cifar3", params={"customized": "true"},
                            headers=server.headers("management"), timeout=30)  # fmt: skip
    custom = response.json()[0]["customizedMetadata"]
    return json.loads(custom) if isinstance(custom, str) else custom


@pytest.mark.server
def test_answers_say_unknown_by_the_stored_threshold_and_describe_reports_it(server, tiny_checkpoint):
    _, meta = load_checkpoint(tiny_checkpoint)
    rule = describe(server)["unknown"]
    assert rule["threshold"] == meta.unknown["threshold"] and rule["threshold_source"] == "checkpoint"
    assert rule["score"] == OTHER_CLASS and rule["known_accepted"] == meta.unknown["known_accepted"]
    url, headers = f"{server.inference_url}/predictions/cifar3", server.headers()
    answers = {}
    for kind, bodies in {
        "unknown": grey_and_yellow(),
        "known": [encode(sample_image(c, seed=31)) for c in CLASSES],
    }.items():
        answers[kind] = [requests.post(url, data=body, headers=headers, timeout=60).json() for body in bodies]
    for answer in answers["unknown"] + answers["known"]:
        assert set(answer) == {"pred_class", "probs", "unknown", "unknown_score"}
        assert answer["pred_class"] in CLASSES and sum(answer["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert answer["unknown"] == (answer["unknown_score"] > rule["threshold"])
    assert any(a["unknown"] for a in answers["unknown"])  # colours the classes never have
    known_mean = sum(a["unknown_score"] for a in answers["known"]) / len(answers["known"])
    assert known_mean < sum(a["unknown_score"] for a in answers["unknown"]) / len(answers["unknown"])


@pytest.mark.server
def test_explanations_carry_the_unknown_state(server):
    body = grey_and_yellow()[0]
    answer = requests.post(f"{server.inference_url}/explanations/cifar3", data=body, headers=server.headers(),
                           timeout=60).json()  # fmt: skip
    assert answer["unknown"] is True and answer["explanation"]["target"] == answer["pred_class"]


@pytest.mark.server
def test_evaluate_rejects_what_the_server_rejects(server, tiny_checkpoint, unknown_folder, tmp_path):
    done = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(tiny_checkpoint), "--validation",
                   "--unknown-data", str(unknown_folder), "--report-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads((tmp_path / "metrics.json").read_text())["unknown"]
    assert set(figures["per_source"]) == set(UNKNOWN_COLOURS) and figures["n"] == 120
    files = sorted(unknown_folder.rglob("*.png"))[::10]
    url, headers = f"{server.inference_url}/predictions/cifar3", server.headers()
    served = np.mean([requests.post(url, data=f.read_bytes(), headers=headers, timeout=60).json()["unknown"]
                      for f in files])  # fmt: skip
    assert served == pytest.approx(figures["unknown_rejected"], abs=0.1)
    assert json.loads(done.stdout.strip().splitlines()[-1])["auroc"] == figures["auroc"]
