"""Benchmark: seconds per training step with and without lorakit's encoder cache.

Builds a *full-size* SD1.5 architecture with random weights (UNet 860M, VAE, CLIP-L sized text
encoder with the offline byte-level tokenizer), writes it to disk in diffusers' layout, and
trains a rank-4 LoRA on the bundled images with

  A. lorakit's default (latents and caption embeddings computed once, cached), and
  B. --no-cache (VAE and text encoder run every step, as diffusers' example scripts do).

Runs alternate A, B, A, B, ... (these machines have slow stretches) and the medians are
printed, with the peak RSS of the process. Not part of the test suite:

    python tests/benchmarks/bench_step_time.py --resolution 128 --steps 6 --pairs 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_full_size_sd15(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    te_config = tiny_clip_text_config(hidden_size=768, projection_dim=768, layers=12, heads=12)
    te_config.intermediate_size = 3072
    text_encoder = CLIPTextModel(te_config)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(str(path))


def time_run(model: Path, out: Path, resolution: int, steps: int, cache: bool, threads: int) -> float:
    """Median seconds per step of one run (the first step, which warms up, is dropped)."""
    from lorakit.testing import example_data, tiny_config
    from lorakit.training import Trainer

    config = tiny_config("sd15", model, example_data(), out, resolution=resolution, max_steps=steps,
                         learning_rate=1e-4, cache=cache, num_threads=threads, overwrite=True)
    trainer = Trainer(config).setup()
    stamps = []

    class Clock:
        def start(self, total, completed=0):
            stamps.append(time.perf_counter())

        def update(self, step, loss, lr, metrics=None):
            stamps.append(time.perf_counter())

        def note(self, text):
            pass

        def finish(self):
            pass

    trainer.progress = Clock()
    trainer.run()
    per_step = [b - a for a, b in zip(stamps, stamps[1:])][1:]
    return statistics.median(per_step)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model", type=Path, help="reuse a model folder written by an earlier run")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None or not model.exists():
            model = args.model or tmp / "sd15-full"
            t0 = time.perf_counter()
            build_full_size_sd15(model)
            print(f"built full-size SD1.5 (random weights) in {time.perf_counter() - t0:.0f}s", flush=True)
        cached, fresh = [], []
        for i in range(args.pairs):
            cached.append(time_run(model, tmp / "a", args.resolution, args.steps, True, args.threads))
            fresh.append(time_run(model, tmp / "b", args.resolution, args.steps, False, args.threads))
            print(f"pair {i + 1}: cached {cached[-1]:.3f} s/step, uncached {fresh[-1]:.3f} s/step", flush=True)
        a, b = statistics.median(cached), statistics.median(fresh)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
        print(
            f"median s/step at {args.resolution}px, batch 1, rank 4, {args.threads} threads, torch {torch.__version__}: "
            f"cached {a:.3f}, uncached {b:.3f}, speed-up x{b / a:.2f}; peak RSS {peak_gb:.1f} GB"
        )


if __name__ == "__main__":
    sys.exit(main())
