"""Processes training together: lorakit trains data-parallel, every process holding the frozen
model (whole, or 1/N of its denoiser with ``--shard-frozen`` / accelerate's FSDP setup:
:mod:`lorakit.sharding`) and its slice of every global batch (:mod:`lorakit.batches`); one
collective call per step averages every LoRA gradient and the loss, and carries the processes'
stop requests (:func:`reduce_step`), so a stop on one process stops all of them after the same step.

Because every draw is per sample (:mod:`lorakit.rng`), N processes with ``--batch-size B/N``
compute the global batch one process with ``--batch-size B`` computes; DeepSpeed and
Megatron-LM setups are refused rather than ignored.
"""

from __future__ import annotations

from lorakit.errors import LorakitError


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


#: the stop requests a step's reduction carries, in this order after the loss: one 0/1 flag per signal
STOP_SIGNALS = (2, 15)  # SIGINT, SIGTERM (numbers: this module imports no signal handling)


def reduce_step(accelerator, params, step_loss: float, device, stop: int = 0) -> tuple[float, int]:
    """``(step loss, agreed stop)``: the gradients and the step loss averaged over the
    processes, and whether ANY process was asked to stop (``stop``: this process's signal
    number, 0 for none), all in ONE collective call.

    The mean over processes is the global batch's mean: every process holds the same number
    of rows (:class:`lorakit.batches.Batches` gives each an equal slice of every global batch,
    a bucket's last batch filled up), so the mean of per-process means is the mean of all.
    The stop flags ride in the same buffer (no extra collective), so every process learns in
    the same step that the run stops after it: SIGTERM when any process got one (a scheduler's
    preemption), else SIGINT; 0 when none did."""
    import torch

    if accelerator.num_processes == 1:
        return step_loss, stop
    buffer, have = flatten_grads(params)
    extra = torch.tensor([step_loss, *(float(stop == s) for s in STOP_SIGNALS)], device=device)
    joined = extra if buffer is None else torch.cat([buffer, extra.to(buffer.dtype)])
    reduced = accelerator.reduce(joined, reduction="mean")
    tail = reduced[-len(extra):].to(torch.float32)
    if buffer is not None:
        unflatten_grads(reduced[: -len(extra)], have)
    asked = [s for s, flag in zip(STOP_SIGNALS, tail[1:].tolist()) if flag > 0]
    # the gradients are shared, so every process must take the same skip decision
    return float(tail[0]), max(asked, default=0)


#: accelerate's sharded setups lorakit does not build: it would ignore them (it wraps no model),
#: keeping a whole copy of the frozen base on every device while the user asked for sharding
SHARDED = ("DEEPSPEED", "MEGATRON_LM")


def check_data_parallel(accelerator) -> None:
    """Refuse an accelerate setup lorakit cannot honour. Its FSDP setup is honoured: lorakit
    shards the frozen denoiser itself (:mod:`lorakit.sharding`, checked here before the model
    loads), the LoRA still replicated and reduced by :func:`reduce_step`."""
    from lorakit import sharding

    sharding.accelerate_plan()  # a setting it cannot apply (offload, NO_SHARD, ...) is one line now
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind in SHARDED:
        raise LorakitError(
            f"accelerate's {kind} setup (launch flag or config file) is not supported: lorakit trains data-parallel; "
            "launch with --multi_gpu, and to shard the frozen base add --shard-frozen (or use accelerate's FSDP setup)."
        )
