"""The objectives package: DDPM math unchanged bit for bit, flow matching equal to diffusers'
formulas and able to learn, options declared and checked, no torch on import."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.objectives import OPTIONS, options_for
from lorakit.objectives import ddpm, flow
from lorakit.options import by_name

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- registry and options -----------------------------------------------------------------


def test_importing_objectives_does_not_import_torch():
    code = "import sys, lorakit.objectives, lorakit.diffusion; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_options_for_each_objective_and_refuses_an_unknown_one():
    assert options_for("ddpm") is ddpm.DDPM_OPTIONS
    assert options_for("flow") is flow.FLOW_OPTIONS
    assert options_for("custom") == ()
    with pytest.raises(LorakitError) as info:
        options_for("edm")
    message = str(info.value)
    assert "edm" in message and all(name in message for name in OPTIONS) and "\n" not in message


def test_declarations():
    ddpm_opts = by_name(ddpm.DDPM_OPTIONS)
    assert list(ddpm_opts) == ["snr_gamma", "noise_offset", "prediction_type"]
    assert (ddpm_opts["snr_gamma"].type, ddpm_opts["snr_gamma"].default) == (float, None)
    assert (ddpm_opts["noise_offset"].type, ddpm_opts["noise_offset"].default) == (float, 0.0)
    assert ddpm_opts["prediction_type"].choices == ("epsilon", "v_prediction")
    assert ddpm_opts["prediction_type"].shown_default() == "the model's"
    flow_opts = by_name(flow.FLOW_OPTIONS)
    assert {name: o.default for name, o in flow_opts.items()} == {
        "timestep_density": "logit_normal",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
        "weighting_scheme": "none",
        "flow_shift": None,
    }
    assert flow_opts["flow_shift"].shown_default() == "the scheduler's"
    every = ddpm.DDPM_OPTIONS + flow.FLOW_OPTIONS
    by_name(every)  # no name declared twice
    assert all(o.resume and o.help for o in every)
    assert {o.panel for o in ddpm.DDPM_OPTIONS} == {"Objective (DDPM)"}
    assert {o.panel for o in flow.FLOW_OPTIONS} == {"Objective (flow matching)"}


@pytest.mark.parametrize(
    "name, bad, says",
    [
        ("prediction_type", "sample", "--prediction-type must be one of epsilon, v_prediction, got 'sample'."),
        ("weighting_scheme", "logit_normal", "--weighting-scheme must be one of none, sigma_sqrt, cosmap"),
        ("timestep_density", "cosmap", "--timestep-density must be one of uniform, logit_normal, mode"),
        ("snr_gamma", 0.0, "--snr-gamma must be positive, got 0."),
        ("noise_offset", -0.1, "--noise-offset must be >= 0"),
        ("logit_std", 0.0, "--logit-std must be positive"),
        ("mode_scale", 2.0, "--mode-scale must be >= -1 and <= 1.75194, got 2."),
        ("flow_shift", -3.0, "--flow-shift must be positive"),
    ],
)
def test_option_check_refuses_a_bad_value_in_one_line(name, bad, says):
    option = by_name(ddpm.DDPM_OPTIONS + flow.FLOW_OPTIONS)[name]
    with pytest.raises(LorakitError) as info:
        option.check(bad)
    assert str(info.value).startswith(says) and "\n" not in str(info.value)
    option.check(option.default)


# -- DDPM: moved, not changed -------------------------------------------------------------


def ddpm_scheduler(prediction_type):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type)


def reference_denoising_loss(model_fn, latents, scheduler, noise_offset, snr_gamma, generator):
    """The formulas of lorakit.diffusion before the move, written out."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2), generator=generator)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model_fn(noisy, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
    loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
    if snr_gamma:
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device).float()
        snr = ((alphas_cumprod[timesteps] ** 0.5) / ((1.0 - alphas_cumprod[timesteps]) ** 0.5)) ** 2
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        loss = loss * (clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr)
    return loss, noisy, timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("noise_offset, snr_gamma", [(0.0, None), (0.07, 5.0)])
