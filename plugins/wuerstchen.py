"""Wuerstchen v2 prior (stage C): LoRA on the text-conditional ``WuerstchenPrior``.

Registered as arch ``wuerstchen`` through the ``lorakit.archs`` entry point. The base
model is a prior folder such as ``warp-ai/wuerstchen-prior`` (subfolders ``prior``,
``text_encoder``, ``tokenizer``, ``scheduler``), the model diffusers' research example
``train_text_to_image_lora_prior.py`` trains. Training follows that recipe:

* images -> EfficientNetV2-S image embeddings (stage B's ``EfficientNetEncoder``:
  backbone features + 1x1 conv mapper + BatchNorm), scaled ``(x + 1) / 42``;
* continuous timesteps ``t ~ U[0, 1)``, noise added by ``DDPMWuerstchenScheduler``;
* the prior predicts the noise from the noisy embedding, ``t`` and the CLIP text
  model's last hidden state; the loss is the MSE against the noise.

torchvision (which provides EfficientNetV2-S) does not import beside torch 2.13, so the
encoder is implemented here in plain torch with torchvision's parameter names
(``backbone.N.M.block...``, ``mapper.0/1``), so the published stage-B checkpoint's
``effnet_state_dict`` loads into it unchanged. Its weights are read from safetensors
only; :func:`convert_encoder_checkpoint` turns the published ``.pt`` into safetensors
with ``torch.load(weights_only=True)``. Where the encoder comes from:
``--vae DIR_OR_HUB_ID`` (the arch's image encoder, see docs/archs/wuerstchen.md), else
``MODEL/image_encoder/``.

Image generation chains the prior with a Wuerstchen decoder (stage B + Paella VQGAN):
``MODEL/decoder/`` if present, else the hub's ``warp-ai/wuerstchen``.

Module import stays free of torch: torch-backed classes are built on first use.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.arch import ArchInfo
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl
from lorakit.pipelines import tokenize

PIPELINE_CLASSES = {"WuerstchenPriorPipeline"}
PRIOR_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
REQUIRED_SUBFOLDERS = ("prior", "text_encoder", "tokenizer")
ENCODER_SUBFOLDER = "image_encoder"
DECODER_SUBFOLDER = "decoder"
DEFAULT_DECODER = "warp-ai/wuerstchen"
ENCODER_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")

#: How the stage-B training fed images to the encoder: ImageNet statistics on [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Stage C is trained on ``(effnet(x) + 1) / 42``; the prior pipeline undoes it (``* 42 - 1``).
EMBED_SHIFT = 1.0
EMBED_SCALE = 42.0

#: EfficientNetV2-S feature stages, as torchvision builds ``efficientnet_v2_s().features[1:7]``:
#: (block, expand ratio, kernel, stride, input channels, output channels, layers).
EFFICIENTNET_V2_S = (
    ("fused", 1, 3, 1, 24, 24, 2),
    ("fused", 4, 3, 2, 24, 48, 4),
    ("fused", 4, 3, 2, 48, 64, 4),
    ("mbconv", 4, 3, 2, 64, 128, 6),
    ("mbconv", 6, 3, 1, 128, 160, 9),
    ("mbconv", 6, 3, 2, 160, 256, 15),
)
#: torchvision builds EfficientNetV2 with BatchNorm2d(eps=1e-3); the mapper's BatchNorm keeps torch's default.
BACKBONE_BN_EPS = 1e-3
ENCODER_DEFAULTS = {"c_latent": 16, "c_cond": 1280, "effnet": "efficientnet_v2_s"}


# ----------------------------------------------------------------------------- arch hooks


@hookimpl
def arch_info():
    return ArchInfo(
        description="Wuerstchen v2 prior (stage C): LoRA on the WuerstchenPrior, optionally on its CLIP text encoder",
        denoiser="prior",
        default_targets={"prior": PRIOR_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS},
        text_encoders=("text_encoder",),
        default_resolution=512,
        pipeline_class="WuerstchenPriorPipeline",
        pipeline_loads_lora=True,
    )


@hookimpl
def recognizes_model(model_index):
    return model_index.get("_class_name") in PIPELINE_CLASSES


def _check_layout(path: Path) -> None:
    missing = [s for s in REQUIRED_SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise LorakitError(
            f"--model {path} lacks the subfolder(s) {', '.join(missing)} of a Wuerstchen prior; "
            "pass a prior folder such as warp-ai/wuerstchen-prior."
        )


def _wuerstchen_classes():
    from diffusers.pipelines.deprecated import wuerstchen

    return wuerstchen


def _load_prior_parts(path: Path, dtype=None):
    """Prior, text encoder, tokenizer and scheduler, each with ``from_pretrained(path, subfolder=...)``.

    A saved Wuerstchen pipeline does not load back through ``DiffusionPipeline.from_pretrained``
    on current diffusers, so every component is loaded on its own.
    """
    import torch
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.tiny import check_tokenizer_matches

    _check_layout(path)
    dtype = dtype or torch.float32
    # dtype at load time: diffusers warns about casting a loaded WuerstchenPrior with .to(dtype)
    prior = _wuerstchen_classes().WuerstchenPrior.from_pretrained(path, subfolder="prior", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    check_tokenizer_matches(tokenizer, text_encoder, f"--model {path}")
    if (path / "scheduler").is_dir():
        scheduler = DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler")
    else:  # the research example builds the default scheduler; so does a prior folder without one
        scheduler = DDPMWuerstchenScheduler()
    if prior.config.c_cond != text_encoder.config.hidden_size:
        raise LorakitError(
            f"--model {path}: the prior expects {prior.config.c_cond}-wide text embeddings but the text encoder "
            f"gives {text_encoder.config.hidden_size}; the folder mixes models, re-download it."
        )
    return prior, text_encoder, tokenizer, scheduler


@hookimpl
def load_components(model_path, config, device, weight_dtype):
    import torch

    path = Path(model_path)
    if config.prediction_type not in (None, "epsilon"):
        raise LorakitError(
            f"--prediction-type {config.prediction_type} is not supported by --arch wuerstchen "
            "(the prior predicts noise); drop the flag."
        )
    prior, text_encoder, tokenizer, scheduler = _load_prior_parts(path, weight_dtype)
    encoder_dir = find_image_encoder(path, config.vae)
    image_encoder = load_image_encoder(encoder_dir)
    if image_encoder.c_latent != prior.config.c_in:
        raise LorakitError(
            f"image encoder {encoder_dir} makes {image_encoder.c_latent}-channel embeddings but the prior "
            f"expects {prior.config.c_in}; pass the stage-B encoder that belongs to this prior."
        )
    if config.validation_prompt:
        find_decoder(path)  # fail now, not at the first sample after minutes of training

    # The encoder stays in fp32: it runs once per image (cached) and its BatchNorms are fp32-calibrated.
    image_encoder.to(device, dtype=torch.float32)
    prior.to(device)
    text_encoder.to(device)
    for module in (image_encoder, prior, text_encoder):
        module.eval()
    return {
        "prior": prior,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "image_encoder": image_encoder,
        "noise_scheduler": scheduler,
        "model_path": path,
    }


@hookimpl
def target_modules(config, components):
    targets = {"prior": list(config.target_modules or PRIOR_TARGETS)}
    if config.train_text_encoder:
        targets["text_encoder"] = list(TEXT_ENCODER_TARGETS)
    return targets


def effnet_pixels(pixel_values):
    """``[-1, 1]`` pixels -> what the encoder was trained on: ``[0, 1]`` normalised with ImageNet statistics."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixel_values.device, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixel_values.float() + 1.0) / 2.0 - mean) / std


