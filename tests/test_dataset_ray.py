"""``--engine ray`` gives the same store as ``--engine local`` (a local Ray with 2 CPUs, started here once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lumos.dataset import RunOptions, explain_dataset, read_store
from lumos.dataset.batch import decode_map
from lumos.explainer import ExplainSpec, ModelSpec
from lumos.synthetic.shortcut import make_shortcut_dataset, write_image_folder

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_and_local_stores_are_the_same(local_ray, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_image_folder(make_shortcut_dataset(20, seed=11), data)
    (data / "square" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    spec = ExplainSpec(model=ModelSpec("lumos.synthetic:load_tinycnn", size=64, mean=(0.0,), std=(1.0,),
                                       labels=str(data / "labels.txt")), methods=("gradcam", "gradients"))
    options = RunOptions(target="both", chunk_size=8)
    local = explain_dataset([data], spec, tmp_path / "local", options=options, batch_size=4, workers=0)
    remote = explain_dataset([data], spec, tmp_path / "ray", options=options, batch_size=3, engine="ray",
                             ray={"concurrency": 2, "threads": 1})
    assert local.images == remote.images == 21 and remote.explained == 21
    a, b = read_store(tmp_path / "local").to_pandas(), read_store(tmp_path / "ray").to_pandas()
    assert sorted(p.name for p in (tmp_path / "ray" / "chunks").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert len(a) == len(b) == 20 * 2 * 2 + 1
    for col in ("index", "path", "label", "target_kind", "method", "error", "pred", "target", "map_h", "map_w"):
        assert a[col].equals(b[col]), col
    np.testing.assert_allclose(a.prob.astype(float), b.prob.astype(float), rtol=1e-5)
    for ra, rb in zip(a[a.error.isna()].itertuples(), b[b.error.isna()].itertuples(), strict=True):
        step = (ra.map_hi - ra.map_lo) / 255  # maps within 1e-3 after the stored precision
        assert np.abs(decode_map(ra._asdict()) - decode_map(rb._asdict())).max() <= step + 1e-3
    again = explain_dataset([data], spec, tmp_path / "ray", options=options, engine="ray")
    assert again.explained == 0 and again.skipped == 21


def test_a_cap_reached_on_ray_workers_is_said_once_on_the_driver(local_ray, tmp_path: Path, caplog) -> None:
    """Workers' logs do not reach the driver (log_to_driver=False): their shortfalls come back with the rows."""
    import logging

    data = tmp_path / "data"
    write_image_folder(make_shortcut_dataset(6, seed=3), data)
    spec = ExplainSpec(model=ModelSpec("lumos.synthetic:load_tinycnn", size=64, mean=(0.0,), std=(1.0,)),
                       methods=("scorecam",), settings={"scorecam": {"max_channels": 1, "tolerance": 1e-9}})
    with caplog.at_level(logging.WARNING, logger="lumos"):
        run = explain_dataset([data], spec, tmp_path / "ray", options=RunOptions(chunk_size=4), batch_size=2,
                              engine="ray", ray={"concurrency": 2, "threads": 1})
    said = [r.getMessage() for r in caplog.records if "reached max_channels=1" in r.getMessage()]
    assert run.explained == 6 and len(said) == 1 and said[0].startswith("Score-CAM: 6 of 6 maps reached"), said
    assert "_lumos_shortfalls" not in read_store(tmp_path / "ray").column_names
