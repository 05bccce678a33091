"""``--init-lora FILE``: a run that starts from an existing LoRA (someone else's, or an earlier
run's) instead of a fresh one.

The file may be in any format lorakit reads (:mod:`lorakit.formats.read`). Its layers decide
the run's LoRA: which components and layers carry one, each layer's rank and alpha (rank and
alpha patterns included), so ``--rank`` / ``--alpha`` / ``--target-modules`` that say otherwise
are refused in one line, and a file with text-encoder LoRA trains those too. The weights at
step 0 are exactly the file's (checked after loading). The file's sha256 is part of what a
resume must match (``init_lora_sha256``), so a resumed run cannot silently continue from
another file of the same name.
"""

from __future__ import annotations

from pathlib import Path

from lorakit import fsutil
from lorakit.errors import LorakitError


def read_init_lora(config, pm, model_path: Path) -> dict:
    """``{component: (state dict, adapter metadata)}`` of ``--init-lora``, checked against the run."""
    from lorakit.formats.read import open_lora, read_layers

    lora = open_lora(config.init_lora, what="--init-lora")
    config.init_lora_sha256 = fsutil.sha256_of(lora.path)
    try:
        layers = read_layers(lora, pm, model_path)
    except LorakitError as exc:  # e.g. kohya names that match no layer of this model
        raise _refuse(config, lora, str(exc).split("; is the LoRA")[0].rstrip(".")) from None
    info = pm.hook.arch_info()
    allowed = {info.denoiser, *info.text_encoders}
    stray = sorted(set(layers) - allowed)
    if stray:
        raise LorakitError(
            f"--init-lora {config.init_lora} has LoRA for {', '.join(stray)}, which --arch {config.arch} does not train "
            f"(it trains {', '.join(sorted(allowed))}); is the LoRA for another --arch?"
        )
    if info.denoiser not in layers:
        raise LorakitError(f"--init-lora {config.init_lora} has no LoRA for the {info.denoiser}; lorakit trains the {info.denoiser}'s LoRA.")
    _check_options(config, layers[info.denoiser][1])
    if config.given("train_text_encoder") and config.train_text_encoder and not set(layers) & set(info.text_encoders):
        raise LorakitError(
            f"--train-text-encoder: --init-lora {config.init_lora} has no text-encoder LoRA to continue; drop one of them."
        )
    for name, (state, _) in layers.items():
        _check_fits(config, lora, name, state, model_path)
    return layers


def _refuse(config, lora, problem: str) -> LorakitError:
    from lorakit.formats.fit import arch_hint

    return LorakitError(f"--init-lora {lora.path} does not fit --arch {config.arch} with --model {config.model} "
                        f"({problem}); {arch_hint(lora, config.arch, config.model)}.")


def _check_fits(config, lora, component: str, state: dict, model_path) -> None:
    """Every layer of the file exists in the base model with the shapes its weights need."""
    from lorakit.formats.fit import mismatch
    from lorakit.formats.layout import component_module

    try:
        module = component_module(model_path, component)
    except LorakitError:
        raise _refuse(config, lora, f"it has LoRA for '{component}', which --model lacks") from None
    problem = mismatch(module, state)
    if problem:
        raise _refuse(config, lora, f"{component}.{problem}")


def _check_options(config, meta: dict) -> None:
    """The file decides rank and alpha: a different explicit value is refused, the run takes the file's."""
    rank, alpha = int(meta.get("r", config.rank)), float(meta.get("lora_alpha", meta.get("r", config.rank)))
    source = f"--init-lora {config.init_lora}"
    if config.given("rank") and config.rank != rank:
        raise LorakitError(f"--rank {config.rank} conflicts with {source} (rank {rank}); drop --rank, the file decides it.")
    if config.given("alpha") and config.alpha is not None and float(config.alpha) != alpha:
        raise LorakitError(f"--alpha {config.alpha:g} conflicts with {source} (alpha {alpha:g}); drop --alpha, the file decides it.")
    config.rank, config.alpha = rank, alpha


def check_targets(config, component: str, module, state: dict) -> None:
    """An explicit ``--target-modules`` must name exactly the file's layers of the denoiser."""
    from lorakit.lora import _matches

    if not config.target_modules:
        return
    wanted = {n for n, _ in module.named_modules() if n and any(_matches(n, t) for t in config.target_modules)}
    have = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_A.weight")}
    if wanted != have:
        extra = sorted(wanted - have) or sorted(have - wanted)
        raise LorakitError(
            f"--target-modules {','.join(config.target_modules)} names other layers than --init-lora {config.init_lora} "
            f"has LoRA on (e.g. {component}.{extra[0]}); drop --target-modules, the file decides them."
        )


def inject(trainer) -> dict:
    """Add the file's LoRA to the run's components with its weights; ``{component: LoraConfig}``."""
    import dataclasses

    import torch
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from lorakit import lora

    config, components, pm = trainer.config, trainer.components, trainer.pm
    layers = read_init_lora(config, pm, trainer.model_path)
    info = pm.hook.arch_info()
    if set(layers) & set(info.text_encoders):
        lora.check_text_encoder_lora_support()
        config.train_text_encoder = True
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    configs = {}
    for name, (state, meta) in layers.items():
        module = components[name]
        if name == info.denoiser:
            check_targets(config, name, module, state)
        values = {k: v for k, v in meta.items() if k in fields}
        if config.given("dropout"):
            values["lora_dropout"] = config.dropout
        configs[name] = LoraConfig(**values)
    modules = {n: sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_A.weight")}) for n, (state, _) in layers.items()}
    lora_configs = lora.inject_lora(components, modules, config, lora_configs=configs)
    for name, (state, _) in layers.items():
        module = components[name]
        wanted = {k: t.to(torch.float32) for k, t in state.items()}
        result = set_peft_model_state_dict(module, wanted, adapter_name=lora.ADAPTER)
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        loaded = lora.lora_state_dict(module)
        if missing or set(loaded) != set(wanted) or any(not torch.equal(loaded[k], wanted[k]) for k in wanted):
            raise LorakitError(f"--init-lora {config.init_lora}: its {name} LoRA did not load exactly; the file does not fit --model.")
    return lora_configs


