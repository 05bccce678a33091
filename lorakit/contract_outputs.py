"""Model outputs for the contract's reload checks (:mod:`lorakit.contract`).

A reload is judged by what the model computes, not by its weights: one batch built by the
loop goes through ``compute_loss`` with one seeded generator, in eval mode, once with the
trained components, once with the denoiser (and trained text encoders) a pipeline loaded
from the LoRA file, and once with the LoRA bypassed; a forward hook on the denoiser
(``ArchInfo.denoiser``) captures what it returns each time. Nothing here imports torch at
module level and no arch is named.
"""

from __future__ import annotations

import contextlib

from lorakit.rng import Rows

SEED = 1234


def lora_layer_names(module) -> list[str]:
    """Names (within ``module``) of the layers that carry at least one LoRA adapter."""
    if module is None:
        return []
    return [n.replace("base_model.model.", "") for n, m in module.named_modules()
            if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0]


def pipeline_component(pipeline, name: str, trained):
    """The pipeline's module standing for trained component ``name``: the attribute of that
    name if it is of the trained module's class and carries LoRA, else the only module of
    that class that carries LoRA (e.g. a combined pipeline's ``prior_text_encoder``)."""
    import torch

    def fits(m):
        return isinstance(m, torch.nn.Module) and type(m) is type(trained) and bool(lora_layer_names(m))

    same = getattr(pipeline, name, None)
    if fits(same):
        return same
    parts = {**vars(pipeline), **(getattr(pipeline, "components", None) or {})}
    found = list({id(m): m for m in parts.values() if fits(m)}.values())
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def lora_disabled(modules):
    """Within the block the LoRA layers of ``modules`` are bypassed (the base model's output);
    afterwards they are active again, each parameter's ``requires_grad`` as before."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    grads = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def probing(components, trained_names):
    """No gradients, the trained modules in eval mode, and the global RNG left as it was."""
    import torch

    modules = [components[n] for n in trained_names if isinstance(components.get(n), torch.nn.Module)]
    modes = [m.training for m in modules]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        for m in modules:
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)


def with_trained_text(pm, info, trained_names, components, batch) -> dict:
    """``batch`` plus the outputs of the text encoders that train LoRA, computed with
    ``components``, as the loop adds them inside a step (``encode_text`` per trained
    prompt encoder where the arch implements it, else ``encode_prompt``)."""
    trained = [n for n in trained_names if n in info.text_encoders]
    batch = dict(batch)
    if not trained:
        return batch
    if info.prompt_encoders and pm.hook.encode_text.get_hookimpls():
        for encoder in [e for e in info.prompt_encoders if e in trained]:
            batch.update(pm.hook.encode_text(components=components, captions=batch["captions"], encoder=encoder))
    else:
        batch.update(pm.hook.encode_prompt(components=components, captions=batch["captions"]))
    return batch


def denoiser_outputs(pm, info, trainer, components, batch) -> list:
    """Every tensor the denoiser of ``components`` returns in one seeded ``compute_loss`` call
    on ``batch`` (trained text encoders of ``components`` included)."""
    import torch

    captured = []
    hook = components[info.denoiser].register_forward_hook(lambda m, args, out: captured.extend(tensors_in(out)))
    try:
        with probing(components, trainer.lora_configs):
            full = with_trained_text(pm, info, trainer.lora_configs, components, batch)
            generator = torch.Generator().manual_seed(SEED)
            pm.hook.compute_loss(components=components, batch=full, config=trainer.config, generator=generator,
                                 rows=Rows.from_generator(generator, len(full["captions"])))
    finally:
        hook.remove()
    return [t.detach().float().cpu() for t in captured]


def compare_outputs(pm, info, trainer, pipeline, fail, hooks, atol: float) -> dict:
    """Figures of a reload: LoRA layers per component, the largest output difference between
    the trained and the ``pipeline``'s modules (must be < ``atol``), and the LoRA's own effect
    (trained vs bypassed; must be > 0). ``fail(hooks, message)`` reports a broken contract."""
    from lorakit.lora import count_lora_layers

    reloaded, layers = dict(trainer.components), {}
    for name in trainer.lora_configs:
        trained = trainer.components[name]
        found = pipeline_component(pipeline, name, trained)
        if found is None:
            fail(hooks, f"{type(pipeline).__name__} holds no {type(trained).__name__} carrying LoRA "
                        f"for the trained component '{name}'")
        want, got = count_lora_layers(trained), count_lora_layers(found)
        if want != got:
            fail(hooks, f"{got} of the {want} LoRA layers of '{name}' were loaded")
        reloaded[name], layers[name] = found, want
    batch = trainer.make_batch(0, [0, 1])
    mine = denoiser_outputs(pm, info, trainer, trainer.components, batch)
    theirs = denoiser_outputs(pm, info, trainer, reloaded, batch)
    with lora_disabled([trainer.components[n] for n in trainer.lora_configs]):
        base = denoiser_outputs(pm, info, trainer, trainer.components, batch)
    diff, effect = max_difference(mine, theirs), max_difference(mine, base)
    if effect <= 0:
        fail("compute_loss", f"the trained LoRA does not change the {info.denoiser}'s output, "
                             "so a reload cannot be told from the base model")
    if diff >= atol:
        fail(hooks, f"the reloaded {info.denoiser} differs from the trained one by {diff:.3g} "
                    f"(tolerance {atol:g}; the LoRA's own effect is {effect:.3g})")
    return {"layers": layers, "max_output_diff": diff, "lora_effect": effect}


def instance_inside(pipeline, cls):
    """``pipeline`` itself or one of its parts that is a ``cls`` (e.g. a combined pipeline's
    prior pipeline), else None."""
    return next((p for p in (pipeline, *vars(pipeline).values()) if isinstance(p, cls)), None)


def tensors_in(out) -> list:
    """The tensors of a module's output (a tensor, tuple, list, dict or diffusers output)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_in(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors_in(v)]
    return []


def max_difference(a: list, b: list) -> float:
    """Largest absolute difference between two lists of tensors (inf if their shapes differ)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max((float((x - y).abs().max()) for x, y in zip(a, b)), default=float("inf"))
