"""Processes training together: lorakit trains data-parallel, every process holding the whole
frozen model and its slice of every global batch (:mod:`lorakit.batches`); one collective call
per step averages every LoRA gradient and the loss (:func:`reduce_across_processes`).

Because every draw is per sample (:mod:`lorakit.rng`), N processes with ``--batch-size B/N``
compute the global batch one process with ``--batch-size B`` computes; accelerate's sharded
setups (FSDP, DeepSpeed, Megatron-LM) are refused rather than ignored.
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


def reduce_across_processes(accelerator, params, step_loss: float, device) -> float:
    """Average the gradients and the step loss over the processes in ONE collective call.

    The mean over processes is the global batch's mean: every process holds the same number
    of rows (:class:`lorakit.batches.Batches` gives each an equal slice of every global batch,
    a bucket's last batch filled up), so the mean of per-process means is the mean of all."""
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


#: accelerate's sharded setups: lorakit would ignore them (it wraps no model), keeping a whole
#: copy of the frozen base on every device while the user asked for sharding
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_data_parallel(accelerator) -> None:
    """Refuse an accelerate setup that shards the model: lorakit trains data-parallel (every
    process holds the whole frozen model, the LoRA gradients reduced by :func:`reduce_across_processes`)."""
    kind = str(getattr(accelerator, "distributed_type", "NO")).rsplit(".", 1)[-1]
    if kind in SHARDED:
        raise LorakitError(
            f"accelerate's {kind} setup (launch flag or config file) is not supported: lorakit trains data-parallel, "
            "every process holding the whole model; launch with --multi_gpu (distributed_type MULTI_GPU) instead."
        )
