"""Benchmark: the persistent encoding cache (peak RSS against dataset size, a second run's
time to step 1, caching with 1 and 2 processes). Not part of the test suite:

    python tests/benchmarks/bench_cache.py                      # everything (~15 min on 2 cores)
    python tests/benchmarks/bench_cache.py --sizes 1000,20000 --skip-processes

Every run trains a tiny SD1.5 (lorakit tiny) at 64 px for a few steps on synthetic 64 px
PNG images with one distinct caption each, in its own process, one torch thread per process:

* **RSS**: peak RSS (``ru_maxrss``) of a first (cold cache) and a second (warm) run over
  1,000 and 20,000 images. Before the disk cache, the in-memory cache alone grew by ~10 KB
  per image (caption embedding + latent) and dataset rows were held as Python objects.
* **Second run**: seconds from ``Trainer.setup()`` to the end of step 1, cold vs warm, and
  the entries each encoded; torch, diffusers, transformers and accelerate are imported before
  the clock starts (the same cost in both runs, printed separately, and the ratio with them).
* **Processes**: wall time of filling an empty cache (``EncodingCache.fill``, the barrier
  included: the slowest process) with 1 process and with 2 under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_images(folder: Path, n: int) -> None:
    """``n`` distinct 64 px PNGs (a colour gradient each, no two equal: identical images share one
    cache entry) with a distinct caption each."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, 64, dtype=np.float32)
    rows = []
    for i in range(n):
        r, g, b = (i * 37) % 256, (i * 91) % 256, (i * 53) % 256
        pixels = np.stack([r * ramp[None, :].repeat(64, 0), g * ramp[:, None].repeat(64, 1),
                           np.full((64, 64), b, np.float32)], -1).astype(np.uint8)
        pixels[0, :3] = [[i % 256, i // 256 % 256, 255]] * 3  # no two images alike
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": f"a synthetic gradient number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def child(spec: dict) -> None:
    """One training run in this process; prints one JSON line of what it measured."""
    started_imports = time.perf_counter()
    import accelerate  # noqa: F401  (the libraries a run imports anyway: the same cost cold or warm)
    import diffusers  # noqa: F401
    import diffusers.models  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from lorakit import cache as cache_module
    from lorakit.config import TrainConfig
    from lorakit.training import Trainer

    imports = time.perf_counter() - started_imports
    fill_time = {}
    real_fill = cache_module.EncodingCache.fill

    def timed_fill(self, note=print, progress=None):
        t, cpu = time.perf_counter(), time.process_time()
        real_fill(self, note=lambda *_: None)
        fill_time["cpu"] = time.process_time() - cpu  # this process's own work (a proxy for a free core each)
        self.barrier()  # the slowest process decides when training starts
        fill_time["s"] = time.perf_counter() - t

    cache_module.EncodingCache.fill = timed_fill

    class FirstStep:
        at = None
        stamps: list = []

        def start(self, total, completed=0):
            self.stamps.append(time.perf_counter())

        def update(self, step, **_):
            self.stamps.append(time.perf_counter())
            if self.at is None:
                self.at = time.perf_counter()

        def note(self, text):
            pass

        def finish(self):
            pass

    progress = FirstStep()
    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(**spec), progress=progress).setup()
    trainer.run()
    rank = trainer.accelerator.process_index
    to_step1 = (progress.at or time.perf_counter()) - t0
    per_step = [b - a for a, b in zip(progress.stamps, progress.stamps[1:])][1:]  # the first step warms up
    Path(os.environ["LORAKIT_BENCH_RESULTS"], f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "imports_s": imports, "to_step1_s": to_step1, "start_to_step1_s": to_step1 + imports, "fill_s": fill_time.get("s"), "fill_cpu_s": fill_time.get("cpu"),
        "step_s": statistics.median(per_step) if per_step else None,
        "encoded": dict(trainer.cache.encoded), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def launch(spec: dict, processes: int = 1) -> list[dict]:
    results = Path(tempfile.mkdtemp(prefix="bench-results-"))  # one file per process (their stdout interleaves)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "LORAKIT_BENCH_RESULTS": str(results)}
    me = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    if processes == 1:
        argv = [sys.executable, *me]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *me]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in results.glob("rank-*.json")), key=lambda r: r["rank"])
    shutil.rmtree(results)
    return ranks


