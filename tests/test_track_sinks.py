"""W&B (offline) and MLflow (local file store) sinks, read back through each tool's own files/client."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from lumos.synthetic import TinyCNN, make_dataset
from lumos.track import ExplanationLogger, MlflowSink, WandbSink

SIZE = 32


@pytest.fixture(scope="module")
def data():
    return make_dataset(16, size=SIZE, seed=4)


def short_training(model: torch.nn.Module, data, logger: ExplanationLogger, epochs: int = 2) -> None:
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(epochs):
        model.train()
        for lo in range(0, len(data.labels), 8):
            loss = torch.nn.functional.cross_entropy(model(data.images[lo:lo + 8]), data.labels[lo:lo + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if logger.due_epoch(epoch):
            logger.log(model, epoch)


def read_wandb_records(path) -> list[bytes]:
    """Records of a ``.wandb`` file: W&B's LevelDB-style log (7-byte file header ``:W&B`` + magic + version,
    32 KiB blocks, each record chunk prefixed by crc32 (4), length (2), type (1: full, 2-4: first/middle/last))."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            out.append(partial)
            partial = b""
    return out


def wandb_history(run_dir) -> list[dict]:
    """History rows of an offline run, parsed from its ``.wandb`` file with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("*.wandb")
    for _ in range(300):  # wandb-core may still be writing after finish(): wait for the exit record
        records = [wandb_internal_pb2.Record.FromString(raw) for raw in read_wandb_records(path)]
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in rec.history.item:  # keys are nested: ("lumos/gradcam/00", "caption")
                *outer, last = list(item.nested_key) or [item.key]
                node = row
                for k in outer:
                    node = node.setdefault(k, {})
                node[last] = json.loads(item.value_json)
            rows.append(row)
    return rows


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


def test_wandb_offline_own_run(wandb_env, data):
    sink = WandbSink(project="lumos-test", dir=wandb_env)
    run_dir = sink.run.dir  # .../offline-run-*/files
    logger = ExplanationLogger(data.images[:2], data.labels[:2], methods=["gradcam", "features"],
                               layer="features.block4", sinks=[sink], masks=data.masks[:2], metrics=["pointing"])
    short_training(TinyCNN(), data, logger)
    logger.close()
    from pathlib import Path

    rows = wandb_history(Path(run_dir).parent)
    image_rows = [r for r in rows if "lumos/gradcam/00" in r]
    assert image_rows, [list(r) for r in rows]
    assert [r["_step"] for r in image_rows] == [0, 1]
    keys = {k for r in image_rows for k in r if k.startswith("lumos/") and not k.endswith("pointing_game")}
    assert keys == {f"lumos/{m}/{i:02d}" for m in ("gradcam", "features") for i in range(2)}
    assert image_rows[0]["lumos/gradcam/00"]["_type"] == "image-file"
    assert "label:" in image_rows[0]["lumos/gradcam/00"]["caption"]
    media = sorted(p.name for p in (Path(run_dir) / "media" / "images" / "lumos" / "gradcam").glob("*.png"))
    assert len(media) == 4 and sum(m.startswith("00_") for m in media) == 2  # 2 probes x 2 epochs
    assert [r["lumos/gradcam/pointing_game"] for r in rows if "lumos/gradcam/pointing_game" in r] != []


def test_wandb_inside_existing_run(wandb_env, data):
    import wandb

    run = wandb.init(project="lumos-test", mode="offline", dir=str(wandb_env))
    try:
        run.log({"loss": 1.0}, step=10)  # the user's own step is ahead of ours
        sink = WandbSink()
        assert sink.run is run
        logger = ExplanationLogger(data.images[:2], data.labels[:2], sinks=[sink], layer="features.block4")
        short_training(TinyCNN(), data, logger)
        logger.close()  # does not finish the user's run
        run_dir = __import__("pathlib").Path(run.dir).parent
    finally:
        run.finish()
    rows = [r for r in wandb_history(run_dir) if "lumos/gradcam/00" in r]
    assert [r["lumos/step"] for r in rows] == [0, 1]


def test_mlflow_local_file_store(tmp_path, data, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the sink switches it on for a local store
    sink = MlflowSink(tracking_uri=tmp_path / "mlruns", experiment="watch")
    logger = ExplanationLogger(data.images[:2], data.labels[:2], methods=["gradcam", "features"],
                               layer="features.block4", sinks=[sink], metrics=["deletion"], deletion_steps=4)
    short_training(TinyCNN(), data, logger)
    logger.close()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    files = [f.path for f in client.list_artifacts(sink.run_id, "images")]
    pngs = [f for f in files if f.endswith(".png")]
    # one image per tag and step: 2 methods x 2 probes x 2 epochs
    assert len(pngs) == 8
    # MLflow names them <key with / as ~>+step+<step>+timestamp+...png
    found = sorted(re.match(r"images/(.+)\+step\+(\d+)\+", p).groups() for p in pngs)
    assert found == sorted((f"lumos~{m}~{i:02d}", str(s)) for m in ("gradcam", "features") for i in range(2)
                           for s in range(2))
    hist = client.get_metric_history(sink.run_id, "lumos/gradcam/deletion_auc")
    assert sorted(m.step for m in hist) == [0, 1]



def test_mlflow_writes_the_picture_and_mlflows_own_thumbnail_per_tag_and_step(tmp_path, data):
    """MLflow's log_image(key=, step=) writes two files per picture: the PNG, pixel for pixel the logged picture
    (caption drawn in), and a '+compressed.webp' copy at most 256 px, which the MLflow UI's image chart shows;
    nothing else (no caption or json file) per picture. docs/tracking.md says why both stay."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from lumos.track import MemorySink

    memory = MemorySink()
    sink = MlflowSink(tracking_uri=tmp_path.as_uri(), experiment="files")
    logger = ExplanationLogger(data.images[:2], data.labels[:2], methods=["gradcam", "features"],
                               layer="features.block4", sinks=[sink, memory], display_size=160)
    logger.log(TinyCNN(), 3)
    logger.close()
    client = MlflowClient(tracking_uri=tmp_path.as_uri())
    files = sorted(f.path for f in client.list_artifacts(sink.run_id, "images"))
    assert len(files) == 2 * len(memory.images)
    for tag, [(_, picture, _)] in memory.images.items():
        stem = tag.replace("/", "~") + "+step+3+"
        mine = [f for f in files if f.startswith(f"images/{stem}")]
        assert len(mine) == 2, mine
        png, webp = sorted(mine, key=lambda f: f.endswith(".webp"))
        assert png.endswith(".png") and webp == png[:-4] + "+compressed.webp"
        full = Image.open(client.download_artifacts(sink.run_id, png, str(tmp_path / "dl")))
        assert np.array_equal(np.asarray(full.convert("RGB")), np.asarray(picture))
        thumb = Image.open(client.download_artifacts(sink.run_id, webp, str(tmp_path / "dl")))
        assert max(thumb.size) == 256 and thumb.format == "WEBP"