def test_ddpm_loss_is_bit_identical_to_the_old_formulas(prediction_type, noise_offset, snr_gamma):
    import lorakit.diffusion as old

    scheduler = ddpm_scheduler(prediction_type)
    latents = torch.randn((3, 4, 8, 8), generator=gen(7))
    weight = torch.randn((4, 4), generator=gen(8))
    seen = []

    def model_fn(noisy, timesteps):
        seen.append((noisy, timesteps))
        return torch.einsum("bchw,cd->bdhw", noisy, weight)

    config = SimpleNamespace(noise_offset=noise_offset, snr_gamma=snr_gamma)
    want, want_noisy, want_t = reference_denoising_loss(model_fn, latents, scheduler, noise_offset, snr_gamma, gen(3))
    for module in (ddpm, old):
        seen.clear()
        got = module.denoising_loss(model_fn, latents, scheduler, config, gen(3))
        assert torch.equal(got, want)
        assert torch.equal(seen[0][0], want_noisy) and torch.equal(seen[0][1], want_t)


def test_ddpm_pieces_are_the_same_objects_and_values():
    import lorakit.diffusion as old

    for name in old.__all__:
        assert getattr(old, name) is getattr(ddpm, name)
    scheduler = ddpm_scheduler("v_prediction")
    latents = torch.randn((2, 4, 4, 4), generator=gen(1))
    noise = ddpm.sample_noise(latents, gen(2), 0.1)
    g = gen(2)
    base = torch.randn(latents.shape, generator=g, dtype=torch.float32)
    assert torch.equal(noise, base + 0.1 * torch.randn((2, 4, 1, 1), generator=g))
    t = ddpm.sample_timesteps(scheduler, 5, gen(4), "cpu")
    assert t.dtype == torch.long and torch.equal(t, torch.randint(0, 1000, (5,), generator=gen(4)))
    t = t[:2]
    assert torch.equal(ddpm.target_for(scheduler, latents, noise, t), scheduler.get_velocity(latents, noise, t))
    ac = scheduler.alphas_cumprod.float()
    assert torch.equal(ddpm.compute_snr(scheduler, t), ((ac[t] ** 0.5) / ((1.0 - ac[t]) ** 0.5)) ** 2)
    ddpm.apply_prediction_type(scheduler, "epsilon")
    assert scheduler.config.prediction_type == "epsilon"
    assert torch.equal(ddpm.target_for(scheduler, latents, noise, t), noise)


