"""The synthetic ground-truth benchmark, the sanity checks, and the `lumos evaluate` command."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lumos.evaluate import CascadingRandomisation, RandomLogit
from lumos.evaluate.benchmark import synthetic_benchmark
from lumos.synthetic import load_tinycnn, make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gradcam_ranks_well_above_random_on_the_synthetic_benchmark():
    report = synthetic_benchmark(["gradcam"], n=40, steps=8)
    g, r = report.rows["gradcam"], report.rows["random"]
    assert g["pointing_game"] >= 0.85 and r["pointing_game"] <= 0.2
    assert g["pointing_game"] - r["pointing_game"] >= 0.6
    assert g["energy_pointing_game"] > 3 * r["energy_pointing_game"]
    assert g["insertion_auc"] > r["insertion_auc"]
    # No deletion claim: after the first step (which removes the object for both maps) the curves differ only by
    # the order of Grad-CAM's zero plateau; in raster order (the old tie rule) that order looked better than random,
    # in an order unrelated to the layout it does not (tests/test_evaluate_audit.py).
    assert report.best()["pointing_game"] == "gradcam"


def test_gradcam_decorrelates_as_layers_are_randomised():
    data = make_dataset(8, seed=123)
    model = load_tinycnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = CascadingRandomisation("gradcam", layer="features.block4")(model, data.images, targets=data.labels)
    assert res.layers[0] == "fc" and res.layers[-1] == "features.block1.conv"
    rho = torch.nanmean(res.spearman, 1)  # NaN where a randomised map is blank (no ranks to correlate)
    assert rho[~rho.isnan()].max() < 0.6 and rho[-1] < 0.2  # the original correlates 1.0 with itself; NaN: all blank
    assert res.ssim.mean(1)[-1] < 0.6
    assert res.maps.shape == (len(res.layers) + 1, 8, 64, 64)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the copy was randomised


def test_random_logit_check_gives_dissimilar_maps():
    data = make_dataset(8, seed=123)
    res = RandomLogit("gradcam", layer="features.block4")(load_tinycnn(), data.images)
    assert (res.other_classes != res.classes).all()
    assert res.spearman.mean() < 0.5


# -- the command ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def main():
    import lumos.cli as cli
    from lumos.cli_evaluate import register

    register(cli.app)  # what the one line in cli.py does
    return cli.main


def test_evaluate_benchmark_writes_table_csv_json_and_pngs(main, tmp_path, capsys):
    out = tmp_path / "ev"
    code = main(["evaluate", "--benchmark", "synthetic", "--methods", "gradcam", "--n", "12", "--steps", "4",
                 "--out", str(out), "--sanity"])
    assert code == 0
    text = capsys.readouterr().out
    assert "pointing game" in text and "gradcam" in text and "random" in text and "*" in text
    for name in ("evaluation.csv", "evaluation.json", "curves.png", "sanity.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "evaluation.json").read_text())
    assert data["best"]["pointing_game"] == "gradcam"
    assert len(data["curves"]["gradcam"]["deletion"]) == 5
    assert data["sanity"]["gradcam"]["layers"][0] == "fc"
    assert (out / "evaluation.csv").read_text().splitlines()[0].startswith("method,pointing_game")


def test_evaluate_images_with_the_zoo_model(main, tmp_path, capsys):
    img = tmp_path / "a.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).byte().numpy()).save(img)
    out = tmp_path / "ev"
    code = main(["evaluate", str(img), "--methods", "gradcam", "--steps", "4", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "deletion AUC" in text and "pointing game" not in text
    assert (out / "curves.png").exists()


def test_evaluate_passes_method_settings(main, tmp_path, capsys):
    import lumos
    from lumos.evaluate.benchmark import evaluate_methods

    img = tmp_path / "a.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).byte().numpy()).save(img)
    aucs = []
    for settings in (["steps=2", "tolerance=0", "baseline=black"], ["steps=2", "tolerance=0"]):
        out = tmp_path / str(len(aucs))
        args = ["evaluate", str(img), "--methods", "integrated_gradients", "--steps", "4", "--out", str(out)]
        assert main(args + [a for s in settings for a in ("--set", s)]) == 0
        metrics = json.loads((out / "evaluation.json").read_text())["metrics"]
        aucs.append(metrics["integrated_gradients"]["deletion_auc"])
    model, preprocess, _ = lumos.load_model("efficientnet_lite0")
    x = preprocess([Image.open(img).convert("RGB")])
    ref = evaluate_methods(model, x, ["integrated_gradients"], steps=4, random_baseline=False, method_kwargs={
        "integrated_gradients": {"steps": 2, "tolerance": 0, "baseline": "black", "preprocess": preprocess}})
    assert aucs[0] == pytest.approx(ref.rows["integrated_gradients"]["deletion_auc"], abs=1e-6)
    assert aucs[0] != aucs[1]  # the black baseline was used


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate"], "Give image files"),
        (["evaluate", "--benchmark", "mnist"], "Unknown benchmark"),
        (["evaluate", "--benchmark", "synthetic", "--methods", "gradcamm"], "Unknown method"),
        (["evaluate", "/no/such/file.png"], "no such file"),
        (["evaluate", "--benchmark", "synthetic", "--steps", "0"], "positive"),
        (["evaluate", "--benchmark", "synthetic", "--methods", "gradcam", "--set", "stpes=3"], "no setting"),
        (["evaluate", "--benchmark", "synthetic", "--methods", "scorecam", "--set", "max_channels=many"],
         "scorecam does not accept the settings max_channels='many'"),
    ],
)
def test_evaluate_bad_input_is_one_line(main, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
