"""One optimizer step: ``gradient_accumulation`` micro-batches -> loss -> backward -> one
gradient reduction across processes -> guarded update.

The update is guarded: a non-finite loss skips it (every process decides the same, the
loss being averaged with the gradients), a run of them stops with a clear error, and the
RNG states at the end of each finished step are recorded so that a Ctrl-C between steps
saves a checkpoint that resumes exactly.
"""

from __future__ import annotations

import logging
import math
import warnings

from lorakit.errors import LorakitError, PluginError
from lorakit.state import rng_now

log = logging.getLogger("lorakit")

MAX_BAD_STEPS = 5


def check_per_sample_loss(loss, arch: str, rows: int):
    """``compute_loss`` as its contract states: a float tensor of shape ``(B,)``."""
    import torch

    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or tuple(loss.shape) != (rows,):
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        if isinstance(loss, torch.Tensor) and not loss.is_floating_point():
            got += f" of {loss.dtype}"
        raise PluginError(f"arch plugin '{arch}': compute_loss returned {got}, expected (B,) = ({rows},)")
    return loss


def flatten_grads(params):
    """``(buffer, params with a gradient)``: every gradient in one flat tensor."""
    import torch

    have = [p for p in params if p.grad is not None]
    if not have:
        return None, have
    dtype = have[0].grad.dtype
    for p in have[1:]:
        dtype = torch.promote_types(dtype, p.grad.dtype)
    return torch.cat([p.grad.reshape(-1).to(dtype) for p in have]), have


def unflatten_grads(buffer, params) -> None:
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad = buffer[offset : offset + n].view_as(p.grad).to(p.grad.dtype)
        offset += n


def reduce_across_processes(accelerator, params, step_loss: float, device) -> float:
    """Average the gradients and the step loss over the processes in ONE collective call."""
    import torch

    if accelerator.num_processes == 1:
        return step_loss
    buffer, have = flatten_grads(params)
    loss = torch.tensor([step_loss], device=device)
    joined = loss if buffer is None else torch.cat([buffer, loss.to(buffer.dtype)])
    reduced = accelerator.reduce(joined, reduction="mean")
    if buffer is not None:
        unflatten_grads(reduced[:-1], have)
    # the gradients are shared, so every process must take the same skip decision
    return float(reduced[-1:].to(torch.float32))


def make_optimizer(components, lora_configs, text_encoders, config, accelerator):
    """``(params, optimizer, lr_scheduler)`` over every LoRA parameter, one group per component
    (text encoders at ``--text-encoder-lr`` when given)."""
    import torch
    from diffusers.optimization import get_scheduler

    from lorakit import lora

    c = config
    groups = []
    for name in lora_configs:
        lr = c.text_encoder_lr if name in text_encoders and c.text_encoder_lr else c.learning_rate
        groups.append({"params": lora.lora_parameters(components[name]), "lr": lr, "name": name})
    params = [p for g in groups for p in g["params"]]
    betas = (c.adam_beta1, c.adam_beta2)
    optimizer = torch.optim.AdamW(groups, betas=betas, weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
    scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer, num_warmup_steps=c.lr_warmup_steps,
                              num_training_steps=c.max_steps)
    return params, accelerator.prepare_optimizer(optimizer), scheduler


class Stepper:
    """Takes optimizer steps over a stream of micro-batches; ``state`` is the run's TrainState."""

    def __init__(self, state, cache, pm, accelerator, params, config):
        self.state, self.cache, self.pm = state, cache, pm
        self.accelerator, self.params, self.config = accelerator, params, config
        self.bad_steps = 0
        self.updating = False
        #: RNG states at the end of the last finished step (what a Ctrl-C checkpoint saves)
        self.finished_rng = None

    def loss_on(self, batch, generator):
        """Scalar loss and metrics for one assembled batch (trained text encoders run here)."""
        self.cache.add_trained_text(batch)
        with self.accelerator.autocast():
            per_sample = self.pm.hook.compute_loss(
                components=self.cache.components, batch=batch, config=self.config, generator=generator
            )
            check_per_sample_loss(per_sample, self.config.arch, len(batch["captions"]))
            loss, metrics = self.pm.hook.reduce_loss(per_sample_loss=per_sample, batch=batch, config=self.config)
        return loss, metrics

    def step(self, stream) -> tuple[float, dict]:
        """One optimizer step; returns ``(loss, metrics)`` averaged over its micro-batches."""
        config, accelerator, state = self.config, self.accelerator, self.state
        accum = config.gradient_accumulation
        self.finished_rng = rng_now(state.generator)
        step_loss, step_metrics = 0.0, {}
        for _ in range(accum):
            epoch, indices = next(stream)
            loss, metrics = self.loss_on(self.cache.make_batch(epoch, indices), state.generator)
            accelerator.backward(loss / accum)
            step_loss += float(loss.detach()) / accum
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / accum
        self.updating = True
        step_loss = reduce_across_processes(accelerator, self.params, step_loss, accelerator.device)
        finite = math.isfinite(step_loss)
        self._update(finite or config.mixed_precision == "fp16")
        state.global_step += 1
        # the step is finished: a Ctrl-C from here on (checkpoint, samples) must save the RNG
        # as it is now, as a regular checkpoint would, not as it was when the step began
        self.finished_rng = rng_now(state.generator)
        self.updating = False
        self._count_bad(finite, step_loss)
        return step_loss, step_metrics

    def rewind_to_finished_step(self) -> bool:
        """After a Ctrl-C: put the RNG states back to where the last finished step ended; False
        when that cannot give an exact checkpoint (inside an update, or several processes)."""
        import torch

        if self.updating:
            log.warning("interrupted during a weight update; the newest regular checkpoint stays the latest")
            return False
        if self.accelerator.num_processes > 1:
            # the other processes' RNG states cannot be gathered safely once they are interrupted
            log.warning("interrupted; with several processes the newest regular checkpoint stays the latest")
            return False
        generator_state, torch_state = self.finished_rng
        self.state.generator.set_state(generator_state)
        torch.set_rng_state(torch_state)
        return True

    def _update(self, apply: bool) -> None:
        if apply:
            if self.config.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
            self.state.optimizer.step()
        self.state.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # a skipped (non-finite) first step makes torch warn about the call order; the
            # schedule advances anyway so it stays aligned with the step count on resume
            warnings.filterwarnings("ignore", message="Detected call of", category=UserWarning)
            self.state.lr_scheduler.step()

    def _count_bad(self, finite: bool, step_loss: float) -> None:
        if finite:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        step = self.state.global_step
        log.warning("step %d: loss is %s; update skipped", step, step_loss)
        if self.bad_steps >= MAX_BAD_STEPS:
            raise LorakitError(
                f"loss was not finite for {self.bad_steps} steps in a row (last at step {step}); "
                "lower --learning-rate, use --mixed-precision bf16 or no, or an fp16-safe VAE."
            )
