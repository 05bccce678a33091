"""Benchmark: peak memory of caching large images, one VAE call per chunk. Not part of the suite:

    python tests/benchmarks/bench_encode_memory.py --side 1024 --images 1,2

Each measurement runs in its own process: the full-size SD VAE (random weights, fp32, built
once under --workdir), ``--images N`` zero images of ``--side`` px encoded in one call, and the
peak RSS above the loaded model printed. The activations grow with the pixels of the call,
which is why caching encodes at most one 1024 px image at a time (``lorakit.cache.image_chunk``)."""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model: str, n: int, side: int) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    x = torch.zeros(n, 3, side, side)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    with torch.no_grad():
        vae.encode(x).latent_dist.mean
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(f"{n} image(s) of {side} px in one VAE call: peak {peak:.0f} MB above the loaded VAE "
          f"({peak / n:.0f} MB per image), {time.perf_counter() - t:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--images", default="1,2")
    parser.add_argument("--workdir")
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]))
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_step_time import build_full_size_sd15

    model = Path(args.workdir or tempfile.mkdtemp(prefix="lorakit-bench-vae-")) / "sd15-full"
    if not model.exists():
        build_full_size_sd15(model)
    for n in (int(v) for v in args.images.split(",")):
        subprocess.run([sys.executable, __file__, "--child", str(model), str(n), str(args.side)], check=True)


if __name__ == "__main__":
    main()