@hookimpl
def encode_images(components, pixel_values, batch):
    encoder = components["image_encoder"]
    embeds = encoder(effnet_pixels(pixel_values))
    return {"image_embeds": (embeds + EMBED_SHIFT) / EMBED_SCALE}


@hookimpl
def encode_prompt(components, captions):
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    tokens = tokenize(tokenizer, captions)
    # The prior pipeline passes the attention mask at inference; training conditions the same way.
    out = text_encoder(
        tokens.input_ids.to(text_encoder.device), attention_mask=tokens.attention_mask.to(text_encoder.device)
    )
    return {"prompt_embeds": out.last_hidden_state}


def _base_dropout_off(module) -> None:
    """Keep the frozen prior's own dropout inactive while its LoRA trains.

    The core puts LoRA-carrying components in train mode, which would switch on the
    prior's built-in dropout (0.1 in the published config) and draw from torch's global
    RNG instead of the run's generator. LoRA's own dropout (``lora_dropout``) stays as
    configured.
    """
    import torch

    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Dropout) and "lora_dropout" not in name and sub.training:
            sub.eval()


def sample_timesteps(batch_size: int, generator, device):
    """Continuous timesteps ``t ~ U[0, 1)`` as the original stage-C training draws them."""
    import torch

    return torch.rand((batch_size,), generator=generator, dtype=torch.float32).to(device)


