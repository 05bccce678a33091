"""The optimizer of a run (``--optimizer``) and its learning rates (``--scale-lr``).

* ``adamw`` -- torch's AdamW (the default; what every run before ``--optimizer`` used).
* ``adamw8bit`` -- bitsandbytes' 8-bit AdamW (``pip install lorakit[bitsandbytes]``; a CUDA GPU).
* ``prodigy`` -- prodigyopt's Prodigy, which estimates the step size itself: use
  ``--learning-rate 1`` (``pip install lorakit[prodigy]``).
* ``adafactor`` -- transformers' Adafactor at the given learning rate (no relative step, no
  parameter scaling), so the LR schedule applies as with the others.

A missing package or an unsupported device is one line before the model loads. The choice is
part of what a resume must match (an optimizer's state only loads into the same optimizer),
and its state resumes exactly (it is saved with the checkpoint like AdamW's). ``--scale-lr``
multiplies the learning rates by gradient accumulation x batch size x processes, as diffusers'
training scripts do; the run config keeps the rates as given.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec
from types import SimpleNamespace

from lorakit.errors import LorakitError

log = logging.getLogger("lorakit")

#: optimizer -> (package it needs, the extra that installs it)
PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigy")}


def check(config) -> None:
    """The chosen optimizer's package is installed (called by validate, before anything loads)."""
    name = config.optimizer
    if name in PACKAGES and find_spec(PACKAGES[name][0]) is None:
        package, extra = PACKAGES[name]
        raise LorakitError(f"--optimizer {name} needs the {package} package; pip install lorakit[{extra}], "
                           "or use --optimizer adamw.")


def prepare_device(config, device) -> None:
    """Refuse an optimizer the device cannot run, and allow TF32 when asked (before the model loads)."""
    import torch

    if config.optimizer == "adamw8bit" and getattr(device, "type", str(device)) != "cuda":
        raise LorakitError(f"--optimizer adamw8bit (bitsandbytes) needs a CUDA GPU, and this run is on "
                           f"{getattr(device, 'type', device)}; use --optimizer adamw.")
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def lr_factor(config, processes: int) -> int:
    """What ``--scale-lr`` multiplies the learning rates by (1 without it)."""
    return config.gradient_accumulation * config.batch_size * processes if config.scale_lr else 1


def build(groups: list, config):
    """The optimizer over ``groups`` (torch parameter groups, each with its ``lr``)."""
    import torch

    c, name = config, config.optimizer
    betas = (c.adam_beta1, c.adam_beta2)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas, weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, betas=betas, weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, betas=betas, weight_decay=c.adam_weight_decay, eps=c.adam_epsilon, decouple=True)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=groups[0]["lr"], weight_decay=c.adam_weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    raise LorakitError(f"--optimizer {name} is not one of adamw, adamw8bit, prodigy, adafactor.")


def make_optimizer(components, lora_configs, text_encoders, config, accelerator):
    """``(params, optimizer, lr_scheduler)`` over every LoRA parameter, one group per component
    (text encoders at ``--text-encoder-lr`` when given), with the chosen optimizer."""
    from diffusers.optimization import get_scheduler

    from lorakit import lora

    c = config
    factor = lr_factor(c, accelerator.num_processes)
    lr, te_lr = c.learning_rate * factor, (c.text_encoder_lr * factor if c.text_encoder_lr else None)
    check_fits_float32(SimpleNamespace(learning_rate=lr, text_encoder_lr=te_lr, adam_beta1=c.adam_beta1,
                                       adam_weight_decay=c.adam_weight_decay))
    if factor != 1:
        log.info("--scale-lr: learning rate %g x %d = %g", c.learning_rate, factor, lr)
    groups = []
    for name in lora_configs:
        rate = te_lr if name in text_encoders and te_lr else lr
        groups.append({"params": lora.lora_parameters(components[name]), "lr": rate, "name": name})
    params = [p for g in groups for p in g["params"]]
    optimizer = build(groups, c)
    scheduler = get_scheduler(c.lr_scheduler, optimizer=optimizer, num_warmup_steps=c.lr_warmup_steps,
                              num_training_steps=c.max_steps)
    return params, accelerator.prepare_optimizer(optimizer), scheduler


def check_fits_float32(config) -> None:
    """Refuse optimizer settings the fp32 update cannot hold (torch raises an overflow
    RuntimeError mid-step for them): AdamW's first step size, lr / (1 - beta1), and the
    learning rates' product with the weight decay."""
    import torch

    top = float(torch.finfo(torch.float32).max)
    rates = [("--learning-rate", config.learning_rate)]
    if config.text_encoder_lr:
        rates.append(("--text-encoder-lr", config.text_encoder_lr))
    for flag, lr in rates:
        if lr / (1 - config.adam_beta1) > top:
            raise LorakitError(
                f"{flag} {lr:g} is beyond float32's range for AdamW (lr / (1 - --adam-beta1) must stay under "
                f"{top:.3g}); use a learning rate such as 1e-4."
            )
        if lr * config.adam_weight_decay > top:
            raise LorakitError(
                f"{flag} {lr:g} times --adam-weight-decay {config.adam_weight_decay:g} is beyond float32's range; "
                "lower one of them (defaults 1e-4 and 0.01)."
            )
