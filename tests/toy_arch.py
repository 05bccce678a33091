"""A toy arch for the core's own tests: pure torch, no diffusers pipeline, no built-in plugin.

Components: a tiny conv/linear ``denoiser`` (flow-matching velocity on 4-channel latents),
a fixed-projection ``image_encoder`` (8x8 patches -> 4 channels) and a ``text_encoder``
(byte embedding, mean over the caption, linear). It implements the hooks on
:class:`lorakit.Arch` directly, saves LoRA as PEFT keys in safetensors (config in the
header) and has its own ``load_pipeline`` / ``load_lora`` pair, so the contract suite's
reload check runs on it. Register it with ``lorakit.plugins.register("toy", ToyArch)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lorakit import Arch, ArchInfo, hookimpl

TEXT_LENGTH = 16
WIDTH = 16
LATENT_CHANNELS = 4


class ToyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(LATENT_CHANNELS, WIDTH, 3, padding=1)
        self.time = nn.Linear(1, WIDTH)
        self.cond = nn.Linear(WIDTH, WIDTH)
        self.mid = nn.Linear(WIDTH, WIDTH)  # per pixel, channels last
        self.conv_out = nn.Conv2d(WIDTH, LATENT_CHANNELS, 3, padding=1)

    def forward(self, latents, t, text):
        h = self.conv_in(latents) + (self.time(t[:, None]) + self.cond(text))[:, :, None, None]
        h = self.mid(nn.functional.silu(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(nn.functional.silu(h))


class ToyTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, ids):
        return self.proj(self.embed(ids).mean(dim=1))


class ToyImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, LATENT_CHANNELS, 8, stride=8)

    def forward(self, pixels):
        return self.patch(pixels)


MODULES = {"denoiser": ToyDenoiser, "text_encoder": ToyTextEncoder, "image_encoder": ToyImageEncoder}


def token_ids(captions, device) -> torch.Tensor:
    rows = [list(c.encode()[:TEXT_LENGTH]) for c in captions]
    return torch.tensor([r + [0] * (TEXT_LENGTH - len(r)) for r in rows], device=device)


def load_modules(path: Path, device, dtype) -> dict:
    from safetensors.torch import load_file

    modules = {}
    for name, cls in MODULES.items():
        module = cls()
        module.load_state_dict(load_file(str(Path(path) / name / "model.safetensors")))
        modules[name] = module.to(device, dtype).eval().requires_grad_(False)
    return modules


class ToyPipeline:
    """What ``load_pipeline`` returns: the modules as attributes and in ``components``."""

    def __init__(self, modules: dict):
        self.components = dict(modules)
        for name, module in modules.items():
            setattr(self, name, module)


class ToyArch(Arch):
    info = ArchInfo(
        description="toy arch for lorakit's own tests (pure torch)",
        denoiser="denoiser",
        default_targets={"denoiser": ["conv_in", "cond", "mid", "conv_out"], "text_encoder": ["proj"]},
        text_encoders=("text_encoder",),
        default_resolution=32,
        pipeline_classes=("ToyPipeline",),
        pipeline_loads_lora=False,
        subfolders=tuple(MODULES),
        objective="custom",
        prompt_encoders=("text_encoder",),
        input_encoders=("image_encoder",),
    )

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        self.check_layout(Path(model_path))
        return {**load_modules(Path(model_path), device, weight_dtype), "model_path": Path(model_path)}

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        return {"latents": components["image_encoder"](pixel_values)}

    @hookimpl
    def encode_text(self, components, captions, encoder):
        text_encoder = components[encoder]
        return {"text_embeds": text_encoder(token_ids(captions, text_encoder.embed.weight.device))}

    @hookimpl
    def encode_prompt(self, components, captions):
        return self.encode_text(components, captions, "text_encoder")

    @hookimpl
    def compute_loss(self, components, batch, config, generator):
        latents = batch["latents"].float()
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.rand(latents.shape[0], generator=generator).to(latents.device)
        noisy = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
        prediction = components["denoiser"](noisy, t, batch["text_embeds"])
        return ((prediction.float() - (noise - latents)) ** 2).mean(dim=(1, 2, 3))

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        from safetensors.torch import save_file

        state = {f"{name}.{key}": value for name, (layers, _) in lora_layers.items() for key, value in layers.items()}
        configs = {name: meta for name, (_, meta) in lora_layers.items()}
        save_file(state, str(Path(output_dir) / weight_name), metadata={"lora_configs": json.dumps(configs)})

    @hookimpl
    def load_pipeline(self, model_path, device, dtype):
        return ToyPipeline(load_modules(Path(model_path), device, dtype))

    @hookimpl
    def load_lora(self, pipeline, path, adapter_name):
        import dataclasses

        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors import safe_open

        from lorakit.pipelines import resolve_lora_file

        file = resolve_lora_file(path)
        with safe_open(str(file), framework="pt") as handle:
            configs = json.loads(handle.metadata()["lora_configs"])
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        for name, meta in configs.items():
            module = pipeline.components[name]
            config = LoraConfig(**{k: v for k, v in meta.items() if k in fields})
            inject_adapter_in_model(config, module, adapter_name=adapter_name)
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            set_peft_model_state_dict(module, own, adapter_name=adapter_name)

    @hookimpl
    def write_tiny_model(self, path, seed):
        from safetensors.torch import save_file

        torch.manual_seed(seed)
        for name, cls in MODULES.items():
            (Path(path) / name).mkdir(parents=True)
            save_file(cls().state_dict(), str(Path(path) / name / "model.safetensors"))
        (Path(path) / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