@hookimpl
def compute_loss(components, batch, config, generator):
    import torch

    from lorakit.diffusion import per_sample_mse, sample_noise

    prior, scheduler = components["prior"], components["noise_scheduler"]
    _base_dropout_off(prior)
    embeds = batch["image_embeds"].float()
    noise = sample_noise(embeds, generator, config.noise_offset)
    timesteps = sample_timesteps(embeds.shape[0], generator, embeds.device)
    noisy = scheduler.add_noise(embeds, noise, timesteps)
    prediction = prior(
        noisy.to(prior.dtype), timesteps.to(prior.dtype), batch["prompt_embeds"].to(prior.dtype)
    )
    loss = per_sample_mse(prediction, noise)
    if config.snr_gamma:
        alpha_cumprod = scheduler._alpha_cumprod(timesteps, embeds.device).float()
        snr = alpha_cumprod / (1.0 - alpha_cumprod)
        loss = loss * torch.clamp(snr, max=config.snr_gamma) / snr
    return loss


@hookimpl
def save_lora(components, lora_layers, output_dir, weight_name):
    # The prior pipeline's loader names the prior "unet" in its save API and stores it as "prior.*".
    pipeline_class = _wuerstchen_classes().WuerstchenPriorPipeline
    kwargs = {}
    for name, (state, meta) in lora_layers.items():
        key = "unet" if name == "prior" else name
        kwargs[f"{key}_lora_layers"] = state
        kwargs[f"{key}_lora_adapter_metadata"] = meta
    pipeline_class.save_lora_weights(str(output_dir), weight_name=weight_name, **kwargs)


# ----------------------------------------------------------------------------- inference


def find_decoder(model_path) -> Path:
    """The decoder (stage B + VQGAN) to chain after the prior: ``MODEL/decoder/``, else the hub's."""
    from lorakit.models import resolve_model

    local = Path(model_path) / DECODER_SUBFOLDER
    if (local / "model_index.json").is_file():
        return local
    try:
        return resolve_model(DEFAULT_DECODER)
    except LorakitError:
        raise LorakitError(
            f"images need a Wuerstchen decoder: {model_path} has no {DECODER_SUBFOLDER}/ folder and the hub's "
            f"{DEFAULT_DECODER} could not be loaded (offline or not downloaded); put a WuerstchenDecoderPipeline "
            f"folder (e.g. a download of {DEFAULT_DECODER}) at {local}."
        ) from None


def _load_decoder_pipeline(decoder_path: Path, dtype=None):
    import torch
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from lorakit.tiny import check_tokenizer_matches

    dtype = dtype or torch.float32
    classes = _wuerstchen_classes()
    missing = [s for s in ("decoder", "vqgan", "text_encoder", "tokenizer") if not (decoder_path / s).is_dir()]
    if missing:
        raise LorakitError(
            f"Wuerstchen decoder {decoder_path} lacks the subfolder(s) {', '.join(missing)}; "
            "pass a WuerstchenDecoderPipeline folder such as warp-ai/wuerstchen."
        )
    index = json.loads((decoder_path / "model_index.json").read_text())
    text_encoder = CLIPTextModel.from_pretrained(decoder_path, subfolder="text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(decoder_path, subfolder="tokenizer")
    check_tokenizer_matches(tokenizer, text_encoder, f"decoder {decoder_path}")
    return classes.WuerstchenDecoderPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        decoder=classes.WuerstchenDiffNeXt.from_pretrained(decoder_path, subfolder="decoder", torch_dtype=dtype),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder_path, subfolder="scheduler")
        if (decoder_path / "scheduler").is_dir()
        else DDPMWuerstchenScheduler(),
        vqgan=classes.PaellaVQModel.from_pretrained(decoder_path, subfolder="vqgan", torch_dtype=dtype),
        latent_dim_scale=float(index.get("latent_dim_scale", 10.67)),
    )


