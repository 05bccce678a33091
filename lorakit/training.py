"""The shared training loop. It knows no architecture: every model-specific step is a hook.

One optimizer step = ``gradient_accumulation`` micro-batches of ``batch_size`` examples
per process. The order of examples, their augmentation and every random draw are pure
functions of (seed, epoch, step), so a run resumed from ``checkpoint-N`` continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from lorakit import buckets, checkpoints
from lorakit.checkpoints import WEIGHT_NAME
from lorakit.config import TrainConfig, validate
from lorakit.data import Augment, augment_for, caption_dropped, crop_geometry, prepare_image
from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

CACHE_CHUNK = 8
MAX_BAD_STEPS = 5


@dataclass
class TrainResult:
    output_dir: Path
    weights: Path
    global_step: int
    losses: list = field(default_factory=list)


class Trainer:
    """Set up a run from a :class:`TrainConfig`, then :meth:`run` it.

    ``setup`` loads everything (models, data, LoRA, optimizer, caches, checkpoint);
    ``run`` trains to ``max_steps``. Tests use the pieces in between, e.g.
    :meth:`eval_loss`.
    """

    def __init__(self, config: TrainConfig, progress=None):
        self.config = validate(config)
        self.progress = progress
        self.losses: list[float] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> "Trainer":
        import torch
        from accelerate import Accelerator

        from lorakit import lora
        from lorakit.models import check_model_matches, resolve_model
        from lorakit.plugins import arch_entries, get_plugin_manager, require_hooks

        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        pm = get_plugin_manager(config.arch, config.modes)
        require_hooks(pm, config.arch)
        self.pm = pm
        self.info = pm.hook.arch_info()
        self.output_dir = Path(config.output).expanduser()
        resume_from = checkpoints.check_output_dir(self.output_dir, config)

        _reset_accelerate_state()
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
        if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
            raise LorakitError("--mixed-precision fp16 needs a GPU (on CPU it does nothing); use bf16 or no.")
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)

        if config.train_text_encoder:
            if not self.info.text_encoders:
                raise LorakitError(f"--arch {config.arch} does not support --train-text-encoder; drop it.")
            lora.check_text_encoder_lora_support()

        model_path = resolve_model(config.model)
        others = [(a, (lambda a=a: get_plugin_manager(a))) for a in arch_entries()]
        check_model_matches(model_path, config.arch, pm, others)
        self.model_path = model_path
        try:
            components = pm.hook.load_components(
                model_path=model_path, config=config, device=self.device, weight_dtype=self.weight_dtype
            )
        except OSError as exc:  # a missing or damaged weight/config file inside the folder
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LorakitError(f"--model {config.model} could not be loaded: {first}; re-download it.") from None
        for value in components.values():
            if isinstance(value, torch.nn.Module):
                value.requires_grad_(False)
        self.components = components
        self.resolution = int(
            config.resolution or components.get("default_resolution") or self.info.default_resolution
        )

        self.dataset = pm.hook.build_dataset(config=config, components=components, pm=pm)
        self._image_sizes: dict = {}
        if config.buckets:
            if self.dataset.group_size > 1:
                raise LorakitError(
                    f"--buckets needs one image per example, but this run's examples group "
                    f"{self.dataset.group_size} (e.g. DreamBooth pairs); drop --buckets."
                )
            self._say(buckets.summary([self.size_of(e[0]) for e in self.dataset.examples]))

        targets = pm.hook.target_modules(config=config, components=components)
        torch.manual_seed(config.seed)  # LoRA init is drawn from the global RNG
        self.lora_configs = lora.inject_lora(components, targets, config)
        self.trained_text_encoders = [n for n in self.lora_configs if n in self.info.text_encoders]
        if config.gradient_checkpointing:
            for name in self.lora_configs:
                _enable_gradient_checkpointing(components[name])
        for name in self.lora_configs:
            components[name].train()

        groups = []
        for name in self.lora_configs:
            params = lora.lora_parameters(components[name])
            lr = config.learning_rate
            if name in self.trained_text_encoders and config.text_encoder_lr:
                lr = config.text_encoder_lr
            groups.append({"params": params, "lr": lr, "name": name})
        self.params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(
            groups,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
        )
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        self.optimizer = accelerator.prepare_optimizer(optimizer)

        self.generator = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
        self.global_step = 0
        self.image_cache: dict = {}
        self.prompt_cache: dict = {}
        self.cache_images = config.cache and config.center_crop
        self.cache_prompts = config.cache and not self.trained_text_encoders
        if accelerator.is_main_process:
            checkpoints.clear_earlier_run(self.output_dir, config)
        accelerator.wait_for_everyone()
        if resume_from is not None:
            state = checkpoints.load(resume_from, self)
            self.global_step = state["global_step"]
            self._say(f"resumed from {resume_from} at step {self.global_step}")
        self._fill_caches()
        if accelerator.is_main_process:
            checkpoints.write_run_config(self.output_dir, config)
        return self

    # ------------------------------------------------------------------ data
    def _world(self):
        return self.accelerator.num_processes, self.accelerator.process_index

    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of example indices for ``epoch``."""
        import torch

        world, rank = self._world()
        bs = self.config.batch_size
        global_batch = bs * world
        if self.config.buckets:
            sizes = [self.size_of(e[0]) for e in self.dataset.examples]
            chunks = buckets.bucketed_batches(sizes, global_batch, self.config.seed, epoch)
            return [chunk[rank * bs : (rank + 1) * bs] for chunk in chunks]
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        while len(order) < global_batch:
            order = order + order
        batches = []
        for b in range(len(order) // global_batch):
            chunk = order[b * global_batch : (b + 1) * global_batch]
            batches.append(chunk[rank * bs : (rank + 1) * bs])
        return batches

    def size_of(self, sample) -> tuple[int, int]:
        """The ``(width, height)`` a sample is trained at: its bucket, or the square."""
        if not self.config.buckets:
            return (self.resolution, self.resolution)
        if not hasattr(self, "_bucket_list"):
            self._bucket_list = buckets.make_buckets(self.resolution)
        return buckets.nearest_bucket(*self._image_size(sample), self._bucket_list)

    def _image_size(self, sample) -> tuple[int, int]:
        if sample.key not in self._image_sizes:
            self._image_sizes[sample.key] = sample.open().size
        return self._image_sizes[sample.key]

    def micro_batches(self, start_micro: int):
        """Endless stream of ``(epoch, indices)`` from micro-batch number ``start_micro`` on."""
        per_epoch = self.batches_per_epoch()
        epoch, offset = divmod(start_micro, per_epoch)
        while True:
            for indices in self.epoch_batches(epoch)[offset:]:
                yield epoch, indices
            epoch, offset = epoch + 1, 0

    def _augment(self, epoch, sample):
        c = self.config
        return augment_for(c.seed, epoch, sample.key, c.random_flip, not c.center_crop)

    def _fill_caches(self):
        """Encode every image (both flips if flipping) and caption once, in a fixed order."""
        import torch

        samples = self.dataset.samples()
        if self.cache_images:
            flips = (False, True) if self.config.random_flip else (False,)
            todo = [(s, f) for s in samples for f in flips]
            self._progress_note(f"caching {len(todo)} image encodings")
            by_size: dict = {}  # images of different sizes cannot be stacked: encode per bucket
            for s, f in todo:
                by_size.setdefault(self.size_of(s), []).append((s, f))
            for size in sorted(by_size):
                group = by_size[size]
                for i in range(0, len(group), CACHE_CHUNK):
                    chunk = group[i : i + CACHE_CHUNK]
                    prepared = [self._prepare(s, Augment(flip=f)) for s, f in chunk]
                    encoded = self._encode_images(prepared)
                    for j, (s, f) in enumerate(chunk):
                        self.image_cache[(s.key, f)] = {k: v[j].to("cpu") for k, v in encoded.items()}
        if self.cache_prompts:
            captions = sorted({s.caption for s in samples} | ({""} if self.config.caption_dropout else set()))
            for i in range(0, len(captions), CACHE_CHUNK):
                chunk = captions[i : i + CACHE_CHUNK]
                with torch.no_grad():
                    encoded = self.pm.hook.encode_prompt(components=self.components, captions=chunk)
                for j, caption in enumerate(chunk):
                    self.prompt_cache[caption] = {k: v[j].detach().to("cpu") for k, v in encoded.items()}

    def _prepare(self, sample, augment):
        """``(pixels, original (h, w), crop (top, left), target (h, w))`` of one sample."""
        size = self.size_of(sample)
        return (*prepare_image(sample.open(), self.resolution, augment, size), (size[1], size[0]))

    def _meta(self, prepared):
        import torch

        return {
            "original_size": torch.tensor([p[1] for p in prepared], dtype=torch.long, device=self.device),
            "crop_top_left": torch.tensor([p[2] for p in prepared], dtype=torch.long, device=self.device),
            "target_size": torch.tensor([p[3] for p in prepared], dtype=torch.long, device=self.device),
        }

    def _encode_images(self, prepared):
        import torch

        pixels = torch.stack([p[0] for p in prepared]).to(self.device)
        with torch.no_grad():
            return self.pm.hook.encode_images(components=self.components, pixel_values=pixels, batch=self._meta(prepared))

    def make_batch(self, epoch: int, indices: list[int], dataset=None) -> dict:
        """Assemble one micro-batch: encodings (cached or fresh), captions and metadata."""
        import torch

        dataset = self.dataset if dataset is None else dataset
        group = dataset.group_size
        samples = [dataset.examples[i][pos] for pos in range(group) for i in indices]
        augments = [self._augment(epoch, s) for s in samples]
        if self.cache_images and all((s.key, a.flip) in self.image_cache for s, a in zip(samples, augments)):
            encoded = [self.image_cache[(s.key, a.flip)] for s, a in zip(samples, augments)]
            images = {k: torch.stack([e[k] for e in encoded]).to(self.device) for k in encoded[0]}
            meta = self._meta([self._cached_geometry(s, a) for s, a in zip(samples, augments)])
        else:
            prepared = [self._prepare(s, a) for s, a in zip(samples, augments)]
            images = self._encode_images(prepared)
            meta = self._meta(prepared)
        captions = [
            "" if caption_dropped(self.config.seed, epoch, s.key, self.config.caption_dropout) else s.caption
            for s in samples
        ]
        batch = {**images, **meta, "captions": captions}
        if self.cache_prompts:
            if all(c in self.prompt_cache for c in captions):
                cached = [self.prompt_cache[c] for c in captions]
                batch.update({k: torch.stack([e[k] for e in cached]).to(self.device) for k in cached[0]})
            else:
                with torch.no_grad():
                    batch.update(self.pm.hook.encode_prompt(components=self.components, captions=captions))
        for key in sorted({k for s in samples for k in s.extras}):
            batch[key] = torch.tensor([s.extras.get(key, 0) for s in samples], device=self.device)
        return batch

    def _cached_geometry(self, sample, augment):
        """What :meth:`_prepare` returns for a cached (centre-cropped) image, without pixels."""
        w, h = self._image_size(sample)
        size = self.size_of(sample)
        _, crop = crop_geometry(w, h, size, augment)
        return None, (h, w), crop, (size[1], size[0])

    # ------------------------------------------------------------------ steps
    def loss_on(self, batch, generator):
        """Scalar loss and metrics for one assembled batch (text encoders run here if trained)."""
        if not self.cache_prompts:
            batch.update(self.pm.hook.encode_prompt(components=self.components, captions=batch["captions"]))
        with self.accelerator.autocast():
            per_sample = self.pm.hook.compute_loss(
                components=self.components, batch=batch, config=self.config, generator=generator
            )
            loss, metrics = self.pm.hook.reduce_loss(per_sample_loss=per_sample, batch=batch, config=self.config)
        return loss, metrics

    def eval_loss(self, dataset=None, seed: int = 1234, repeats: int = 4) -> float:
        """Mean denoising loss over ``dataset`` (default: the training set) with fixed noise
        and timesteps drawn from ``seed``; no update, LoRA dropout off."""
        import torch

        dataset = self.dataset if dataset is None else dataset
        by_size: dict = {}  # one size per batch (a single group unless --buckets)
        for i, example in enumerate(dataset.examples):
            by_size.setdefault(self.size_of(example[0]), []).append(i)
        bs = self.config.batch_size
        chunks = []
        for size in sorted(by_size):
            ids = by_size[size]
            chunks += [ids[i : i + bs] for i in range(0, len(ids), bs)]
        generator = torch.Generator().manual_seed(seed)
        trained = [self.components[n] for n in self.lora_configs]
        for module in trained:
            module.eval()
        total, n = 0.0, 0
        try:
            with torch.no_grad():
                for _ in range(repeats):
                    for indices in chunks:
                        batch = self.make_batch(0, indices, dataset)
                        loss, _ = self.loss_on(batch, generator)
                        total, n = total + float(loss), n + 1
        finally:
            for module in trained:
                module.train()
        return total / n

    def run(self) -> TrainResult:
        config, accelerator = self.config, self.accelerator
        stream = self.micro_batches(self.global_step * config.gradient_accumulation)
        progress = self.progress
        if progress is not None and accelerator.is_main_process:
            progress.start(total=config.max_steps, completed=self.global_step)
        started = time.perf_counter()
        try:
            self._train_steps(stream, progress)
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        if progress is not None and accelerator.is_main_process:
            progress.finish()
        self._check_processes_agree()
        weights = self.save_final()
        log.info("trained %d steps in %.1fs", self.global_step, time.perf_counter() - started)
        return TrainResult(self.output_dir, weights, self.global_step, self.losses)

    def _save_on_interrupt(self):
        """Ctrl-C: keep the work done. The optimizer and weights are those of the last finished
        step; the RNG states go back to where that step ended, so resuming is still exact."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        if self.progress is not None and self.accelerator.is_main_process:
            self.progress.finish()
        if self.global_step == 0 or (self.output_dir / f"checkpoint-{self.global_step}").is_dir():
            return
        if getattr(self, "_updating", False):
            log.warning("interrupted during a weight update; the newest regular checkpoint stays the latest")
            return
        if self.accelerator.num_processes > 1:
            # the other processes' RNG states cannot be gathered safely once they are interrupted
            log.warning("interrupted; with several processes the newest regular checkpoint stays the latest")
            return
        generator_state, torch_state = self._step_start_rng
        self.generator.set_state(generator_state)
        torch.set_rng_state(torch_state)
        if self.accelerator.is_main_process:
            path = checkpoints.save(self, self.output_dir, self.global_step, self.config.checkpoints_limit)
            log.warning("interrupted at step %d; saved %s", self.global_step, path)

    def _train_steps(self, stream, progress):
        import torch

        config, accelerator = self.config, self.accelerator
        accum = config.gradient_accumulation
        bad_steps = 0
        while self.global_step < config.max_steps:
            self._step_start_rng = (self.generator.get_state(), torch.get_rng_state())
            step_loss, step_metrics = 0.0, {}
            for _ in range(accum):
                epoch, indices = next(stream)
                batch = self.make_batch(epoch, indices)
                loss, metrics = self.loss_on(batch, self.generator)
                accelerator.backward(loss / accum)
                step_loss += float(loss.detach()) / accum
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / accum
            self._updating = True
            if accelerator.num_processes > 1:
                for p in self.params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                # the gradients are shared, so every process must take the same skip decision
                step_loss = float(accelerator.reduce(torch.tensor([step_loss], device=self.device), reduction="mean"))
            finite = math.isfinite(step_loss)
            if finite or config.mixed_precision == "fp16":
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # a skipped (non-finite) first step makes torch warn about the call order; the
                # schedule advances anyway so it stays aligned with the step count on resume
                warnings.filterwarnings("ignore", message="Detected call of", category=UserWarning)
                self.lr_scheduler.step()
            self.global_step += 1
            # the step is finished: a Ctrl-C from here on (checkpoint, samples) must save the RNG
            # as it is now, as a regular checkpoint would, not as it was when the step began
            self._step_start_rng = (self.generator.get_state(), torch.get_rng_state())
            self._updating = False
            if not finite:
                bad_steps += 1
                log.warning("step %d: loss is %s; update skipped", self.global_step, step_loss)
                if bad_steps >= MAX_BAD_STEPS:
                    raise LorakitError(
                        f"loss was not finite for {bad_steps} steps in a row (last at step {self.global_step}); "
                        "lower --learning-rate, use --mixed-precision bf16 or no, or an fp16-safe VAE."
                    )
            else:
                bad_steps = 0
            self.losses.append(step_loss)
            if progress is not None and accelerator.is_main_process:
                progress.update(
                    self.global_step, loss=step_loss, lr=self.lr_scheduler.get_last_lr()[0], metrics=step_metrics
                )
            if config.checkpoint_every and self.global_step % config.checkpoint_every == 0:
                self.save_checkpoint()
            if (
                config.validation_prompt
                and config.validation_every
                and self.global_step % config.validation_every == 0
                and accelerator.is_main_process
            ):
                self.save_samples()

    def _check_processes_agree(self):
        """With several processes every copy of the LoRA must be identical (gradients are
        averaged before each step); a mismatch means a broken setup, not a usable result."""
        import torch

        if self.accelerator.num_processes == 1:
            return
        checksum = torch.stack([p.detach().double().sum() for p in self.params]).sum().reshape(1).to(self.device)
        sums = self.accelerator.gather(checksum)
        if not torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9):
            raise RuntimeError(f"LoRA weights differ between processes: {sums.tolist()}")

    # ------------------------------------------------------------------ outputs
    def lora_layers(self) -> dict:
        from lorakit import lora

        return lora.lora_layers(self.components, self.lora_configs)

    def save_checkpoint(self) -> Path | None:
        process_rng = self._gather_rng_states()
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        path = checkpoints.save(
            self, self.output_dir, self.global_step, self.config.checkpoints_limit, process_rng=process_rng
        )
        self._say(f"saved {path}")
        return path

    def _gather_rng_states(self):
        """Every process's ``(generator, torch)`` RNG states, in process order, when there are
        several: each process draws its own noise, so a resume must give each its own back."""
        import torch

        if self.accelerator.num_processes == 1:
            return None
        generator, cpu = self.generator.get_state(), torch.get_rng_state()
        mine = torch.cat([generator, cpu]).unsqueeze(0).to(self.device)
        everyone = self.accelerator.gather(mine).to("cpu")
        return [(row[: generator.numel()].clone(), row[generator.numel() :].clone()) for row in everyone]

    def save_final(self) -> Path:
        self.accelerator.wait_for_everyone()
        target = self.output_dir / WEIGHT_NAME
        if self.accelerator.is_main_process:
            checkpoints.write_lora(self, self.output_dir)
            checkpoints.write_model_card(self.output_dir, self.config, self.info, self.global_step)
        return target

    def save_samples(self):
        import torch

        pipeline = self.pm.hook.build_pipeline(components=self.components, config=self.config)
        if pipeline is None or not self.pm.hook.generate_images.get_hookimpls():
            return
        for name in self.lora_configs:
            self.components[name].eval()
        generator = torch.Generator().manual_seed(self.config.seed)
        # autocast: frozen weights may be bf16/fp16 next to an fp32 VAE
        with torch.no_grad(), self.accelerator.autocast():
            images = self.pm.hook.generate_images(
                pipeline=pipeline,
                prompts=[self.config.validation_prompt],
                generator=generator,
                num_inference_steps=25,
                resolution=self.resolution,
                guidance_scale=None,
            )
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"step-{self.global_step:06d}-{i}.png")
        for name in self.lora_configs:
            self.components[name].train()

    def _say(self, text):
        if self.accelerator.is_main_process:
            if self.progress is not None:
                self.progress.note(text)
            else:
                log.info(text)

    def _progress_note(self, text):
        self._say(text)


def _reset_accelerate_state():
    """accelerate keeps one process-wide state that refuses a second precision; several runs in
    one process (notebooks, tests, DreamBooth class generation) each get a fresh one."""
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
