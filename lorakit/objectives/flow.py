"""Rectified-flow / flow-matching objective, as SD3, FLUX and Sana are trained.

A sample at noise level ``sigma`` in [0, 1] is ``(1 - sigma) * latents + sigma * noise``
and the model predicts the velocity ``noise - latents``. The pieces follow diffusers'
``training_utils`` and ``FlowMatchEulerDiscreteScheduler`` formula for formula (the tests
compare them), as plain functions over tensors; all randomness comes from the
:class:`lorakit.rng.Rows` passed in as ``generator`` (one stream per sample; a
``torch.Generator``, the older contract, is drawn from as one batch), so a run draws the same
on any device or process count.

Two deliberate differences from diffusers' example training scripts, which index the
scheduler's descending 1000-step table with ``u``: here ``sigma`` *is* the drawn ``u``
(then shifted), continuous, as in the SD3 paper. The distributions are the same for the
uniform and mode densities and for a logit-normal with mean 0; a positive ``logit_mean``
favours noisier samples here (the paper's sense) where in those scripts it favours cleaner
ones. And the scripts' single ``--weighting_scheme`` both picks the density and weights
the loss; here those are two options, ``timestep_density`` and ``weighting_scheme``.
"""

from __future__ import annotations

import math

from lorakit.options import Option

PANEL = "Objective (flow matching)"
DENSITIES = ("uniform", "logit_normal", "mode")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# Every objective option changes the trained trajectory, so a resume must keep its value.
FLOW_OPTIONS = (
    Option(
        "timestep_density",
        str,
        # The SD3 paper's best density and diffusers' SD3 LoRA script's default
        # (--weighting_scheme logit_normal). Its FLUX and Sana scripts default to "none",
        # which there means a uniform density.
        "logit_normal",
        "How training noise levels are drawn: uniform, logit_normal (SD3's) or mode.",
        choices=DENSITIES,
        resume=True,
        panel=PANEL,
    ),
    Option(
        "logit_mean",
        float,
        0.0,
        "Mean of the logit-normal density; above 0 favours noisier samples.",
        resume=True,
        panel=PANEL,
    ),
    Option(
        "logit_std",
        float,
        1.0,
        "Standard deviation of the logit-normal density.",
        minimum=0,
        exclusive_minimum=True,
        resume=True,
        panel=PANEL,
    ),
    Option(
        "mode_scale",
        float,
        1.29,
        "Scale of the mode density; above 0 favours middle noise levels.",
        # Outside [-1, 2/(pi-2)] the mode mapping is not monotonic and leaves [0, 1].
        minimum=-1.0,
        maximum=2 / (math.pi - 2),
        resume=True,
        panel=PANEL,
    ),
    Option(
        "weighting_scheme",
        str,
        # Both diffusers scripts weight every sample equally by default.
        "none",
        "Loss weight over the noise level: none, sigma_sqrt or cosmap.",
        choices=WEIGHTINGS,
        resume=True,
        panel=PANEL,
    ),
    Option(
        "flow_shift",
        float,
        None,
        "Timestep shift (3.0 is SD3's); not set = the model scheduler's shift.",
        minimum=0,
        exclusive_minimum=True,
        resume=True,
        panel=PANEL,
        default_text="the scheduler's",
    ),
)

_DEFAULTS = {option.name: option.default for option in FLOW_OPTIONS}


def sample_density(batch_size: int, generator, scheme: str = "logit_normal", logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29):
    """``batch_size`` draws of ``u`` in [0, 1] (CPU, float32) from the density ``scheme``.

    For the same generator state this equals diffusers'
    ``compute_density_for_timestep_sampling``, which silently treats an unknown scheme as
    uniform; here an unknown scheme is refused.
    """
    import torch

    from lorakit import rng

    if scheme == "logit_normal":
        u = rng.normal(generator, logit_mean, logit_std, (batch_size,))
        return torch.nn.functional.sigmoid(u)
    if scheme == "mode":
        u = rng.rand(generator, (batch_size,))
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return rng.rand(generator, (batch_size,))
    raise ValueError(f"unknown timestep density '{scheme}'; known: {', '.join(DENSITIES)}")


def shift_sigmas(sigmas, shift: float):
    """SD3's static shift: more time at high noise for ``shift`` > 1 (the scheduler's ``shift``)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's ``mu`` for an image of ``image_seq_len`` latent tokens: linear in the length,
    ``base_shift`` at ``base_seq_len`` and ``max_shift`` at ``max_seq_len`` (diffusers'
    ``calculate_shift``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(sigmas, mu: float, kind: str = "exponential"):
    """Resolution-dependent shift, as ``FlowMatchEulerDiscreteScheduler.time_shift(mu, 1.0, sigmas)``:
    ``exp(mu) / (exp(mu) + (1/sigma - 1))`` (or ``mu / (mu + (1/sigma - 1))`` for ``kind="linear"``)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** 1.0)
    raise ValueError(f"unknown time shift type '{kind}'; known: exponential, linear")