def _combine(prior, text_encoder, tokenizer, scheduler, decoder_pipe):
    classes = _wuerstchen_classes()
    combined = classes.WuerstchenCombinedPipeline(
        tokenizer=decoder_pipe.tokenizer,
        text_encoder=decoder_pipe.text_encoder,
        decoder=decoder_pipe.decoder,
        scheduler=decoder_pipe.scheduler,
        vqgan=decoder_pipe.vqgan,
        prior_tokenizer=tokenizer,
        prior_text_encoder=text_encoder,
        prior_prior=prior,
        prior_scheduler=scheduler,
    )
    # The combined pipeline rebuilds its decoder pipeline with default settings; keep the folder's.
    combined.decoder_pipe.register_to_config(latent_dim_scale=decoder_pipe.config.latent_dim_scale)
    combined.set_progress_bar_config(disable=True)
    return combined


@hookimpl
def build_pipeline(components, config):
    """Prior (LoRA included) -> decoder, for sample images during training."""
    from diffusers import DDPMWuerstchenScheduler

    decoder_pipe = components.get("decoder_pipeline")
    if decoder_pipe is None:
        decoder_pipe = _load_decoder_pipeline(find_decoder(components["model_path"]))
        decoder_pipe.to(components["prior"].device)
        components["decoder_pipeline"] = decoder_pipe
    return _combine(
        components["prior"],
        components["text_encoder"],
        components["tokenizer"],
        DDPMWuerstchenScheduler.from_config(components["noise_scheduler"].config),
        decoder_pipe,
    )


@hookimpl
def load_pipeline(model_path, device, dtype):
    """A ``WuerstchenCombinedPipeline``: the prior from ``model_path``, the decoder from :func:`find_decoder`."""
    path = Path(model_path)
    prior, text_encoder, tokenizer, scheduler = _load_prior_parts(path, dtype)
    decoder_pipe = _load_decoder_pipeline(find_decoder(path), dtype)
    return _combine(prior, text_encoder, tokenizer, scheduler, decoder_pipe).to(device)


def _prior_pipe(pipeline):
    return getattr(pipeline, "prior_pipe", pipeline)


@hookimpl
def load_lora(pipeline, path, adapter_name):
    from lorakit.pipelines import lora_file

    folder, weight_name = lora_file(path)
    _prior_pipe(pipeline).load_lora_weights(folder, weight_name=weight_name, adapter_name=adapter_name)


@hookimpl
def set_lora_scales(pipeline, adapter_names, scales):
    _prior_pipe(pipeline).set_adapters(list(adapter_names), adapter_weights=list(scales))