def spec_for(model, data, out, cache_dir, steps=3) -> dict:
    return dict(arch="sd15", model=str(model), data=str(data), output=str(out), resolution=64, max_steps=steps,
                batch_size=1, learning_rate=1e-3, num_threads=1, cache_dir=str(cache_dir), report_to="none")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child")
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--process-images", type=int, default=2000)
    parser.add_argument("--skip-processes", action="store_true")
    parser.add_argument("--workdir")
    parser.add_argument("--full-size", action="store_true", help="only the full-size SD1.5 pairs (slow)")
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    from lorakit.tiny import make_tiny_model

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lorakit-bench-cache-"))
    if args.full_size:
        return full_size(work, args.pairs)
    model = work / "model"
    if not model.exists():
        make_tiny_model("sd15", model, seed=0)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = {}
    for n in sizes:
        data = work / f"images-{n}"
        if not data.exists():
            t = time.perf_counter()
            write_images(data, n)
            print(f"wrote {n} images in {time.perf_counter() - t:.1f}s", flush=True)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        for old in work.glob(f"out-{n}-*"):
            shutil.rmtree(old)
        cold = launch(spec_for(model, data, work / f"out-{n}-cold", cache))[0]
        warm = launch(spec_for(model, data, work / f"out-{n}-warm", cache))[0]
        results[n] = (cold, warm)
        size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20
        print(f"{n:>6} images: cold run peak RSS {cold['peak_rss_mb']:.0f} MB, to step 1 {cold['to_step1_s']:.1f}s "
              f"(encoded {cold['encoded']}); warm run peak RSS {warm['peak_rss_mb']:.0f} MB, to step 1 "
              f"{warm['to_step1_s']:.1f}s (encoded {warm['encoded']}) = {warm['to_step1_s'] / cold['to_step1_s']:.0%} "
              f"of the cold run's; cache on disk {size:.0f} MB; imports {cold['imports_s']:.1f}s / {warm['imports_s']:.1f}s "
              f"(with them: warm {warm['start_to_step1_s'] / cold['start_to_step1_s']:.0%} of cold)", flush=True)
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        for i, what in ((0, "cold"), (1, "warm")):
            diff = results[hi][i]["peak_rss_mb"] - results[lo][i]["peak_rss_mb"]
            print(f"peak RSS {hi} vs {lo} images ({what} cache): {diff:+.0f} MB (must be < 150 MB)", flush=True)
    if not args.skip_processes:
        n = args.process_images
        data = work / f"images-{n}"
        if not data.exists():
            write_images(data, n)
        walls = {}
        for processes in (1, 2, 1, 2):  # interleaved: these machines have slow stretches
            cache = work / f"cache-procs-{processes}"
            shutil.rmtree(cache, ignore_errors=True)
            out = work / f"out-procs-{processes}"
            shutil.rmtree(out, ignore_errors=True)
            ranks = launch(spec_for(model, data, out, cache, steps=1), processes)
            wall = max(r["fill_s"] for r in ranks)
            cpu = max(r["fill_cpu_s"] for r in ranks)
            walls.setdefault(processes, []).append((wall, cpu))
            print(f"{processes} process(es), {n} images: caching wall time {wall:.1f}s, CPU time of the busiest "
                  f"process {cpu:.1f}s, encoded per process {[r['encoded'] for r in ranks]}", flush=True)
        (one, one_cpu), (two, two_cpu) = min(walls[1]), min(walls[2])
        print(f"caching with 2 processes: wall {two:.1f}s vs 1 process {one:.1f}s = {two / one:.2f}x (best of 2 each; "
              f"must be <= 0.6x); CPU time of the busiest process {two_cpu:.1f}s vs {one_cpu:.1f}s = "
              f"{two_cpu / one_cpu:.2f}x (the wall time where each process has its own core or GPU; load "
              f"average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)", flush=True)


def full_size(work: Path, pairs: int) -> None:
    """Full-size SD1.5 architecture (random weights), 128 px, batch 1, the bundled images: peak
    RSS and median step time cached (disk cache, warm after the first run) vs --no-cache, in
    interleaved pairs, each run in its own process."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step_time import build_full_size_sd15

    from lorakit.testing import example_data

    model = work / "sd15-full"
    if not model.exists():
        t = time.perf_counter()
        build_full_size_sd15(model)
        print(f"built full-size SD1.5 in {time.perf_counter() - t:.0f}s", flush=True)
    threads = os.cpu_count() or 2
    runs: dict = {True: [], False: []}
    for i in range(pairs):
        for cached in (True, False):
            out = work / f"out-full-{cached}"
            shutil.rmtree(out, ignore_errors=True)
            spec = {**spec_for(model, example_data(), out, work / "cache-full", steps=6), "resolution": 128,
                    "num_threads": threads, "cache": cached}
            r = launch(spec)[0]
            runs[cached].append(r)
            print(f"pair {i + 1} {'cached' if cached else 'uncached'}: {r['step_s']:.3f} s/step, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
    med = {k: (statistics.median(r["step_s"] for r in v), statistics.median(r["peak_rss_mb"] for r in v))
           for k, v in runs.items()}
    print(f"full-size SD1.5, 128 px, batch 1, {threads} threads: cached {med[True][0]:.3f} s/step, peak RSS "
          f"{med[True][1]:.0f} MB; uncached {med[False][0]:.3f} s/step, peak RSS {med[False][1]:.0f} MB; RSS ratio "
          f"{med[True][1] / med[False][1]:.2f} (must be <= 0.85)", flush=True)


if __name__ == "__main__":
    main()