# -- flow matching: equal to diffusers ---------------------------------------------------


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
@pytest.mark.parametrize("logit_mean, logit_std, mode_scale", [(0.0, 1.0, 1.29), (0.4, 1.7, -0.5)])
def test_density_equals_diffusers(scheme, logit_mean, logit_std, mode_scale):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    got = flow.sample_density(512, gen(5), scheme, logit_mean, logit_std, mode_scale)
    want = compute_density_for_timestep_sampling(
        "none" if scheme == "uniform" else scheme, 512, logit_mean, logit_std, mode_scale, generator=gen(5)
    )
    assert got.shape == (512,) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert 0.0 <= float(got.min()) and float(got.max()) <= 1.0
    with pytest.raises(ValueError, match="unknown timestep density"):
        flow.sample_density(2, gen(), "cosmap")


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_equals_diffusers(scheme):
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = (torch.rand((64,), generator=gen(6)) * 0.98 + 0.01).reshape(64, 1, 1, 1)
    assert torch.equal(flow.loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_static_shift_equals_the_sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(flow.shift_sigmas(plain, 3.0), sd3.sigmas)
    assert torch.equal(flow.shift_for_scheduler(plain, sd3.config), sd3.sigmas)
    some = plain[::37]
    sd3.set_timesteps(sigmas=some.tolist())
    assert torch.allclose(flow.shift_sigmas(some, 3.0), sd3.sigmas[:-1], rtol=0, atol=1e-6)
    # The user's flow_shift wins over the scheduler's; no scheduler config means no shift.
    assert torch.equal(flow.shift_for_scheduler(plain, sd3.config, shift=2.0), flow.shift_sigmas(plain, 2.0))
    assert flow.shift_for_scheduler(plain) is plain


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_resolution_shift_equals_the_flux_scheduler_and_pipeline(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (64, 256, 1024, 4096, 6000):
        assert flow.dynamic_shift_mu(n) == calculate_shift(n)
        assert flow.dynamic_shift_mu(n, 128, 2048, 0.3, 1.4) == calculate_shift(n, 128, 2048, 0.3, 1.4)
    flux = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type=kind,
    )
    sigmas = torch.linspace(1.0, 1 / 28, 28)
    mu = calculate_shift(1024)
    assert torch.equal(flow.time_shift(sigmas, mu, kind), flux.time_shift(mu, 1.0, sigmas))
    shifted = flow.shift_for_scheduler(sigmas, flux.config, image_seq_len=1024)
    assert torch.equal(shifted, flux.time_shift(mu, 1.0, sigmas))
    flux.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    assert torch.allclose(flow.time_shift(sigmas, mu, kind), flux.sigmas[:-1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow.shift_for_scheduler(sigmas, flux.config)


def test_flow_loss_is_the_diffusers_scripts_formula_on_its_own_draws():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    latents = torch.randn((3, 4, 8, 8), generator=gen(9))
    config = SimpleNamespace(timestep_density="mode", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                             weighting_scheme="cosmap", flow_shift=None)
    flux_config = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    seen = []

    def model_fn(noisy, sigmas):
        seen.append((noisy, sigmas))
        return noisy * 0.5 + sigmas.reshape(-1, 1, 1, 1)

    got = flow.flow_matching_loss(model_fn, latents, config, gen(11), flux_config, image_seq_len=16)
    g = gen(11)
    noise = torch.randn(latents.shape, generator=g)
    u = flow.sample_density(3, g, "mode", mode_scale=1.29)
    sigmas = flow.time_shift(u, flow.dynamic_shift_mu(16))
    s = sigmas.reshape(3, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    weighting = compute_loss_weighting_for_sd3("cosmap", s)
    squared = weighting.float() * (model_fn(noisy, sigmas).float() - (noise - latents)) ** 2
    want = torch.mean(squared.reshape(3, -1), 1)
    assert got.shape == (3,) and torch.equal(got, want)
    assert seen[0][1].shape == (3,) and torch.equal(seen[0][1], sigmas) and torch.equal(seen[0][0], noisy)
    # Without the options on the config, the declared defaults apply.
    bare = flow.flow_matching_loss(model_fn, latents, None, gen(11))
    g = gen(11)
    torch.randn(latents.shape, generator=g)
    assert torch.equal(seen[-1][1], flow.sample_density(3, g, "logit_normal"))
    assert bare.shape == (3,)


def test_flow_matching_learns_a_toy_problem():
    """A small MLP learns the velocity field of four tight 2-D clusters, each named by a label
    (as a caption names an image): the held-out loss drops well below its start."""
    torch.manual_seed(0)
    centers = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]])

    def data(n, g):
        labels = torch.randint(0, 4, (n,), generator=g)
        return centers[labels] + 0.1 * torch.randn((n, 2), generator=g), torch.nn.functional.one_hot(labels, 4)

    model = torch.nn.Sequential(torch.nn.Linear(7, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                                torch.nn.Linear(64, 2))

    def model_fn_for(labels):
        return lambda noisy, sigmas: model(torch.cat([noisy, sigmas[:, None], labels.float()], dim=1))

    config = SimpleNamespace(timestep_density="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                             weighting_scheme="none", flow_shift=None)
    sd3_like = {"shift": 3.0}
    held_out, held_out_labels = data(512, gen(100))

    def held_out_loss():
        with torch.no_grad():
            loss = flow.flow_matching_loss(model_fn_for(held_out_labels), held_out, config, gen(101), sd3_like)
        return float(loss.mean())

    start = held_out_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = gen(1)
    for _ in range(300):
        latents, labels = data(128, g)
        loss = flow.flow_matching_loss(model_fn_for(labels), latents, config, g, sd3_like).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = held_out_loss()
    print(f"toy flow-matching held-out loss: start {start:.4f}, end {end:.4f} ({end / start:.2f}x)")
    assert math.isfinite(end) and end < 0.75 * start