@hookimpl
def generate_images(pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
    # One prompt per call: diffusers' Wuerstchen decoder repeats a list of N prompts N times
    # (N*N text rows for N image embeddings) and fails. The decoder needs far fewer steps
    # than the prior (diffusers' default: 12). A list of generators holds one per prompt.
    images = []
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    for i, prompt in enumerate(prompts):
        images += pipeline(
            prompt,
            **size,
            prior_num_inference_steps=num_inference_steps,
            num_inference_steps=min(12, num_inference_steps),
            prior_guidance_scale=4.0 if guidance_scale is None else guidance_scale,
            generator=generator[i] if isinstance(generator, (list, tuple)) else generator,
        ).images
    return images


# ----------------------------------------------------------------------------- image encoder


def encoder_config(**overrides) -> dict:
    """The image encoder's ``config.json``; defaults are stage B's EfficientNetV2-S encoder.

    ``stages`` (a list of ``[block, expand, kernel, stride, in, out, layers]``) replaces the
    EfficientNetV2-S table for reduced test models; ``c_cond`` is the backbone's output width.
    """
    config = {"_class_name": "EfficientNetEncoder", **ENCODER_DEFAULTS}
    config.update(overrides)
    return config


def _stages_of(config: dict, where: str):
    stages = config.get("stages")
    if stages is None:
        if config.get("effnet", "efficientnet_v2_s") != "efficientnet_v2_s":
            raise LorakitError(
                f"{where}: effnet '{config.get('effnet')}' is not supported; Wuerstchen v2 uses efficientnet_v2_s."
            )
        return [tuple(s) for s in EFFICIENTNET_V2_S]
    try:
        parsed = [(str(k), int(e), int(kk), int(s), int(i), int(o), int(n)) for k, e, kk, s, i, o, n in stages]
    except (TypeError, ValueError):
        raise LorakitError(
            f"{where}: 'stages' must be lists of [block, expand, kernel, stride, in, out, layers]."
        ) from None
    if not parsed or any(k not in ("fused", "mbconv") for k, *_ in parsed):
        raise LorakitError(f"{where}: 'stages' needs at least one stage of block type 'fused' or 'mbconv'.")
    return parsed


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _build_encoder_classes():
    """Define the torch modules (called once, on first use, so importing this module stays torch-free)."""
    from torch import nn

    class ConvNormAct(nn.Sequential):
        """conv (no bias) -> BatchNorm -> optional SiLU; children ``0``, ``1`` (and ``2``) like torchvision's."""

        def __init__(self, cin, cout, kernel, stride=1, groups=1, act=True):
            layers = [
                nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout, eps=BACKBONE_BN_EPS),
            ]
            if act:
                layers.append(nn.SiLU(inplace=True))
            super().__init__(*layers)

    class SqueezeExcitation(nn.Module):
        """Channel gate: global average -> ``fc1`` (1x1) -> SiLU -> ``fc2`` (1x1) -> sigmoid, times the input."""

        def __init__(self, channels, squeeze):
            super().__init__()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Conv2d(channels, squeeze, 1)
            self.fc2 = nn.Conv2d(squeeze, channels, 1)
            self.activation = nn.SiLU(inplace=True)
            self.scale_activation = nn.Sigmoid()

        def forward(self, x):
            gate = self.fc2(self.activation(self.fc1(self.avgpool(x))))
            return self.scale_activation(gate) * x

    class ResidualBlock(nn.Module):
        """``block`` with a skip connection when shape allows (stochastic depth is a no-op when frozen)."""

        def __init__(self, layers, residual):
            super().__init__()
            self.block = nn.Sequential(*layers)
            self.residual = residual

        def forward(self, x):
            out = self.block(x)
            return out + x if self.residual else out

    def fused_mbconv(expand, kernel, stride, cin, cout):
        hidden = _make_divisible(cin * expand)
        if hidden == cin:  # no expansion: one full conv
            layers = [ConvNormAct(cin, cout, kernel, stride)]
        else:  # full conv expands, 1x1 projects
            layers = [ConvNormAct(cin, hidden, kernel, stride), ConvNormAct(hidden, cout, 1, act=False)]
        return ResidualBlock(layers, stride == 1 and cin == cout)

    def mbconv(expand, kernel, stride, cin, cout):
        hidden = _make_divisible(cin * expand)
        layers = []
        if hidden != cin:
            layers.append(ConvNormAct(cin, hidden, 1))
        layers += [
            ConvNormAct(hidden, hidden, kernel, stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, cin // 4)),
            ConvNormAct(hidden, cout, 1, act=False),
        ]
        return ResidualBlock(layers, stride == 1 and cin == cout)

    class EfficientNetEncoder(nn.Module):
        """Stage B's image encoder: EfficientNetV2 features (``backbone``) + 1x1 conv and BatchNorm (``mapper``).

        Parameter names follow torchvision's ``efficientnet_v2_s().features`` so the published
        ``effnet_state_dict`` loads as it is. Output: ``(B, c_latent, H/32, W/32)``.
        """

        def __init__(self, config: dict | None = None, where: str = "image encoder config"):
            super().__init__()
            config = encoder_config(**(config or {}))
            stages = _stages_of(config, where)
            self.config = config
            self.c_latent = int(config["c_latent"])
            c_cond = int(config["c_cond"])
            features = [ConvNormAct(3, stages[0][4], 3, stride=2)]
            for kind, expand, kernel, stride, cin, cout, layers in stages:
                make = fused_mbconv if kind == "fused" else mbconv
                # like torchvision: only a stage's first block changes stride and width
                blocks = [make(expand, kernel, stride, cin, cout)]
                blocks += [make(expand, kernel, 1, cout, cout) for _ in range(layers - 1)]
                features.append(nn.Sequential(*blocks))
            features.append(ConvNormAct(stages[-1][5], c_cond, 1))
            self.backbone = nn.Sequential(*features)
            self.mapper = nn.Sequential(nn.Conv2d(c_cond, self.c_latent, 1, bias=False), nn.BatchNorm2d(self.c_latent))
            self.reset_parameters()

        def reset_parameters(self):
            """torchvision's initialisation (random-weight encoders for tests and tiny models)."""
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            return self.mapper(self.backbone(x))

    return EfficientNetEncoder


_CLASSES: dict = {}


def __getattr__(name):
    # ``from lorakit_plugins.wuerstchen import EfficientNetEncoder`` builds the class (and imports torch) on demand.
    if name == "EfficientNetEncoder":
        if name not in _CLASSES:
            _CLASSES[name] = _build_encoder_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def find_image_encoder(model_path, override: str | None = None) -> Path:
    """Where the encoder lives: ``override`` (``--vae``: folder or hub id), else ``MODEL/image_encoder``."""
    if override:
        from lorakit.models import resolve_model

        root = resolve_model(override)
        folder = root / ENCODER_SUBFOLDER if (root / ENCODER_SUBFOLDER).is_dir() else root
        if not (folder / "config.json").is_file():
            raise LorakitError(
                f"--vae {override} is not a Wuerstchen image encoder folder (no config.json); pass a folder "
                "written by `python -m lorakit_plugins.wuerstchen convert-encoder`."
            )
        return folder
    folder = Path(model_path) / ENCODER_SUBFOLDER
    if not (folder / "config.json").is_file():
        raise LorakitError(
            f"--model {model_path} has no {ENCODER_SUBFOLDER}/ (stage B's EfficientNet image encoder); convert "
            "model_v2_stage_b.pt with `python -m lorakit_plugins.wuerstchen convert-encoder SRC DIR` and pass "
            f"--vae DIR (or write DIR to {folder})."
        )
    return folder


def load_image_encoder(folder):
    """Build the encoder from ``folder/config.json`` and load its safetensors weights (never a pickle)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LorakitError(f"image encoder {folder}: config.json is unreadable ({exc}); rewrite it.") from None
    weights = next((folder / n for n in ENCODER_WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f" (found {', '.join(pickles)}: lorakit never unpickles weights)" if pickles else ""
        raise LorakitError(
            f"image encoder {folder} has no {ENCODER_WEIGHT_NAMES[0]}{found}; convert it with "
            "`python -m lorakit_plugins.wuerstchen convert-encoder SRC DIR`."
        )
    encoder = __getattr__("EfficientNetEncoder")(config, where=f"image encoder {folder}")
    _load_encoder_state(encoder, load_file(str(weights)), str(weights))
    return encoder.eval().requires_grad_(False)


def _load_encoder_state(encoder, state: dict, where: str) -> None:
    expected = encoder.state_dict()
    # Checkpoints saved without BatchNorm's step counters still describe the same model.
    state = {k: v for k, v in state.items()}
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = (
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} with other shapes (e.g. {wrong[:2]})"
        )
        raise LorakitError(f"{where} does not fit the encoder its config describes: {detail}; check config.json.")
    encoder.load_state_dict(state, strict=True)


def save_image_encoder(encoder, folder) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (what :func:`load_image_encoder` reads)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / ENCODER_WEIGHT_NAMES[0]))
    (folder / "config.json").write_text(json.dumps(encoder.config, indent=2, sort_keys=True))
    return folder


def _torch_load_tensors_only(path: Path):
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorakitError(
            f"{path} holds Python objects besides tensors and lorakit never unpickles them ({first}); "
            "export its effnet_state_dict as safetensors instead."
        ) from None


def convert_encoder_checkpoint(src, dst, config: dict | None = None) -> Path:
    """Turn the published stage-B checkpoint (or a bare encoder state dict) into an encoder folder.

    ``src``: a ``.safetensors`` file, or a torch file read with ``torch.load(weights_only=True)``
    (e.g. ``model_v2_stage_b.pt`` from ``dome272/wuerstchen``, whose ``effnet_state_dict``
    is taken). ``dst``: the folder to write (``config.json`` + safetensors), for ``--vae DST``
    or ``MODEL/image_encoder``.
    """
    src = Path(src).expanduser()
    if not src.is_file():
        raise LorakitError(
            f"{src} does not exist; pass the stage-B checkpoint (model_v2_stage_b.pt) or a .safetensors file."
        )
    if src.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(src))
    else:
        state = _torch_load_tensors_only(src)
    if isinstance(state, dict) and "effnet_state_dict" in state:
        state = state["effnet_state_dict"]
    if not isinstance(state, dict) or not state:
        raise LorakitError(f"{src} holds no encoder state dict (expected 'effnet_state_dict' or backbone.* keys).")
    prefixes = ("module.", "_orig_mod.")
    state = {next((k[len(p):] for p in prefixes if k.startswith(p)), k): v for k, v in state.items()}
    encoder = __getattr__("EfficientNetEncoder")(config, where=f"{src}")
    _load_encoder_state(encoder, state, str(src))
    return save_image_encoder(encoder, dst)


# ----------------------------------------------------------------------------- tiny model

TINY_ENCODER = encoder_config(
    c_cond=64,
    stages=[
        ["fused", 1, 3, 1, 8, 8, 1],
        ["fused", 4, 3, 2, 8, 16, 1],
        ["fused", 4, 3, 2, 16, 16, 1],
        ["mbconv", 4, 3, 2, 16, 24, 1],
        ["mbconv", 6, 3, 1, 24, 32, 2],
        ["mbconv", 6, 3, 2, 32, 48, 1],
    ],
)


def _calibrate_batchnorm(encoder, pixels) -> None:
    """Give a random encoder's BatchNorms the statistics of some images, as training would.

    With torchvision's initialisation and untouched running statistics the features shrink
    ~100x per depthwise conv, so a random encoder maps every image to nearly the same
    embedding; calibrated, its embeddings vary from image to image like a trained one's.
    """
    import torch

    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    encoder.train()
    with torch.no_grad():
        encoder(effnet_pixels(pixels))
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    encoder.eval()


def _write_index(path: Path, class_name: str, components: dict, **extra) -> None:
    import diffusers

    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components, **extra}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


@hookimpl
def write_tiny_model(path, seed):
    import torch
    from diffusers import DDPMWuerstchenScheduler
    from transformers import CLIPTextModel

    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    classes = _wuerstchen_classes()
    path = Path(path)
    torch.manual_seed(seed)
    # Same block structure as the published prior, narrow and shallow; dropout kept as published.
    prior = classes.WuerstchenPrior(c_in=16, c=32, c_cond=32, c_r=8, depth=2, nhead=4, dropout=0.1).eval()
    text_encoder = CLIPTextModel(tiny_clip_text_config(hidden_size=32)).eval()
    prior.save_pretrained(path / "prior")
    text_encoder.save_pretrained(path / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(path / "tokenizer")
    DDPMWuerstchenScheduler().save_pretrained(path / "scheduler")
    encoder = __getattr__("EfficientNetEncoder")(TINY_ENCODER)
    _calibrate_batchnorm(encoder, torch.rand(16, 3, 64, 64) * 2 - 1)
    save_image_encoder(encoder, path / ENCODER_SUBFOLDER)
    # diffusers writes an empty model_index.json for Wuerstchen pipelines; write the real one.
    _write_index(
        path,
        "WuerstchenPriorPipeline",
        {
            "prior": ["diffusers", "WuerstchenPrior"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        },
        latent_mean=42.0,
        latent_std=1.0,
        resolution_multiple=42.67,
    )

    decoder_dir = path / DECODER_SUBFOLDER
    # One level with patch size 1 takes any latent size (int(h * 10.67) is rarely even).
    decoder = classes.WuerstchenDiffNeXt(
        c_in=4, c_out=4, c_r=8, patch_size=1, c_cond=32, c_hidden=[32], nhead=[4], blocks=[1],
        level_config=["CTA"], inject_effnet=[True], effnet_embd=16, clip_embd=32, dropout=0.0,
    ).eval()
    # diffusers zero-initialises the output conv, which would make images ignore the prior.
    torch.nn.init.normal_(decoder.clf[1].weight, std=0.02)
    vqgan = classes.PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=32)
    decoder.save_pretrained(decoder_dir / "decoder")
    vqgan.save_pretrained(decoder_dir / "vqgan")
    CLIPTextModel(tiny_clip_text_config(hidden_size=32)).save_pretrained(decoder_dir / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(decoder_dir / "tokenizer")
    DDPMWuerstchenScheduler().save_pretrained(decoder_dir / "scheduler")
    _write_index(
        decoder_dir,
        "WuerstchenDecoderPipeline",
        {
            "decoder": ["diffusers", "WuerstchenDiffNeXt"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "vqgan": ["diffusers", "PaellaVQModel"],
        },
        latent_dim_scale=10.67,
    )


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    """``python -m lorakit_plugins.wuerstchen convert-encoder SRC DST``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m lorakit_plugins.wuerstchen")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert-encoder", help="stage-B checkpoint -> image encoder folder (safetensors)")
    convert.add_argument("src", help="model_v2_stage_b.pt (read with weights_only=True) or a .safetensors file")
    convert.add_argument("dst", help="folder to write, e.g. MODEL/image_encoder")
    args = parser.parse_args(argv)
    try:
        out = convert_encoder_checkpoint(args.src, args.dst)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
