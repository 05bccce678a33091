"""What a checkpoint saves and a resume restores: :class:`TrainState`.

A ``checkpoint-N/`` folder holds everything needed to continue bit-for-bit: the LoRA
weights (fp32, ``lora_params.safetensors``), optimizer and LR-scheduler state
(``torch.load(weights_only=True)``, never plain unpickling), the grad scaler, the step, the
process count and the config fingerprint (``training_state.json``); plus a
``pytorch_lora_weights.safetensors`` usable on its own. No noise state is needed: every draw
of step N is derived from (seed, N, the sample's place in the global batch) by
:mod:`lorakit.rng`, so a checkpoint resumes exactly on any number of processes that splits
the same global batch (``--batch-size`` x processes); ``rng_state.safetensors`` records the
main process's generator states for the record and for older readers.
A checkpoint is written to a temporary folder, every file fsynced, sealed with the sha256 of
each file (``lorakit_checksums.json``, written last) and only then renamed, so an interrupted
save never becomes the "latest" and later damage is found before a resume trusts it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

STATE_FILE = "training_state.json"
PARAMS_FILE = "lora_params.safetensors"
RNG_FILE = "rng_state.safetensors"
CHECKSUMS = "lorakit_checksums.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(config) -> dict:
    """The config values a resume must match: the options declared ``resume=True``."""
    from lorakit.config import resume_keys

    data = config.to_dict()
    return {k: data.get(k) for k in resume_keys(config)}


def list_checkpoints(output_dir: Path, complete: bool = True) -> list[Path]:
    """``checkpoint-N`` folders, oldest first; ``complete=False``: also those missing their state
    file (damaged, to be named when a resume skips them)."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (not complete or (p / STATE_FILE).is_file()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


def rng_now(generator) -> tuple:
    """``(generator state, torch CPU state)``: what this process's random draws continue from."""
    import torch

    return generator.get_state(), torch.get_rng_state()


def check_processes_agree(accelerator, params) -> None:
    """With several processes every copy of the LoRA must be identical (gradients are
    averaged before each step); a mismatch means a broken setup, not a usable result."""
    import torch

    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9):
        raise RuntimeError(f"LoRA weights differ between processes: {sums.tolist()}")


def global_batch_fix(saved_per: int, saved_world: int, per: int, n: int) -> str | None:
    """The rule of a resume on another process count: the global batch (``--batch-size`` x
    processes) stays, since the data order and every draw depend on the global batch only.
    None when ``per`` x ``n`` keeps it, else the fix to name."""
    was = saved_per * saved_world
    if was == per * n:
        return None
    return f"use --batch-size {was // n}" if was % n == 0 else f"use a process count that divides {was}"


