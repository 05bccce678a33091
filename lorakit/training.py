"""The shared training loop. It knows no architecture: every model-specific step is a hook.

:class:`Trainer` wires the pieces a batch passes through, in this order:
:mod:`lorakit.batches` (which examples, at which size) -> :mod:`lorakit.cache` (encodings,
cached once) -> :mod:`lorakit.step` (loss, backward, one gradient reduction, guarded
update) -> :mod:`lorakit.state` (checkpoints) -> :mod:`lorakit.outputs` (the files a run
writes). Every random draw is a pure function of (seed, epoch, step), so a run resumed
from ``checkpoint-N`` continues exactly as the uninterrupted run would have.

While it runs, a :class:`RunGuard` holds the output folder's lock and turns SIGINT (Ctrl-C)
and SIGTERM (Docker, SLURM, Kubernetes) into the same thing: the step in progress is
finished (an update) or rolled back, the finished steps are saved, and the run stops with
the exit status of the signal (130 / 143) and the command that resumes it.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorakit import checkpoints, hub, losscurve, outputs, parallel, saveformat, sharding, tracking, validation
from lorakit.batches import Batches, checked_resolution
from lorakit.cache import EncodingCache
from lorakit.config import TrainConfig, validate
from lorakit.data.samples import first_examples
from lorakit.errors import LorakitError
from lorakit.models import load_components
from lorakit.locking import RunGuard, StopRequested  # noqa: F401  (StopRequested: for callers)
from lorakit.outputs import WEIGHT_NAME  # noqa: F401  (imported from here by older code)
from lorakit.state import TrainState, check_processes_agree
from lorakit.optimizers import make_optimizer, prepare_device
from lorakit.step import Stepper

log = logging.getLogger("lorakit")


@dataclass
class TrainResult:
    output_dir: Path
    weights: Path
    global_step: int
    losses: list = field(default_factory=list)


class Trainer:
    """Set up a run from a :class:`TrainConfig` (``setup``: models, data, LoRA, optimizer,
    caches, checkpoint), then :meth:`run` it to ``max_steps``."""

    def __init__(self, config: TrainConfig, progress=None):
        self.config = validate(config)
        self.progress = progress
        self.losses: list[float] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        self.output_dir = Path(self.config.output).expanduser()
        self.guard = RunGuard(self.output_dir)
        self.guard.install()
        try:
            self.guard.lock_output()
            self._setup()
        except BaseException:
            self.guard.close()
            raise
        self.guard.restore()  # until run(): a stop between the two calls is the caller's
        return self

    def _setup(self) -> None:
        import torch

        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self._load_plugins()
        if self.guard.lock is not None:
            checkpoints.remove_strays(self.output_dir)
        # first: the precision accelerate's launcher chose is part of the settings a resume checks
        self.accelerator, self.device, self.weight_dtype = _start_accelerator(config)
        prepare_device(config, self.device)  # e.g. an 8-bit optimizer without a GPU: before the model loads
        resume_from = outputs.check_output_dir(self.output_dir, config)
        saveformat.check_names_free(self.output_dir, config)
        self.hub = hub.prepare(config, self.output_dir, self.accelerator.is_main_process)  # before the model loads
        self.model_path = _resolve_model(config, self.info, self.pm)
        self.components = self._load_components()
        self.resolution = checked_resolution(self.config, self.info, self.components.get("default_resolution"))
        self.dataset = self.pm.hook.build_dataset(config=config, components=self.components, pm=self.pm)
        self.dataset = first_examples(self.dataset, config.max_train_samples)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        self.batches = Batches(self.dataset, config, self.resolution, world, rank, self.info.size_multiple)
        config.max_steps = self.batches.run_steps()  # --max-steps or --epochs, as the run config records
        if config.buckets:
            self._say(self.batches.bucket_summary())
        self._add_lora()
        sharding.apply(self)  # the frozen denoiser across the processes, when asked
        self.params, self.optimizer, self.lr_scheduler = make_optimizer(
            self.components, self.lora_configs, self.trained_text_encoders, config, self.accelerator
        )
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + rank)
        self.state = TrainState(
            config, {n: self.components[n] for n in self.lora_configs}, self.optimizer, self.lr_scheduler,
            self.generator, getattr(self.accelerator, "scaler", None), world, rank,
        )
        self.cache = EncodingCache(self.pm, self.components, config, self.info, self.batches, self.device,
                                   self.lora_configs, reload=self._load_components,
                                   barrier=self.accelerator.wait_for_everyone)
        self.stepper = Stepper(self.state, self.cache, self.pm, self.accelerator, self.params, config)
        self.guard.busy = lambda: self.stepper.updating  # an update in progress is finished first
        if self.accelerator.is_main_process:
            outputs.clear_earlier_run(self.output_dir, config)
        self.accelerator.wait_for_everyone()
        if resume_from is not None:
            resume_from = checkpoints.resume_run(self.state, config, self.output_dir, resume_from)
            self._say(f"resumed from {resume_from} at step {self.global_step}")
        self.cache.fill(self._say, self.progress if self.accelerator.is_main_process else None)
        if self.accelerator.is_main_process:
            outputs.write_run_config(self.output_dir, config)

    def _load_plugins(self):
        from lorakit.plugins import get_plugin_manager, require_hooks

        self.pm = get_plugin_manager(self.config.arch, self.config.modes)
        require_hooks(self.pm, self.config.arch)
        self.info = self.pm.hook.arch_info()

    def _load_components(self) -> dict:
        return load_components(self.pm, self.model_path, self.config, self.device, self.weight_dtype)

    def _add_lora(self):
        import torch

        from lorakit import lora

        config, components = self.config, self.components
        if config.init_lora:  # the file's layers, ranks and weights (lorakit.initlora)
            from lorakit import initlora

            self.lora_configs = initlora.inject(self)
        else:
            targets = _targets(self.pm, self.info, config, components)
            torch.manual_seed(config.seed)  # LoRA init is drawn from the global RNG
            self.lora_configs = lora.inject_lora(components, targets, config)
        self.trained_text_encoders = [n for n in self.lora_configs if n in self.info.text_encoders]
        if config.gradient_checkpointing:
            for name in self.lora_configs:
                _enable_gradient_checkpointing(components[name])
        for name in self.lora_configs:
            components[name].train()

    # ------------------------------------------------------------------ the pieces, by name
    @property
    def global_step(self) -> int:
        return self.state.global_step if hasattr(self, "state") else 0

    @property
    def image_cache(self) -> dict:
        return self.cache.image_cache

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        return self.batches.epoch_batches(epoch)

    def size_of(self, sample) -> tuple[int, int]:
        return self.batches.size_of(sample)

    def _augment(self, epoch, sample):
        return self.cache.augment(epoch, sample)

    def make_batch(self, epoch: int, indices: list[int], dataset=None) -> dict:
        return self.cache.make_batch(epoch, indices, dataset)

    def loss_on(self, batch, generator):
        return self.stepper.loss_on(batch, generator)

    def eval_loss(self, dataset=None, seed: int = 1234, repeats: int = 4) -> float:
        from lorakit.testing import eval_loss

        return eval_loss(self, dataset, seed=seed, repeats=repeats)

    def lora_layers(self) -> dict:
        from lorakit import lora

        return lora.lora_layers(self.components, self.lora_configs)

    # ------------------------------------------------------------------ run
    def run(self) -> TrainResult:
        self.guard.install(running=True)
        try:
            return self._run()
        finally:
            self.guard.close()

    def _run(self) -> TrainResult:
        config, accelerator, progress, guard = self.config, self.accelerator, self.progress, self.guard
        if accelerator.num_processes > 1:  # a stop is agreed through each step's reduction
            guard.together, self.stepper.stop_request = True, guard.request
        self.cache.release(drop=config.validation_prompt is None, note=self._say)
        stream = self.batches.micro_batches(self.global_step * config.gradient_accumulation)
        main = accelerator.is_main_process
        epochs = self.batches.epoch_of(config.max_steps)
        if progress is not None and main:
            if hasattr(progress, "epoch_of"):
                progress.epoch_of = lambda step: (self.batches.epoch_of(step), epochs)
            progress.start(total=config.max_steps, completed=self.global_step)
        examples = config.batch_size * config.gradient_accumulation * accelerator.num_processes
        tracker = self.tracker = tracking.RunTracker(accelerator, config, self.output_dir, self.optimizer, examples)
        tracker.start()
        validation.before_training(self)  # step 0: the base model's images, to compare with
        started = time.perf_counter()
        try:
            while self.global_step < config.max_steps:
                tracker.before_step()
                loss, metrics = self.stepper.step(stream)
                guard.check(self.stepper.agreed_stop)  # a stop requested during the step takes effect now
                self.losses.append(loss)
                tracker.after_step(self.global_step, loss, metrics, self.stepper.grad_norm,
                                   self.batches.epoch_of(self.global_step))
                if progress is not None and main:
                    progress.update(self.global_step, loss=loss, lr=self.lr_scheduler.get_last_lr()[0], metrics=metrics)
                if config.checkpoint_every and self.global_step % config.checkpoint_every == 0:
                    with guard.deferred():
                        self.save_checkpoint()
                validation.after_step(self)
            # the training is done: a stop request now waits for the final files (set inside the
            # try: a request from here on can no longer skip saving the finished steps)
            guard.deferring = True
        except KeyboardInterrupt as stop:
            guard.stopping()
            checkpoints.save_on_stop(self, stop)
            raise
        finally:
            tracker.finish()
        if progress is not None and main:
            progress.finish()
        check_processes_agree(self.accelerator, self.params)
        weights = self.save_final()
        self.hub.finish(tracking.logging_dir(config))
        if guard.received is not None:
            log.warning("%s arrived while writing the final files; the run is complete",
                        signal.Signals(guard.received).name)
        (log.info if main else log.debug)("trained %d steps in %.1fs", self.global_step, time.perf_counter() - started)
        return TrainResult(self.output_dir, weights, self.global_step, self.losses)

    # ------------------------------------------------------------------ outputs
    def _write_lora(self, folder: Path) -> Path:
        return outputs.write_lora(self.pm, self.components, self.lora_layers(), folder, self.config.arch)

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        path = checkpoints.save_checkpoint(self.state, self.output_dir, self._write_lora,
                                       self.config.checkpoints_limit)
        self._say(f"saved {path}")
        losscurve.record(self)  # the losses so far: a resumed run's curve starts at step 1
        self.hub.checkpoint_saved(path)
        return path

    def save_final(self) -> Path:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            outputs.write_final_lora(lambda folder: saveformat.write_final(self, folder), self.output_dir,
                                     self.state.estimated_size() // 4)
            losscurve.record(self, picture=True)
            outputs.write_model_card(self.output_dir, self.config, self.info, self.global_step, pm=self.pm)
        # every process returns once the files exist (and none exits while the main one writes)
        self.accelerator.wait_for_everyone()
        return self.output_dir / saveformat.final_files(self.config, self.output_dir)[0]

    def save_samples(self):
        validation.check(self)

    def _say(self, text):
        if self.accelerator.is_main_process:
            if self.progress is not None:
                self.progress.note(text)
            else:
                log.info(text)


def _targets(pm, info, config, components) -> dict:
    """``{component: [layer names]}`` to add LoRA to: the arch's hook, else its data."""
    targets = pm.hook.target_modules(config=config, components=components)
    if targets is None:
        from lorakit.archbase import default_target_modules

        targets = default_target_modules(info, config)
    return targets