def test_wandb_own_run_says_once_when_a_step_goes_back(wandb_env, data, caplog):
    import logging

    sink = WandbSink(project="lumos-test", dir=wandb_env)
    logger = ExplanationLogger(data.images[:1], data.labels[:1], sinks=[sink], layer="features.block4")
    net = TinyCNN()
    with caplog.at_level(logging.WARNING, logger="lumos.track"):
        for step in (0, 5, 3, 2):  # e.g. epoch numbers after step numbers: W&B drops steps 3 and 2
            logger.log(net, step)
    logger.close()
    said = [r.getMessage() for r in caplog.records if "W&B drops" in r.getMessage()]
    assert len(said) == 1 and "step 3, below the run's current step" in said[0]


def test_default_tensorboard_folder_is_new_per_run(tmp_path, data, monkeypatch, caplog):
    """The default used to be runs/lumos for every run: two trainings mixed their pictures in one folder."""
    import logging
    import socket

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250102-030405")  # both runs start in one second
    net = TinyCNN()
    dirs = []
    with caplog.at_level(logging.INFO, logger="lumos.track"):
        for prefix in ("first", "second"):
            logger = ExplanationLogger(data.images[:1], data.labels[:1], layer="features.block4", prefix=prefix,
                                       sinks=["tensorboard"])
            logger.log(net, 0)
            logger.close()
            dirs.append(logger.sinks[0].log_dir)
    stem = f"runs/lumos/20250102-030405_{socket.gethostname()}"
    assert [d.replace("\\", "/") for d in dirs] == [stem, f"{stem}_2"]
    for d, prefix in zip(dirs, ("first", "second"), strict=True):
        acc = EventAccumulator(d, size_guidance={"images": 0})
        acc.Reload()
        assert acc.Tags()["images"] == [f"{prefix}/gradcam/00"]  # each run's pictures alone in its folder
        assert any(d in r.getMessage() for r in caplog.records)  # where it writes is said
    from lumos.track import TensorBoardSink

    explicit = TensorBoardSink("tb/exp1")  # a folder given is used exactly as given
    explicit.close()
    assert explicit.log_dir == "tb/exp1" and (tmp_path / "tb" / "exp1").is_dir()
