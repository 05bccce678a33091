"""One optimizer step: ``gradient_accumulation`` micro-batches -> loss -> backward -> one
gradient reduction across processes -> guarded update.

The update is guarded: a non-finite loss or gradient skips it, and an update that leaves a
LoRA weight non-finite (a huge learning rate) is undone, parameters and optimizer state
both, so a non-finite tensor never reaches a checkpoint or the final file. Every process
decides the same (the loss is averaged with the gradients, and the weights are identical).
A run of bad steps stops with a clear error.

Every random draw of a micro-batch is derived from (seed, global step, micro-batch within the
step, each row's place in the global batch) by :mod:`lorakit.rng`, so the step computes the
same global batch on 1 or N processes, and nothing random carries over from one step to the
next: a checkpoint taken after any finished step resumes exactly, on any process count.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

from lorakit import rng
from lorakit.errors import LorakitError, PluginError
from lorakit.parallel import reduce_step

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


def all_finite(tensors) -> bool:
    """Whether every element of ``tensors`` is finite: one fused check over their
    concatenation (one device sync), exact for huge but finite values."""
    import torch

    tensors = [t.detach().reshape(-1) for t in tensors if t is not None]
    if not tensors:
        return True
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return bool(torch.isfinite(torch.cat([t.to(dtype) for t in tensors])).all())


class UpdateUndo:
    """What one optimizer step changes (the LoRA parameters, their optimizer state and each
    parameter group's own entries, e.g. Prodigy's step-size estimate ``d``), copied before the
    step into buffers reused from step to step, so a bad update can be undone."""

    def __init__(self, params, optimizer):
        self.params = list(params)
        #: the optimizer holding the state (accelerate wraps it)
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self._params = None
        self._state: dict = {}
        self._groups: list = []

    def save(self) -> None:
        import torch

        with torch.no_grad():
            if self._params is None:
                self._params = [p.detach().clone() for p in self.params]
            else:
                torch._foreach_copy_(self._params, [p.detach() for p in self.params])
            state = self.optimizer.state
            for i, p in enumerate(self.params):
                old = self._state.get(i)
                if p not in state or not state[p]:
                    self._state[i] = None
                    continue
                old = old or {}
                self._state[i] = {k: _copy_into(old.get(k), v) for k, v in state[p].items()}
            groups = self.optimizer.param_groups
            old = self._groups if len(self._groups) == len(groups) else [{} for _ in groups]
            self._groups = [{k: _copy_into(o.get(k), v) for k, v in g.items() if k != "params"}
                            for g, o in zip(groups, old)]

    def state_tensors(self) -> list:
        """The optimizer's floating-point state tensors of the LoRA parameters (moments etc.)."""
        import torch

        state = self.optimizer.state
        return [v for p in self.params if p in state for v in state[p].values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()]

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self._params)
            state = self.optimizer.state
            for i, p in enumerate(self.params):
                saved = self._state.get(i)
                if saved is None:
                    state.pop(p, None)
                else:
                    state[p] = {k: _copy_into(None, v) for k, v in saved.items()}
            for group, saved in zip(self.optimizer.param_groups, self._groups):
                group.update({k: _copy_into(None, v) for k, v in saved.items()})


def _copy_into(buffer, value):
    """``value`` copied, into ``buffer`` when that is a tensor of the same kind."""
    import torch

    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if (isinstance(buffer, torch.Tensor) and buffer.shape == value.shape and buffer.dtype == value.dtype
            and buffer.device == value.device):
        return buffer.copy_(value)
    return value.detach().clone()


def grad_norm(params, accelerator) -> float:
    """The gradients' total L2 norm, read only (unscaled when a grad scaler holds them)."""
    import torch

    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    scaler = getattr(accelerator, "scaler", None)
    return norm / scaler.get_scale() if scaler is not None and scaler.is_enabled() else norm


