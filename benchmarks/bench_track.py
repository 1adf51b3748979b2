"""Logging overhead of ExplanationLogger: one logging call (8 probe images x 2 methods) vs one training step.

    .venv/bin/python benchmarks/bench_track.py [--rounds 15] [--size 32] [--batch-size 32] [--threads 1]

The model is the example's TinyCNN (fresh init) at the example's settings. Methods: Grad-CAM (true and
predicted class side by side) and the feature maps of ``features.block1``. Medians over rounds. The
logging call is timed with an in-memory sink (lumos' own work) and with a TensorBoard sink (plus PNG
encoding and event-file writing).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from timing import median_time
from torch import nn

from lumos.synthetic import TinyCNN, make_dataset
from lumos.track import ExplanationLogger, MemorySink, TensorBoardSink


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = make_dataset(args.batch_size + 8, size=args.size, seed=0)
    model = TinyCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = data.images[: args.batch_size], data.labels[: args.batch_size]
    probe, labels = data.images[-8:], data.labels[-8:]

    def train_step() -> None:
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step = median_time(train_step, args.rounds, warmup=True)
    kwargs = dict(methods=["gradcam", "features"], layer="features.block4", feature_layer="features.block1",
                  class_names=data.class_names)
    mem = ExplanationLogger(probe, labels, sinks=[MemorySink()], **kwargs)
    t_mem = median_time(lambda: mem.log(model, 0), args.rounds, warmup=True)
    with tempfile.TemporaryDirectory() as tmp:
        tb = ExplanationLogger(probe, labels, sinks=[TensorBoardSink(tmp)], **kwargs)
        t_tb = median_time(lambda: tb.log(model, 0), args.rounds, warmup=True)
        tb.close()
    print(f"TinyCNN, {args.size}x{args.size} px, batch {args.batch_size}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds")
    print(f"one training step:                         {step * 1e3:8.1f} ms")
    print(f"one logging call, 8 images x 2 methods:    {t_mem * 1e3:8.1f} ms  = {t_mem / step:5.1f} training steps"
          " (in-memory sink)")
    print(f"                  ... with TensorBoard:    {t_tb * 1e3:8.1f} ms  = {t_tb / step:5.1f} training steps")


if __name__ == "__main__":
    main()
