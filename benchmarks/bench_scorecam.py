"""Score-CAM on the bundled photos (EfficientNet-Lite0, 224x224, predicted class, auto layer ``_act1``).

Per photo: the default Score-CAM (adaptive channel budget) time / a plain no-grad forward of that image
(median of the per-round ratios, each call timed right after its own plain forward), the masks it scored
and its estimated error, its map correlation with all-channel Score-CAM; the same for the old fixed default
(the 32 highest-variance channels, batches of 32); and all-channel Score-CAM (``max_channels=None``) before
(the old code: every channel, batches of 32) and after (constant channels skipped, shared masks scored once,
batches of ``batch_size``), one call each. ``--sweep`` times all-channel Score-CAM on the first photo per
``batch_size``.

Then what bounds the cost: one masked input's time / a plain forward (64 masked inputs of the first photo in
the default batches), so how many masks 10x a forward can buy, and the default at looser tolerances (mean
masks, mean ratio, the lowest correlation with all-channel Score-CAM over the photos): the speed/fidelity
trade-off as measured. Run: ``.venv/bin/python benchmarks/bench_scorecam.py``.
"""

from __future__ import annotations

import argparse
import logging
import statistics

import torch
from timing import median_time, ratio, timed_result

import lumos
from lumos.engine import Forward, score_inputs
from lumos.explanation import normalize_maps, upsample
from lumos.io import sample_images
from lumos.methods.base import ActivationMethod
from lumos.methods.scorecam import MaskScorer, estimate_map
from lumos.targets import resolve_targets
from lumos.zoo import load_model


