"""Sharding the frozen denoiser across processes, so a base too big for one device still trains.

With ``--shard-frozen`` (or accelerate's FSDP setup: ``accelerate launch --use_fsdp``, a config
file with ``distributed_type: FSDP``) the denoiser's blocks are wrapped with torch's FSDP2
``fully_shard`` and the LoRA parameters are left out of it (``ignored_params``). Each process
then stores 1/N of the frozen base; a block's full weights are all-gathered for its forward
and again for its backward, and freed after. The LoRA parameters stay ordinary replicated
tensors: their gradients are still averaged by :func:`lorakit.parallel.reduce_step`
in one collective per step, so the optimizer, the NaN guards, checkpoints, resume and saving
are the unsharded run's. The all-gathered weights are the loaded ones, bit for bit, so a
sharded run trains the same LoRA as an unsharded one on the same process count.

Which modules become shards is data the model declares, not arch names: diffusers'
``_repeated_blocks`` (its transformer blocks, nearly all of a DiT's weights), else its
``_no_split_modules``; accelerate's ``fsdp_transformer_layer_cls_to_wrap`` overrides both.
``_repeated_blocks`` comes first because wrapping a UNet's ``ResnetBlock2D`` (listed in its
``_no_split_modules``) changes the order autograd sums the gradients of its skip connections
(8 of 64 LoRA gradients of a tiny UNet then differ by ~5e-7 relative); the transformer
blocks alone give gradients equal to the unsharded ones. (Not so the gradient of an input every
block reads, the text encoder's output: each block's hooks add a node, and its terms are summed
in another order, ~1e-12 apart; a run with text-encoder LoRA is equal up to that rounding.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

#: accelerate's sharding strategies by number (its FSDP_SHARDING_STRATEGY is 1-based)
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2")
ACCELERATE = "accelerate's FSDP setup (launch flag or config file)"


@dataclass(frozen=True)
class Plan:
    source: str  # what asked for it, for messages
    reshard_after_forward: bool = True  # False: keep a block's gathered weights from forward to backward
    blocks: tuple = ()  # class names to shard; () = what the model declares


def _flag(env, name: str, default: str = "false") -> bool:
    return env.get(name, default).strip().lower() in ("1", "true", "yes")


def accelerate_plan(env=None) -> Plan | None:
    """accelerate's FSDP request as its launcher passes it (``ACCELERATE_USE_FSDP``, ``FSDP_*``),
    its settings checked. Read from the environment because on CPU accelerate drops FSDP
    silently (its state says MULTI_CPU); on GPUs it reads the same variables."""
    env = os.environ if env is None else env
    if not _flag(env, "ACCELERATE_USE_FSDP"):
        return None
    if _flag(env, "FSDP_OFFLOAD_PARAMS"):
        raise LorakitError(f"{ACCELERATE} offloads parameters to the CPU, which lorakit does not do; "
                           "set fsdp_offload_params: false (the sharded base is what saves the memory).")
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise LorakitError(f"{ACCELERATE} asks for activation checkpointing; set fsdp_activation_checkpointing: false "
                           "and pass --gradient-checkpointing instead.")
    if env.get("FSDP_VERSION", "1").strip() == "2":
        reshard = _flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true")
    else:
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        if strategy.isdigit() and 1 <= int(strategy) <= len(STRATEGIES):
            strategy = STRATEGIES[int(strategy) - 1]
        if strategy not in ("FULL_SHARD", "SHARD_GRAD_OP"):
            raise LorakitError(f"{ACCELERATE} has sharding strategy {strategy}, which lorakit does not build; "
                               "use FULL_SHARD or SHARD_GRAD_OP (or --multi_gpu to shard nothing).")
        reshard = strategy == "FULL_SHARD"
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "").strip().upper()
    names = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "") if policy in ("", "TRANSFORMER_BASED_WRAP") else ""
    if policy not in ("", "TRANSFORMER_BASED_WRAP"):
        log.warning("%s: auto wrap policy %s is ignored; lorakit shards the model's declared blocks", ACCELERATE, policy)
    return Plan(ACCELERATE, reshard, tuple(n.strip() for n in names.split(",") if n.strip()))


def requested(config, env=None) -> Plan | None:
    """The run's sharding plan, or None when the base is not sharded."""
    plan = accelerate_plan(env)
    if plan is not None and config.given("shard_frozen") and not config.shard_frozen:
        raise LorakitError(f"--no-shard-frozen conflicts with {ACCELERATE}, which shards the frozen model; "
                           "drop one of them (launch with --multi_gpu to shard nothing).")
    if plan is None and getattr(config, "shard_frozen", False):
        plan = Plan("--shard-frozen")
    return plan


