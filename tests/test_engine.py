"""The inference engine switch (cifar3/engine.py), the ONNX export and its verification (training/export.py),
and parity of every engine between a real TorchServe and ``training.evaluate --engine``."""

from __future__ import annotations

import csv
import json
import logging
import sys
import zipfile

import pytest
import requests
import torch
import yaml
from conftest import MODEL_CONFIG, PYTHON, ROOT, run_cli, start_server
from synthetic import sample_image

from cifar3 import engine as engine_module
from cifar3.checkpoint import load_checkpoint
from cifar3.engine import (
    ONNX_FILE,
    ONNX_FILES,
    OnnxRuntimeEngine,
    TorchEngine,
    choose_engine,
    load_engine,
    predict_probs,
)
from cifar3.inference import native_bfloat16, predict_logits
from cifar3.preprocessing import normalize, pil_to_uint8
from training import export

CLASSES = ["airplane", "automobile", "ship"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.stack([pil_to_uint8(sample_image(name, seed=seed)) for seed in range(4) for name in CLASSES])


@pytest.fixture(scope="module")
def onnx_model(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    done = run_cli(PYTHON, "-m", "training.export", str(tiny_checkpoint), str(out))
    assert done.returncode == 0, done.stderr
    assert "verified on" in done.stdout and out.is_file()
    return out


# -- choosing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_picks_torch_bfloat16_where_the_cpu_has_it_else_onnxruntime(monkeypatch, bf16):
    monkeypatch.setattr(engine_module, "native_bfloat16", lambda device: bf16)
    monkeypatch.setattr("cifar3.inference.native_bfloat16", lambda device: bf16)
    expected = ("torch", torch.bfloat16) if bf16 else ("onnxruntime", torch.float32)
    choice = choose_engine("auto", CPU)
    assert (choice.engine, choice.dtype) == expected


def test_auto_on_this_machine_is_what_the_hardware_rule_says():
    choice = choose_engine("auto", CPU)
    assert choice.engine == ("torch" if native_bfloat16(CPU) else "onnxruntime")


def test_explicit_engines_and_bad_names():
    assert choose_engine("onnxruntime", CPU).dtype == torch.float32
    assert choose_engine("onnxruntime-int8", CPU) == engine_module.EngineChoice("onnxruntime-int8", torch.int8)
    with pytest.raises(ValueError, match="runs int8"):
        choose_engine("onnxruntime-int8", CPU, "float32")
    assert choose_engine("torch", CPU, "float32") == engine_module.EngineChoice("torch", torch.float32)
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'"):
        choose_engine("tensorrt", CPU)
    with pytest.raises(ValueError, match="runs float32"):
        choose_engine("onnxruntime", CPU, "bfloat16")


# -- running ----------------------------------------------------------------------------------------


@pytest.mark.cli
def test_onnxruntime_equals_pytorch_float32_at_any_batch_size(tiny_checkpoint, onnx_model, images):
    model, meta = load_checkpoint(tiny_checkpoint)
    assert meta.test_flip  # the cpu preset's: the engines average each image with its mirror image
    expected = meta.scores(predict_logits(model, images, meta.mean, meta.std, test_flip=True))[0]
    engine, _ = load_engine(tiny_checkpoint, "onnxruntime", onnx_path=onnx_model, threads=1)
    assert isinstance(engine, OnnxRuntimeEngine)
    assert engine.describe() == {"engine": "onnxruntime", "dtype": "float32", "threads": 1, "device": "cpu",
                                 "test_flip": True}  # fmt: skip
    for batch_size in (1, 5, 12):  # the batch axis is dynamic
        assert torch.allclose(predict_probs(engine, meta, images, batch_size), expected, atol=1e-4)


@pytest.mark.cli
@pytest.mark.parametrize("which", ["torch", "onnxruntime"])
def test_test_flip_averages_each_image_with_its_mirror_image_in_every_engine(tiny_checkpoint, onnx_model, images,
                                                                             which):  # fmt: skip
    engine, meta = load_engine(tiny_checkpoint, which, dtype="float32", onnx_path=onnx_model, threads=1)
    assert engine.test_flip and engine.describe()["test_flip"] is True
    batch = normalize(images, meta.mean, meta.std)
    answered = engine(batch)
    assert torch.allclose(engine(batch.flip(-1)), answered, atol=1e-4)  # an image and its mirror image: one answer
    engine.test_flip = False  # the runtime alone: one view at a time
    views = engine(batch), engine(batch.flip(-1))
    assert not torch.allclose(*views, atol=1e-3)  # the network itself is not symmetric
    assert torch.allclose(answered, (views[0] + views[1]) / 2, atol=1e-4)


@pytest.mark.cli
def test_onnxruntime_without_an_exported_file_exports_the_checkpoint(tiny_checkpoint, onnx_model, images, caplog):
    exported_now, meta = load_engine(tiny_checkpoint, "onnxruntime", threads=1, exporter=export.export_checkpoint)
    archived, _ = load_engine(tiny_checkpoint, "onnxruntime", onnx_path=onnx_model, threads=1)
    assert isinstance(exported_now, OnnxRuntimeEngine)
    assert torch.equal(predict_probs(exported_now, meta, images), predict_probs(archived, meta, images))
    # The core exports nothing itself (the exporter is training's): with neither, torch runs, saying why.
    caplog.clear()  # the export's own log lines
    with caplog.at_level(logging.INFO, logger="cifar3.engine"):
        engine, _ = load_engine(tiny_checkpoint, "onnxruntime", dtype="float32")
    assert isinstance(engine, TorchEngine)
    assert len(caplog.records) == 1 and "no exporter" in caplog.records[0].getMessage()


@pytest.mark.cli
def test_without_onnxruntime_the_torch_engine_runs_with_one_log_line(tiny_checkpoint, onnx_model, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with caplog.at_level(logging.INFO, logger="cifar3.engine"):
        engine, _ = load_engine(tiny_checkpoint, "onnxruntime", onnx_path=onnx_model, dtype="float32")
    assert isinstance(engine, TorchEngine) and engine.describe()["engine"] == "torch"
    assert len(caplog.records) == 1 and "onnxruntime cannot run here" in caplog.records[0].getMessage()


@pytest.mark.parametrize("content", [None, b"not an onnx model"])
def test_a_missing_or_unreadable_exported_model_falls_back_to_torch(tiny_checkpoint, tmp_path, caplog, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with caplog.at_level(logging.INFO, logger="cifar3.engine"):
        engine, _ = load_engine(tiny_checkpoint, "onnxruntime", onnx_path=path)
    assert isinstance(engine, TorchEngine)
    assert len(caplog.records) == 1 and "onnxruntime cannot run here" in caplog.records[0].getMessage()


def test_int8_runs_only_an_archives_quantized_model(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantized model"):
        load_engine(tiny_checkpoint, "onnxruntime-int8")


@pytest.mark.cli
def test_int8_export_is_quantized_and_predicts_what_float32_does(tiny_checkpoint, onnx_model, images, tmp_path):
    int8 = tmp_path / "model.int8.onnx"
    done = run_cli(PYTHON, "-m", "training.export", str(tiny_checkpoint), str(tmp_path / "model.onnx"),
                   "--int8", str(int8))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "int8:" in done.stdout and "predicts what float32 does on" in done.stdout
    assert int8.stat().st_size < 0.4 * onnx_model.stat().st_size  # int8 weights: a quarter of the bytes
    quantized, meta = load_engine(tiny_checkpoint, "onnxruntime-int8", onnx_path=int8, threads=1)
    float32, _ = load_engine(tiny_checkpoint, "onnxruntime", onnx_path=onnx_model, threads=1)
    assert quantized.describe() == {"engine": "onnxruntime-int8", "dtype": "int8", "threads": 1, "device": "cpu",
                                    "test_flip": True}  # fmt: skip
    p8, p32 = predict_probs(quantized, meta, images), predict_probs(float32, meta, images)
    assert (p8.argmax(1) == p32.argmax(1)).float().mean() >= 0.9
    assert not torch.equal(p8, p32)  # computed in int8, not the float32 graph again
    assert torch.equal(predict_probs(quantized, meta, images, batch_size=1), p8)  # any batch size, same answer


@pytest.mark.cli
def test_int8_that_disagrees_is_left_out_with_a_warning(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "INT8_AGREEMENT", 1.01)  # no model can agree this well
    float32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    assert export.main([str(tiny_checkpoint), str(float32), "--int8", str(int8)]) == 0
    assert "warning: the int8 model" in capsys.readouterr().err
    assert float32.is_file() and not int8.exists() and {p.name for p in tmp_path.iterdir()} == {"model.onnx"}


# -- export and its verification --------------------------------------------------------------------


@pytest.mark.cli
def test_export_refuses_when_the_export_differs(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "TOLERANCE", 0.0)  # any difference at all now counts as a wrong export
    out = tmp_path / "model.onnx"
    assert export.main([str(tiny_checkpoint), str(out)]) == 2
    assert "differs from PyTorch float32" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, no temp file left


@pytest.mark.cli
def test_archive_refuses_without_images_to_verify_on(tiny_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli("bash", str(ROOT / "scripts" / "archive.sh"), str(tiny_checkpoint),
                   env={"MODEL_STORE": str(tmp_path / "store"), "VERIFY_IMAGES": str(tmp_path / "empty")})  # fmt: skip
    assert done.returncode != 0
    assert "no images to verify the export on" in done.stderr and "--images" in done.stderr
    assert not (tmp_path / "store" / "cifar3.mar").exists()


@pytest.mark.cli
def test_archive_verifies_on_the_checkpoints_own_validation_images(cifar_dir, tmp_path):
    """A checkpoint trained on a cifar-10-batches-py folder (no image files to point at) archives without
    VERIFY_IMAGES: the export is checked on its validation images, read from the same source."""
    checkpoint = tmp_path / "cifar.pt"
    trained = run_cli(PYTHON, "-m", "training.train", "--data", str(cifar_dir), "--out", str(checkpoint),
                      "--epochs", "1", "--batch-size", "32", "--limit", "20", "--device", "cpu")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    done = run_cli("bash", str(ROOT / "scripts" / "archive.sh"), str(checkpoint),
                   env={"MODEL_STORE": str(tmp_path / "store")})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "validation images of" in done.stdout and "verified on 6 images" in done.stdout, done.stdout
    assert ONNX_FILE in zipfile.ZipFile(tmp_path / "store" / "cifar3.mar").namelist()


@pytest.mark.cli
def test_the_archive_carries_the_exported_models(model_store):
    assert set(ONNX_FILES.values()) <= set(zipfile.ZipFile(model_store / "cifar3.mar").namelist())


# -- parity: a real TorchServe per engine against training.evaluate --engine -----------------------


def evaluate_predictions(checkpoint, folder, report, engine: str, onnx=None) -> dict[str, list[float]]:
    done = run_cli(PYTHON, "-m", "training.evaluate", "--checkpoint", str(checkpoint), "--data", str(folder),
                   "--report-dir", str(report), "--predictions", "--engine", engine, "--threads", "1",
                   *(["--onnx", str(onnx)] if onnx else []))  # fmt: skip
    assert done.returncode == 0, done.stderr
    with open(report / "predictions.csv") as f:
        # the class probabilities, then the unknown score
        return {row["path"]: [float(row[c]) for c in [*CLASSES, "unknown_score"]] for row in csv.DictReader(f)}


def described(server) -> dict:
    response = requests.get(f"{server.management_url}/models/cifar3", params={"customized": "true"},
                            headers=server.headers("management"), timeout=30)  # fmt: skip
    custom = response.json()[0]["customizedMetadata"]
    return json.loads(custom) if isinstance(custom, str) else custom


# The int8 server's model-config also overrides the checkpoint's unknown-image threshold.
OVERRIDDEN_THRESHOLD = 0.25


def engine_server(tmp_path_factory, tiny_checkpoint, engine: str, **handler_options):
    """Another real TorchServe whose model-config asks for ``engine`` (the session's asks auto) and any other
    ``handler_options``, and the exported model it runs, taken out of its .mar."""
    folder = tmp_path_factory.mktemp(f"{engine}-server")
    config = {**MODEL_CONFIG, "minWorkers": 1, "maxWorkers": 1,
              "handler": {**MODEL_CONFIG["handler"], "engine": engine, **handler_options}}  # fmt: skip
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    env = {"MODEL_STORE": str(folder / "store"), "MODEL_CONFIG": str(folder / "model-config.yaml")}
    done = run_cli("bash", str(ROOT / "scripts" / "archive.sh"), str(tiny_checkpoint), env=env)
    assert done.returncode == 0, done.stderr
    onnx = folder / ONNX_FILES[engine]
    onnx.write_bytes(zipfile.ZipFile(folder / "store" / "cifar3.mar").read(ONNX_FILES[engine]))
    server = start_server(folder / "ts", folder / "store")
    return server, onnx


@pytest.fixture(scope="module")
def onnxruntime_server(tmp_path_factory, tiny_checkpoint):
    server, onnx = engine_server(tmp_path_factory, tiny_checkpoint, "onnxruntime")
    yield server, onnx
    server.stop()


@pytest.fixture(scope="module")
def int8_server(tmp_path_factory, tiny_checkpoint):
    server, onnx = engine_server(tmp_path_factory, tiny_checkpoint, "onnxruntime-int8",
                                 unknown_threshold=OVERRIDDEN_THRESHOLD)  # fmt: skip
    yield server, onnx
    server.stop()


@pytest.mark.server
# ONNX Runtime in float32 is covered in-process (test_onnxruntime_equals_pytorch_float32_at_any_batch_size) and
# served through the same engine code as int8: its own server runs with --all.
@pytest.mark.parametrize("which", ["auto", pytest.param("onnxruntime", marks=pytest.mark.slow), "onnxruntime-int8"])
def test_served_probabilities_equal_evaluate_with_the_same_engine(which, request, tiny_checkpoint, tmp_path):
    """For every engine: what the server answers is what training.evaluate computes with that engine (for
    the ONNX engines, on the model file the archive carries)."""
    fixture = {"auto": "server", "onnxruntime": "onnxruntime_server", "onnxruntime-int8": "int8_server"}[which]
    server, onnx = request.getfixturevalue(fixture) if which != "auto" else (request.getfixturevalue(fixture), None)
    folder = tmp_path / "images"
    files = []
    for i, name in enumerate(CLASSES * 2):
        (folder / name).mkdir(parents=True, exist_ok=True)
        files.append(folder / name / f"{i}.png")
        sample_image(name, seed=200 + i).save(files[-1])
    expected = evaluate_predictions(tiny_checkpoint, folder, tmp_path / "report", which, onnx)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    info = described(server)
    # the describe API says what ran; evaluate ran the very same engine, dtype and threads
    assert {k: info[k] for k in ("engine", "dtype", "threads")} == {
        k: metrics[k] for k in ("engine", "dtype", "threads")
    }
    assert info["engine_requested"] == which and info["threads"] == MODEL_CONFIG["handler"]["threads"]
    if which != "auto":
        assert info["engine"] == which and info["dtype"] == ("int8" if which.endswith("int8") else "float32")
    # the threshold: the checkpoint's, or model-config's where it overrides it, as describe says
    _, meta = load_checkpoint(tiny_checkpoint)
    overridden = which == "onnxruntime-int8"
    threshold = OVERRIDDEN_THRESHOLD if overridden else meta.unknown["threshold"]
    assert (
        info["unknown"]["threshold"] == threshold
        and info["unknown"]["checkpoint_threshold"] == meta.unknown["threshold"]
    )
    assert info["unknown"]["threshold_source"] == ("model-config" if overridden else "checkpoint")
    for path in files:
        answer = requests.post(f"{server.inference_url}/predictions/cifar3", data=path.read_bytes(),
                               headers=server.headers(), timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        body = answer.json()
        served = [body["probs"][c] for c in CLASSES] + [body["unknown_score"]]
        assert served == pytest.approx(expected[str(path)], abs=1e-4)
        assert body["unknown"] == (body["unknown_score"] > threshold)
