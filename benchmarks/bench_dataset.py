"""Data set runs, as ratios measured in one run on this machine.

- ``local``: ``explain_dataset(engine="local")`` (decode workers, store rows, Parquet chunks) against a bare Python
  loop calling the same ``Explainer`` on the same batches already decoded; images/s of both (target >= 0.9), and
  the ratio of the main process's CPU time (what the engine adds besides waiting for a busy machine). TinyCNN at
  64 x 64 (about 2 ms per image) and EfficientNet-Lite0 at 224 x 224 (about 70 ms).
- ``ray``: the Ray engine with 2 actors x 1 thread against 1 actor x 1 thread on a local Ray with 2 CPUs
  (target >= 1.5x), wall time with actor start-up included, EfficientNet-Lite0 by default (TinyCNN's work is
  too short for the start-up to amortise).
- ``rss``: peak RSS (VmHWM) of a local run over 2,000 and 10,000 small images, each in its own process, and its RSS
  after every 1024 images (the images are 500 synthetic PNGs hard-linked under new names).

Each ratio pairs every timed call with its reference timed right before it and reports the median over rounds.
Run: ``.venv/bin/python benchmarks/bench_dataset.py [--part local,ray,rss] [--n 4096] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lumos.dataset import Item, RunOptions, explain_dataset, list_items
from lumos.dataset.batch import BatchWorker, decode_batch
from lumos.explainer import Explainer, ExplainSpec, ModelSpec
from lumos.synthetic.shortcut import make_shortcut_dataset, write_image_folder


def spec_for(folder: Path, model: str = "tinycnn", methods: tuple[str, ...] = ("gradcam",)) -> ExplainSpec:
    """TinyCNN at 64 x 64 (about 4 ms per image and thread), or EfficientNet-Lite0 at 224 x 224 (about 40 ms)."""
    if model == "tinycnn":
        return ExplainSpec(model=ModelSpec("lumos.synthetic:load_tinycnn", size=64, mean=(0.0,), std=(1.0,),
                                           labels=str(folder / "labels.txt")), methods=methods)
    return ExplainSpec(model=ModelSpec(model), methods=methods)


def make_folder(root: Path, n: int, distinct: int = 500) -> Path:
    """``n`` image files in class folders: ``distinct`` synthetic PNGs, then hard links to them."""
    if (root / "labels.txt").exists() and len(list(root.rglob("*.png"))) >= n:
        return root
    write_image_folder(make_shortcut_dataset(min(n, distinct), seed=21), root)
    files = sorted(root.rglob("*.png"))
    for i in range(len(files), n):
        src = files[i % len(files)]
        os.link(src, src.parent / f"copy{i:06d}.png")
    return root


def local_part(folder: Path, n: int, batch: int, workers: int, rounds: int, model: str) -> list[str]:
    spec = spec_for(folder, model)
    explainer = Explainer(spec)
    items, _ = list_items([folder])
    items = [Item(it.index, it.path) for it in items[:n]]  # the folder names are not ImageNet classes
    worker = BatchWorker(spec, RunOptions(), explainer)
    batches = [decode_batch(worker.decoder, items[s:s + batch]).x for s in range(0, len(items), batch)]

    def bare() -> None:
        for x in batches:
            explainer(x)

    def engine() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            explain_dataset(items, spec, Path(tmp) / "store", batch_size=batch, workers=workers, explainer=explainer)

    engine()  # warm-up (the automatic layer, allocator)
    ratios, cpu_ratios, bare_t, engine_t = [], [], [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        bare()
        t1, c1 = time.perf_counter(), time.process_time()
        engine()
        t2, c2 = time.perf_counter(), time.process_time()
        bare_t.append(t1 - t0)
        engine_t.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
        cpu_ratios.append((c1 - c0) / (c2 - c1))
    return [f"| local engine vs bare Explainer loop, {model} ({n} images, batch {batch}, {workers} decode worker(s), "
            f"torch {torch.get_num_threads()} thread(s)) | {n / statistics.median(engine_t):.0f} | "
            f"{n / statistics.median(bare_t):.0f} | {statistics.median(ratios):.2f} (CPU time of the main process: "
            f"{statistics.median(cpu_ratios):.2f}) |"]


def ray_part(folder: Path, n: int, batch: int, rounds: int, model: str) -> list[str]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    spec = spec_for(folder, model)
    items, _ = list_items([folder])
    items = [Item(it.index, it.path) for it in items[:n]]

    def run(actors: int) -> tuple[float, float]:
        """Images/s and the cores the actors used on average (their CPU seconds / wall seconds)."""
        cpu: dict[int, float] = {}
        first: dict[int, float] = {}
        stop = threading.Event()

        def watch() -> None:  # the actors' CPU time (Linux /proc), sampled until the run ends
            tick = os.sysconf("SC_CLK_TCK")
            while not stop.wait(0.25):
                for pid in filter(str.isdigit, os.listdir("/proc")):
                    with contextlib.suppress(OSError):
                        if b"MapWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                            seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                            first.setdefault(int(pid), seconds)  # (a pre-started worker's imports don't count)
                            cpu[int(pid)] = seconds - first[int(pid)]

        watcher = threading.Thread(target=watch, daemon=True)
        with tempfile.TemporaryDirectory() as tmp:
            watcher.start()
            start = time.perf_counter()
            explain_dataset(items, spec, Path(tmp) / "store", engine="ray", batch_size=batch,
                            ray={"concurrency": actors, "threads": 1})
            wall = time.perf_counter() - start
            stop.set()
            watcher.join()
        return n / wall, sum(cpu.values()) / wall

    results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(rounds):
        for actors in (1, 2):
            results[actors].append(run(actors))
    ray.shutdown()
    speedup = statistics.median(b[0] / a[0] for a, b in zip(results[1], results[2], strict=True))
    cores = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    return [f"| Ray 2 actors x 1 thread vs 1 actor x 1 thread, {model} ({n} images, batch {batch}; wall time, "
            f"actor start included; cores the actors used: {cores[2]:.2f} vs {cores[1]:.2f}) | "
            f"{statistics.median(r[0] for r in results[2]):.0f} | {statistics.median(r[0] for r in results[1]):.0f} | "
            f"{speedup:.2f} |"]


_RSS_CHILD = """
import json, resource, sys, tempfile, torch
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
from bench_dataset import spec_for
from lumos.dataset import explain_dataset, list_items
folder, n = Path({folder!r}), {n}
items, _ = list_items([folder])
done, marks = [0], []
def on_batch(k):  # the current RSS after every 1024 images
    done[0] += k
    if done[0] % 1024 < k:
        marks.append(int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20)