class Stepper:
    """Takes optimizer steps over a stream of micro-batches; ``state`` is the run's TrainState."""

    def __init__(self, state, cache, pm, accelerator, params, config):
        self.state, self.cache, self.pm = state, cache, pm
        self.accelerator, self.params, self.config = accelerator, params, config
        self.bad_steps = 0
        self._bad_kinds: set = set()
        self.updating = False
        #: the gradient norm of the last update before clipping (None when it was skipped)
        self.grad_norm = None
        #: this process's stop request, a signal number (0: none), sent with the step's reduction
        self.stop_request = lambda: 0
        #: the stop the processes agreed on in the last step's reduction (0: none)
        self.agreed_stop = 0
        self.undo = UpdateUndo(params, state.optimizer)

    def loss_on(self, batch, generator, rows=None):
        """Scalar loss and metrics for one assembled batch (trained text encoders run here).
        ``rows``: the batch's per-row draws (:class:`lorakit.rng.Rows`); without them, rows
        seeded from ``generator`` (evaluation, checks)."""
        self.cache.add_trained_text(batch)
        if rows is None:
            rows = rng.Rows.from_generator(generator, len(batch["captions"]))
        with self.accelerator.autocast():
            per_sample = self.pm.hook.compute_loss(
                components=self.cache.components, batch=batch, config=self.config, generator=generator, rows=rows
            )
            check_per_sample_loss(per_sample, self.config.arch, len(batch["captions"]))
            loss, metrics = self.pm.hook.reduce_loss(per_sample_loss=per_sample, batch=batch, config=self.config)
        return loss, metrics

    def step(self, stream) -> tuple[float, dict]:
        """One optimizer step; returns ``(loss, metrics)`` averaged over its micro-batches."""
        config, accelerator, state = self.config, self.accelerator, self.state
        accum = config.gradient_accumulation
        step_loss, step_metrics = 0.0, {}
        for micro in range(accum):
            epoch, indices = next(stream)
            batch = self.cache.make_batch(epoch, indices)
            rows, global_seed = self.draws(micro, len(indices))
            with rng.seeded_global_rng(global_seed, accelerator.device):  # LoRA dropout
                loss, metrics = self.loss_on(batch, state.generator, rows)
            accelerator.backward(loss / accum)
            step_loss += float(loss.detach()) / accum
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / accum
        self.updating = True
        step_loss, self.agreed_stop = reduce_step(accelerator, self.params, step_loss, accelerator.device,
                                                  self.stop_request())
        finite = math.isfinite(step_loss)
        bad = self._update(finite or config.mixed_precision == "fp16")
        if not finite:
            bad = "loss"
        state.global_step += 1
        self.updating = False
        self._count_bad(bad, step_loss)
        return step_loss, step_metrics

    def draws(self, micro: int, examples: int):
        """``(rows, global seed)`` of micro-batch ``micro`` of the step now computed, which holds
        ``examples`` examples of this process: per-row streams keyed on the rows' places in the
        global batch, and the seed of torch's global RNG for it (LoRA dropout draws there, over
        the whole micro-batch: with dropout, results depend on how the global batch is split).
        ``state.generator`` is reseeded too, for plugins of the older contract that draw from
        ``generator`` (one stream per process: not process-count invariant)."""
        config, step = self.config, self.state.global_step
        rank = self.accelerator.process_index
        groups = self.cache.batches.dataset.group_size
        rows = rng.Rows.for_micro_batch(config.seed, step, micro, rank * examples, examples, groups)
        self.state.generator.manual_seed(rng.derive_seed("process", config.seed, step, micro, rank))
        return rows, rng.derive_seed("global", config.seed, step, micro, rank)

    def rewind_to_finished_step(self) -> bool:
        """After a Ctrl-C: whether a checkpoint of the last finished step can be saved now; False
        when that cannot give an exact one (inside an update, or several processes that did not
        agree on the step to stop after: those that did save together,
        :func:`lorakit.checkpoints.save_together`). Nothing random needs rewinding: every draw is
        derived from the step (:meth:`draws`)."""
        if self.updating:
            log.warning("interrupted during a weight update; the newest regular checkpoint stays the latest")
            return False
        if self.accelerator.num_processes > 1:
            # the other processes may be stopped inside the next step's collective: left to regular checkpoints
            log.warning("interrupted; with several processes the newest regular checkpoint stays the latest")
            return False
        return True

    def _update(self, apply: bool) -> str | None:
        """Apply the update when ``apply`` and it is sound; ``"gradients"`` or ``"weights"`` when
        it was skipped or undone for what it would have made non-finite, else None."""
        bad, self.grad_norm = None, None
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if apply and not scaled and not all_finite([p.grad for p in self.params]):
            # (a grad scaler, fp16, finds and skips non-finite gradients itself)
            apply, bad = False, "gradients"
        if apply:
            if self.config.max_grad_norm:  # the norm before clipping, for the trackers
                self.grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm))
            else:
                self.grad_norm = grad_norm(self.params, self.accelerator)
            self.undo.save()
            self.state.optimizer.step()
            # the moments too: a finite update can still overflow them (g**2 past fp32's range)
            if not all_finite(self.params + self.undo.state_tensors()):
                self.undo.restore()
                bad = "weights"
        self.state.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # a skipped (non-finite) first step makes torch warn about the call order; the
            # schedule advances anyway so it stays aligned with the step count on resume
            warnings.filterwarnings("ignore", message="Detected call of", category=UserWarning)
            self.state.lr_scheduler.step()
        return bad

    def _count_bad(self, bad: str | None, step_loss: float) -> None:
        """Warn about a skipped or undone update; stop after MAX_BAD_STEPS of them in a row."""
        if bad is None:
            self.bad_steps, self._bad_kinds = 0, set()
            return
        self.bad_steps += 1
        self._bad_kinds.add(bad)
        step = self.state.global_step
        if bad == "loss":
            log.warning("step %d: loss is %s; update skipped", step, step_loss)
        elif bad == "gradients":
            log.warning("step %d: gradients are not finite (loss %g); update skipped", step, step_loss)
        else:
            log.warning("step %d: the update made LoRA weights (or their optimizer state) non-finite; undone", step)
        if self.bad_steps < MAX_BAD_STEPS:
            return
        lr = f"{self.config.learning_rate:g}"
        n = self.bad_steps
        if self._bad_kinds == {"loss"}:
            raise LorakitError(
                f"loss was not finite for {n} steps in a row (last at step {step}); "
                "lower --learning-rate, use --mixed-precision bf16 or no, or an fp16-safe VAE."
            )
        if self._bad_kinds == {"weights"}:
            raise LorakitError(
                f"the update made LoRA weights (or their optimizer state) non-finite for {n} steps in a row (last at step {step}) and was "
                f"undone each time; lower --learning-rate (now {lr}) or set --max-grad-norm."
            )
        if self._bad_kinds == {"gradients"}:
            raise LorakitError(
                f"gradients were not finite for {n} steps in a row (last at step {step}) though the loss was; "
                f"lower --learning-rate (now {lr}) or use --mixed-precision no; if it persists, the arch "
                f"plugin '{self.config.arch}' compute_loss is at fault."
            )
        raise LorakitError(
            f"{n} updates in a row were skipped for non-finite loss, gradients or weights (last at step {step}); "
            f"lower --learning-rate (now {lr}) or use --mixed-precision no."
        )