@dataclass
class TrainState:
    """The objects a run's progress lives in; nothing else is saved or restored."""

    config: object
    lora_modules: dict  # component name -> module carrying LoRA
    optimizer: object
    lr_scheduler: object
    generator: object  # this process's CPU generator, reseeded per micro-batch (older plugins draw from it)
    scaler: object = None
    num_processes: int = 1
    process_index: int = 0
    global_step: int = 0

    def lora_params(self) -> dict:
        return {
            f"{name}/{pname}": p
            for name, module in self.lora_modules.items()
            for pname, p in module.named_parameters()
            if "lora_" in pname
        }

    def save(self, output_dir: Path, write_lora, limit: int | None = None) -> Path:
        """Write ``checkpoint-<global_step>``; ``write_lora(folder)`` writes the adapter file."""
        step = self.global_step
        final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            write_lora(tmp)
            self._write(tmp)
            fsutil.seal(tmp, CHECKSUMS)
        except BaseException:  # a full disk, a kill: never leave half a checkpoint behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Swap in the new folder before deleting an old one of the same step: a crash in
        # between leaves one complete checkpoint, never none.
        aside = output_dir / f".checkpoint-{step}.old"
        if final.exists():
            if aside.exists():
                shutil.rmtree(aside)
            final.rename(aside)
        fsutil.publish(tmp, final)
        if aside.exists():
            shutil.rmtree(aside)
        if limit:
            # only checkpoints older than the new one count against the limit; it is never pruned
            older = [c for c in list_checkpoints(output_dir) if step_of(c) < step]
            for old in older[: max(0, len(older) - (limit - 1))]:
                shutil.rmtree(old)
                log.info("removed %s (--checkpoints-limit %d)", old.name, limit)
        return final

    def estimated_size(self) -> int:
        """Bytes a checkpoint takes: the LoRA twice (fp32 copy and adapter file), AdamW's two
        moments, and a little for the rest."""
        return sum(p.numel() * 4 for p in self.lora_params().values()) * 4 + (64 << 10)

    def _write(self, folder: Path) -> None:
        import io

        import torch
        from safetensors.torch import save

        def write_torch(name, obj):
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            fsutil.write_bytes(folder / name, buffer.getvalue())

        params = {k: p.detach().to("cpu").contiguous() for k, p in self.lora_params().items()}
        fsutil.write_bytes(folder / PARAMS_FILE, save(params))
        write_torch("optimizer.pt", self.optimizer.state_dict())
        write_torch("scheduler.pt", self.lr_scheduler.state_dict())
        generator_state, torch_state = rng_now(self.generator)
        rng = {"generator": generator_state, "torch": torch_state}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda{i}"] = s
        fsutil.write_bytes(folder / RNG_FILE, save(rng))
        state = {
            "global_step": self.global_step,
            "num_processes": self.num_processes,
            "config": fingerprint(self.config),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "checksums": CHECKSUMS,  # a checkpoint that says so but lacks them is damaged
        }
        fsutil.write_bytes(folder / STATE_FILE, json.dumps(state, indent=2, sort_keys=True).encode())

    def load(self, path: Path) -> dict:
        """Restore checkpoint ``path``; refuse one from a different run."""
        import torch
        from safetensors.torch import load_file

        state = json.loads((path / STATE_FILE).read_text())
        saved, now = state.get("config", {}), fingerprint(self.config)
        self._check_global_batch(path, saved, state.get("num_processes", 1))
        different = [k for k in now if k in saved and saved[k] != now[k] and k != "batch_size"]
        if different:
            details = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in different)
            raise LorakitError(f"--resume {path} comes from a different run ({details}); use the same settings or --overwrite.")
        params = load_file(str(path / PARAMS_FILE))
        for key, p in self.lora_params().items():
            if key not in params:
                raise LorakitError(f"--resume {path} lacks LoRA weight {key}; it belongs to another setup.")
            with torch.no_grad():
                p.copy_(params[key].to(p.device, p.dtype))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu"))
        self._load_rng(load_file(str(path / RNG_FILE)))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state["global_step"]
        return state

    def _check_global_batch(self, path: Path, saved: dict, saved_world: int) -> None:
        """A resume may change the process count, not the global batch (:func:`global_batch_fix`)."""
        if "batch_size" not in saved:
            return
        was, per, n = saved["batch_size"] * saved_world, self.config.batch_size, self.num_processes
        fix = global_batch_fix(saved["batch_size"], saved_world, per, n)
        if fix is None:
            if saved_world != n and self.process_index == 0:
                log.info("%s was written by %d process(es), this run has %d: the same global batch of %d, "
                         "the same training", path.name, saved_world, n, was)
            return
        raise LorakitError(
            f"--resume {path} was trained with a global batch of {was} (--batch-size {saved['batch_size']} x "
            f"{saved_world} process(es)), this run's is {per * n} (--batch-size {per} x {n}); {fix}."
        )

    def _load_rng(self, rng: dict) -> None:
        """The main process's states as saved (nothing in training depends on them: every draw
        is derived from the step); a checkpoint of an older lorakit may hold one per process."""
        import torch

        self.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