with tempfile.TemporaryDirectory() as tmp:
    explain_dataset(items[:n], spec_for(folder), Path(tmp) / "store", batch_size=64, workers=1, on_batch=on_batch)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"peak": int(hwm) / 1024, "marks": marks}}))  # VmHWM: this process only (ru_maxrss inherits)
"""


def rss_part(folder: Path, sizes: list[int]) -> list[str]:
    rows = []
    for n in sizes:
        code = _RSS_CHILD.format(bench=str(Path(__file__).parent), folder=str(folder), n=n)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        took = time.perf_counter() - start
        rss = json.loads(out.strip().splitlines()[-1])
        marks = rss["marks"]
        rows.append(f"| local engine, {n} images, batch 64, 1 decode worker | {rss['peak']:.0f} MiB | "
                    f"{' '.join(f'{m:.0f}' for m in marks)} | {n / took:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", default="local,ray,rss")
    parser.add_argument("--n", type=int, default=4096, help="tinycnn images (EfficientNet: 1/16 locally, 1/4 on Ray)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--models", default="tinycnn,efficientnet_lite0", help="for the local part")
    parser.add_argument("--ray-model", default="efficientnet_lite0", help="for the ray part (tinycnn: start-up "
                        "dominates a short run)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "lumos-bench-dataset")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.part.split(",")
    folder = make_folder(args.data, 10_000 if "rss" in parts else args.n)
    lines = ["| measurement | lumos images/s | reference images/s | ratio |", "|---|---|---|---|"]
    if "local" in parts:
        for model in args.models.split(","):
            n = args.n if model == "tinycnn" else max(args.n // 16, args.batch)
            lines += local_part(folder, n, args.batch if model == "tinycnn" else 16, args.workers, args.rounds, model)
    if "ray" in parts:
        heavy = args.ray_model != "tinycnn"
        lines += ray_part(folder, args.n // 4 if heavy else args.n, 16 if heavy else args.batch, args.rounds,
                          args.ray_model)
    if "rss" in parts:
        lines += ["", "| run | peak RSS (VmHWM), main process | its RSS (MiB) after every 1024 images | "
                  "images/s (process start included) |", "|---|---|---|---|"]
        lines += rss_part(folder, [2000, 10_000])
    print("\n".join(lines))
    print(f"(machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    print(f"(images kept in {args.data} for the next run; delete it when done)")


if __name__ == "__main__":
    main()