def check(plan: Plan, config, world: int) -> None:
    """Refuse, in one line, a sharded run that cannot work (before the model loads)."""
    if config.validation_prompt:
        raise LorakitError(f"--validation-prompt cannot be used with {plan.source}: sample images are made by the "
                           "main process alone, and every process must join each forward of a sharded model; "
                           "drop --validation-prompt and run `lorakit generate` with the saved LoRA.")
    if world < 2:
        raise LorakitError(f"{plan.source} shards the frozen model across processes, but this run has one; "
                           "launch 2 or more (accelerate launch --num_processes N) or drop it.")


def load_device(config, device):
    """Where the components load: the CPU when the denoiser is to be sharded, so that no device
    ever holds the whole base (:func:`place` then moves the other components to ``device``)."""
    plan = requested(config)
    if plan is None:
        return device
    from accelerate.state import PartialState

    import torch

    check(plan, config, PartialState().num_processes)
    return torch.device("cpu")  # a device, as the load hook always gets (a plugin may read .type)


def place(components: dict, denoiser: str, device) -> None:
    """After loading on the CPU: every component but the denoiser to the run's device
    (the denoiser goes there shard by shard in :func:`apply`)."""
    import torch

    for name, value in components.items():
        if name != denoiser and isinstance(value, torch.nn.Module):
            value.to(device)


def block_classes(module, names: tuple = ()) -> list[str]:
    """The class names of ``module``'s blocks to shard: ``names`` (each must occur), else the
    model's ``_repeated_blocks``, else its ``_no_split_modules``."""
    present = {type(m).__name__ for m in module.modules() if m is not module}
    kind = type(module).__name__
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            raise LorakitError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which {kind} does not "
                               "have; drop the setting (lorakit then shards the blocks the model declares).")
        return list(names)
    for declared in (getattr(module, "_repeated_blocks", None), getattr(module, "_no_split_modules", None)):
        chosen = [n for n in (declared or ()) if n in present]
        if chosen:
            return chosen
    raise LorakitError(f"{kind} declares no blocks to shard (diffusers' _repeated_blocks or _no_split_modules); "
                       "train it without --shard-frozen / accelerate's FSDP setup.")


def shard(module, classes, device, world: int, reshard_after_forward: bool = True) -> int:
    """``fully_shard`` each block of ``module`` whose class is in ``classes``, then the module
    itself (what the blocks leave), every trainable parameter (the LoRA) left out; returns
    the number of blocks."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trained = {p for p in module.parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trained:  # fully_shard moves only what it manages
            p.data = p.data.to(device)
    mesh = init_device_mesh(torch.device(device).type, (world,))
    blocks = [m for m in module.modules() if m is not module and type(m).__name__ in classes]
    for block in reversed(blocks):  # inner blocks before the ones holding them
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=trained)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=trained)
    where = {(p.to_local() if hasattr(p, "to_local") else p).device.type for p in module.parameters()}
    where |= {b.device.type for b in module.buffers()}
    if where != {mesh.device_type}:  # a part left behind would run on the wrong device mid-forward
        raise LorakitError(f"sharding left parts of {type(module).__name__} on {', '.join(sorted(where))}, not only "
                           f"{mesh.device_type}; report this with the model you train.")
    return len(blocks)


def frozen_bytes(module) -> tuple[int, int]:
    """``(bytes this process stores, bytes of the whole)`` of ``module``'s frozen parameters."""
    local = whole = 0
    for p in module.parameters():
        if p.requires_grad:
            continue
        part = p.to_local() if hasattr(p, "to_local") else p
        local += part.numel() * part.element_size()
        whole += p.numel() * p.element_size()
    return local, whole


def apply(trainer) -> None:
    """Shard the run's denoiser when asked (after the LoRA is in, before the optimizer is built)."""
    config, accelerator = trainer.config, trainer.accelerator
    plan = requested(config)
    if plan is None:
        return
    world = accelerator.num_processes
    check(plan, config, world)
    name = trainer.info.denoiser
    module = trainer.components[name]
    classes = block_classes(module, plan.blocks)
    count = shard(module, classes, trainer.device, world, plan.reshard_after_forward)
    local, whole = frozen_bytes(module)
    trainer._say(f"sharded the frozen {name} over {world} processes ({count} blocks of {', '.join(classes)}): "
                 f"{local / 2**20:.1f} of {whole / 2**20:.1f} MiB on each")