class OldScoreCAM(ActivationMethod):
    """Score-CAM as it was before the adaptive budget (git show a1d7744:src/lumos/methods/scorecam.py)."""

    name = "scorecam_old"

    def __init__(self, *args, batch_size: int = 32, max_channels: int | None = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_size, self.max_channels, self.baseline = batch_size, max_channels, 0.0

    def compute(self, fw: Forward) -> list[torch.Tensor]:
        x = fw.x
        size = tuple(x.shape[-2:])
        raws = []
        for a_all in fw.maps():
            per_image = []
            for i in range(x.shape[0]):
                a = a_all[i]
                keep = torch.arange(a.shape[0], device=a.device)
                if self.max_channels is not None and self.max_channels < a.shape[0]:
                    keep = a.flatten(1).var(1).topk(self.max_channels).indices
                xi = x[i:i + 1]
                target = fw.target.select(torch.tensor([i]))
                base = score_inputs(self.model, lambda s, e, xi=xi: (torch.full_like(xi, self.baseline), None), 1,
                                    target, output=self.output)

                def masked(start: int, stop: int, a=a, keep=keep, xi=xi) -> tuple[torch.Tensor, torch.Tensor]:
                    masks = normalize_maps(upsample(a[keep[start:stop]].float(), size, "bilinear"), "minmax")[:, None]
                    inputs = (xi * masks + self.baseline * (1 - masks)).to(x.dtype)
                    return inputs, torch.zeros(stop - start, dtype=torch.long)

                scores = score_inputs(self.model, masked, len(keep), target, output=self.output,
                                      batch_size=self.batch_size)
                weights = torch.zeros(a.shape[0], scores.shape[1], device=a.device)
                weights[keep] = (scores - base).to(weights)
                per_image.append(torch.einsum("ck,chw->khw", weights.to(a.dtype), a))
            raws.append(torch.cat(per_image))
        return raws


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per default Score-CAM ratio")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="time all-channel Score-CAM per batch_size")
    parser.add_argument("--skip-before", action="store_true", help="skip the old all-channel run (~40 s a photo)")
    parser.add_argument("--tolerances", default="0.05,0.1", help="looser tolerances to compare (comma-separated)")
    parser.add_argument("--bound", action="store_true",
                        help="only the fewest masks any channel subset needs for 0.98 (no timing of methods)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # the table's est.err column says when the cap stopped a map: its log line on every timed call is noise here
    logging.getLogger("lumos.methods.scorecam").setLevel(logging.ERROR)
    model, preprocess, _ = load_model("efficientnet_lite0")
    photos = sample_images()
    if args.bound:
        subset_bound(model, {name: preprocess([photo]) for name, photo in photos.items()})
        return
    default, old = lumos.ScoreCAM(model), OldScoreCAM(model)
    rows, inputs, fulls = [], {}, {}
    for name, photo in photos.items():
        x = preprocess([photo])
        plain = plain_forward(model, x)

        def once(fn, plain=plain):
            """(time / plain forward, time, result) of one call; plain forwards timed right before and after."""
            before = median_time(plain, 3)
            t, out = timed_result(fn)
            return t / ((before + median_time(plain, 3)) / 2), t, out

        r_new, t_new = ratio(plain, lambda x=x: default(x), args.rounds)
        r_old, _ = ratio(plain, lambda x=x: old(x), args.rounds)
        r_after, t_after, full = once(lambda x=x: lumos.ScoreCAM(model, max_channels=None)(x))
        r_before, t_before, _ = (float("nan"),) * 3 if args.skip_before else \
            once(lambda x=x: OldScoreCAM(model, max_channels=None)(x))
        ex, ex_old = default(x), old(x)
        inputs[name], fulls[name] = x, full.maps
        rows.append((name, int(ex.params["channels_used"][0]), float(ex.params["error"][0]),
                     corr(ex.maps, full.maps), r_new, t_new, corr(ex_old.maps, full.maps), r_old,
                     int(full.params["channels_used"][0]), r_before, r_after, t_before / t_after))
    print(f"EfficientNet-Lite0, 224x224, {torch.get_num_threads()} threads, predicted class, layer _act1; "
          f"ratio = time / plain no-grad forward of the same image (default: median of {args.rounds} rounds)")
    head = (f"{'photo':<10} {'masks':>5} {'est.err':>7} {'corr':>6} {'ratio':>6} {'sec':>6} | "
            f"{'old32 corr':>10} {'ratio':>6} | {'all: masks':>10} {'before':>7} {'after':>7} {'speed-up':>8}")
    print("default = adaptive budget (tolerance 0.02, cap 128); old32 = previous default; all = max_channels=None")
    print(head)
    for n, used, err, c, r, t, c_old, r_old, masks, before, after, up in rows:
        print(f"{n:<10} {used:>5} {err:>7.3f} {c:>6.3f} {r:>6.1f} {t:>6.2f} | {c_old:>10.3f} {r_old:>6.1f} | "
              f"{masks:>10} {before:>6.0f}x {after:>6.0f}x {up:>7.2f}x")
    mean = statistics.mean
    cols = {i: mean(r[i] for r in rows) for i in (1, 4, 5, 7, 9, 10, 11)}
    print(f"{'mean':<10} {cols[1]:>5.1f} {'':>7} {min(r[3] for r in rows):>6.3f} {cols[4]:>6.1f} {cols[5]:>6.2f} | "
          f"{min(r[6] for r in rows):>10.3f} {cols[7]:>6.1f} | {'':>10} {cols[9]:>6.0f}x {cols[10]:>6.0f}x "
          f"{cols[11]:>7.2f}x   (corr columns: the minimum)")

    masked_input_cost(model, inputs[next(iter(inputs))], default.batch_size)
    tolerance_tradeoff(model, inputs, fulls, [float(t) for t in args.tolerances.split(",") if t], args.rounds)

    if args.sweep:
        x = preprocess([next(iter(photos.values()))])
        print("\nall-channel Score-CAM on the first photo per batch_size (one call each):")
        plain_first = plain_forward(model, x)
        for bs in (1, 2, 4, 8, 16, 32):
            before = median_time(plain_first, 3)
            t, _ = timed_result(lambda bs=bs: lumos.ScoreCAM(model, max_channels=None, batch_size=bs)(x))
            r = t / ((before + median_time(plain_first, 3)) / 2)
            print(f"  batch_size {bs:>3}: {t:6.2f} s = {r:5.0f}x a plain forward")


def plain_forward(model: torch.nn.Module, x: torch.Tensor):  # noqa: ANN201
    """The reference every ratio divides by: a no-grad forward of ``x``."""
    def plain() -> None:
        with torch.no_grad():
            model(x)

    return plain


def masked_input_cost(model: torch.nn.Module, x: torch.Tensor, batch_size: int, n: int = 64) -> float:
    """Print and return one masked input's time (batches of ``batch_size``) / a plain forward of ``x``."""
    acts = torch.rand(n, 7, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = resolve_targets(None, model(x)).target  # the predicted class
    plain = plain_forward(model, x)

    def masked() -> None:
        MaskScorer(model, x, target, 0.0, batch_size, None)(acts)

    r, _ = ratio(plain, masked, 3)
    per = r / (n + 1)  # the baseline is scored with the masks
    print(f"\none masked input (batches of {batch_size}) = {per:.2f} of a plain forward, so 10x a forward buys at "
          f"most {int((10 - 1) / per)} masks an image after the forward that finds the layer")
    return per


def tolerance_tradeoff(model: torch.nn.Module, inputs: dict, fulls: dict, tolerances: list[float],
                       rounds: int) -> None:
    """Print mean masks, mean time ratio and the lowest correlation with all-channel Score-CAM per tolerance."""
    print("\ntolerance  mean masks  mean ratio  lowest corr  (per photo: masks / corr)")
    for tol in tolerances:
        method = lumos.ScoreCAM(model, tolerance=tol)
        per = []
        for name, x in inputs.items():
            r, _ = ratio(plain_forward(model, x), lambda x=x, method=method: method(x), rounds)
            ex = method(x)
            per.append((name, int(ex.params["channels_used"][0]), r, corr(ex.maps, fulls[name])))
        detail = "  ".join(f"{n} {m}/{c:.3f}" for n, m, _, c in per)
        print(f"{tol:>9} {statistics.mean(p[1] for p in per):>11.1f} {statistics.mean(p[2] for p in per):>10.1f}x "
              f"{min(p[3] for p in per):>12.3f}  {detail}")


def mask_key(channel: torch.Tensor) -> bytes:
    """A channel's [0, 1]-scaled map as bytes, computed as estimate_map scales it (channels sharing a mask
    share a key)."""
    flat = channel.flatten().float()
    return ((flat - flat.min()) / (flat.max() - flat.min())).numpy().tobytes()


def subset_bound(model: torch.nn.Module, inputs: dict, goal: float = 0.98, layer: str = "_act1") -> None:
    """Print, per photo, the fewest masks whose map correlates >= ``goal`` with all-channel Score-CAM, for
    the shipped farthest-point order (with a perfect stopping rule) and for an oracle that scores the channels
    in order of their true contribution |w_c| * ||A_c|| (the rest weigh 0), and what those counts cost.

    Every distinct mask is scored once per photo (all-channel Score-CAM); the subsets are then read from
    that table without further forwards. No method that scores a subset of channels in either order, and
    fills in the others as these do, can stop earlier than its column says."""
    acts: dict[str, torch.Tensor] = {}
    hook = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.update(a=o.detach()))
    x0 = next(iter(inputs.values()))
    per = masked_input_cost(model, x0, 4)
    counts = list(range(4, 129, 4))
    print(f"\nfewest masks for correlation >= {goal} with all-channel Score-CAM (searched in steps of 4 up to 128)")
    print(f"{'photo':<10} {'distinct':>8} {'shipped order':>13} {'oracle order':>12}")
    rows = []
    for name, x in inputs.items():
        with torch.no_grad():
            logits = model(x)
        a = acts["a"][0]
        score = MaskScorer(model, x, resolve_targets(None, logits).target, 0.0, 4, None)
        table: dict[bytes, torch.Tensor] = {}

        def recorded(rows_: torch.Tensor, score=score, table=table) -> torch.Tensor:
            if not table:  # the first call scores every distinct mask (cap=None); later calls look them up
                weights = score(rows_)
                table.update({mask_key(r): w for r, w in zip(rows_, weights, strict=True)})
                return weights
            return torch.stack([table[mask_key(r)] for r in rows_]) if len(rows_) else torch.zeros(0, 1)

        full, distinct, _ = estimate_map(a, recorded, None, 0.0)
        shipped = next((n for n in counts if corr(estimate_map(a, recorded, n, 0.0)[0].clamp_min(0),
                                                   full.clamp_min(0)) >= goal), None)
        w = torch.stack([table.get(mask_key(c), torch.zeros(1)) for c in a])[:, 0]  # constant channels weigh 0
        order = (w.abs() * a.flatten(1).norm(dim=1)).argsort(descending=True)

        def oracle(n: int, w=w, order=order, a=a) -> torch.Tensor:
            keep = torch.zeros_like(w)
            keep[order[:n]] = w[order[:n]]
            return torch.einsum("c,chw->hw", keep, a.float()).clamp_min(0)

        best = next((n for n in counts if corr(oracle(n), full.clamp_min(0)) >= goal), None)
        rows.append((name, distinct, shipped, best))
        print(f"{name:<10} {distinct:>8} {shipped or '>128':>13} {best or '>128':>12}")
    hook.remove()
    for col, label in ((2, "shipped order"), (3, "oracle order")):
        n = statistics.mean(r[col] or 129 for r in rows)
        print(f"{label}: {n:.1f} masks on average = {n * per:.1f}x a plain forward for the masks alone "
              f"(one masked input = {per:.2f} of a forward)")


if __name__ == "__main__":
    main()