def shift_for_scheduler(sigmas, scheduler_config=None, image_seq_len: int | None = None, shift: float | None = None):
    """``sigmas`` shifted as the model's scheduler shifts its own.

    ``shift`` (the user's ``flow_shift``), when given, is applied as a static shift and wins
    over the scheduler. Otherwise a scheduler config with ``use_dynamic_shifting`` (FLUX)
    shifts by image size, which then needs ``image_seq_len``; any other applies its static
    ``shift`` (SD3: 3.0; Sana's configs call it ``flow_shift``). No config: unshifted.
    ``shift_terminal`` and the karras/exponential/beta schedules shape inference schedules
    only and are not applied.
    """
    if shift is not None:
        return shift_sigmas(sigmas, shift)
    if scheduler_config is None:
        return sigmas
    get = scheduler_config.get
    if get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("this scheduler shifts by image size (use_dynamic_shifting): pass image_seq_len")
        mu = dynamic_shift_mu(
            image_seq_len,
            get("base_image_seq_len", 256),
            get("max_image_seq_len", 4096),
            get("base_shift", 0.5),
            get("max_shift", 1.15),
        )
        return time_shift(sigmas, mu, get("time_shift_type", "exponential"))
    return shift_sigmas(sigmas, get("shift", get("flow_shift", 1.0)))


def loss_weighting(scheme: str, sigmas):
    """Per-sample loss weights as diffusers' ``compute_loss_weighting_for_sd3``.

    ``sigma_sqrt`` is ``sigma**-2``: unbounded as sigma nears 0 (diffusers' scripts never
    draw below 1/1000 there; a continuous draw can come closer).
    """
    import torch

    if scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    if scheme == "none":
        return torch.ones_like(sigmas)
    raise ValueError(f"unknown loss weighting '{scheme}'; known: {', '.join(WEIGHTINGS)}")


def _setting(config, name: str):
    # The core adds the objective's options to its config; a config without them (an older
    # core, a plugin's own object, None) trains with the declared defaults.
    return getattr(config, name, _DEFAULTS[name])


def flow_matching_loss(model_fn, latents, config, generator, scheduler_config=None, image_seq_len: int | None = None):
    """The flow-matching loss per sample, a ``(B,)`` float32 tensor.

    ``model_fn(noisy_latents, sigmas) -> prediction`` of the velocity ``noise - latents``.
    ``sigmas`` is a float32 ``(B,)`` tensor on the latents' device with values in [0, 1]
    (1 = pure noise); ``model_fn`` converts it to its model's timestep scale itself
    (SD3's and Sana's transformers take ``sigmas * 1000``; FLUX's takes ``sigmas`` as they are).
    ``config`` supplies the options of :data:`FLOW_OPTIONS`; ``scheduler_config`` (the
    model scheduler's config) and ``image_seq_len`` pick the shift, see
    :func:`shift_for_scheduler`. Draws from ``generator`` (``compute_loss``'s ``rows``, or a
    ``torch.Generator``): each row its noise, then its noise level.
    """
    import torch

    from lorakit import rng

    noise = rng.randn(generator, latents.shape, torch.float32).to(latents.device, latents.dtype)
    u = sample_density(
        latents.shape[0],
        generator,
        _setting(config, "timestep_density"),
        _setting(config, "logit_mean"),
        _setting(config, "logit_std"),
        _setting(config, "mode_scale"),
    )
    sigmas = shift_for_scheduler(u, scheduler_config, image_seq_len, _setting(config, "flow_shift")).to(latents.device)
    # Shaped to broadcast over each sample, in the latents' dtype, as diffusers' get_sigmas does.
    expanded = sigmas.reshape((-1,) + (1,) * (latents.ndim - 1)).to(latents.dtype)
    noisy = (1.0 - expanded) * latents + expanded * noise
    prediction = model_fn(noisy, sigmas)
    target = noise - latents
    weighting = loss_weighting(_setting(config, "weighting_scheme"), expanded)
    squared = weighting.float() * (prediction.float() - target.float()) ** 2
    return squared.reshape(latents.shape[0], -1).mean(dim=1)


__all__ = [
    "DENSITIES",
    "FLOW_OPTIONS",
    "WEIGHTINGS",
    "dynamic_shift_mu",
    "flow_matching_loss",
    "loss_weighting",
    "sample_density",
    "shift_for_scheduler",
    "shift_sigmas",
    "time_shift",
]