def _resolve_model(config, info, pm):
    """The model folder of ``--model``, checked to be of ``--arch`` (and able to train what is asked)."""
    from lorakit import lora
    from lorakit.models import check_model_matches, resolve_run_model
    from lorakit.plugins import arch_entries, get_plugin_manager

    if config.train_text_encoder:  # validate() refused it for an arch without text encoders
        lora.check_text_encoder_lora_support()
    model_path = resolve_run_model(config)  # a single file: its converted diffusers folder
    others = [(a, (lambda a=a: get_plugin_manager(a))) for a in arch_entries()]
    check_model_matches(model_path, config.arch, pm, others)
    return model_path


def _start_accelerator(config):
    """``(accelerator, device, weight dtype)`` of a run. The precision is ``--mixed-precision``
    when given, else accelerate's (``accelerate launch --mixed_precision``, its config file);
    ``config.mixed_precision`` is set to the one in effect."""
    import os

    import torch
    from accelerate import Accelerator

    _reset_accelerate_state()
    trackers = tracking.make_trackers(config)
    kwargs = {"log_with": trackers} if trackers else {}
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if config.given("mixed_precision"):
        # "no" is also what `accelerate launch` sets when not told: only another choice conflicts
        if launcher and launcher.lower() not in ("no", config.mixed_precision):
            raise LorakitError(f"--mixed-precision {config.mixed_precision} conflicts with accelerate's {launcher} "
                               "(accelerate launch --mixed_precision or its config file); drop one of them.")
        kwargs["mixed_precision"] = config.mixed_precision
    accelerator = Accelerator(**kwargs)
    parallel.check_data_parallel(accelerator)
    config.mixed_precision = str(accelerator.mixed_precision)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        chosen = "--mixed-precision fp16" if config.given("mixed_precision") else "accelerate's fp16 (launch, config)"
        raise LorakitError(f"{chosen} needs a GPU (on CPU it does nothing); use bf16 or no.")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    return accelerator, accelerator.device, dtype


def _reset_accelerate_state():
    """accelerate keeps one process-wide state that refuses a second precision; several runs in
    one process (notebooks, tests, a mode generating class images first) each get a fresh one."""
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state and PartialState().num_processes > 1:
        return
    AcceleratorState._reset_state()


def _enable_gradient_checkpointing(module):
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name
        module.activation_checkpointing_enable()
    elif hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()
    else:
        raise LorakitError(f"{type(module).__name__} does not support --gradient-checkpointing; drop the flag.")


def train(config: TrainConfig, progress=None) -> TrainResult:
    """Train a LoRA as ``config`` says and return where it was written."""
    return Trainer(config, progress=progress).setup().run()
