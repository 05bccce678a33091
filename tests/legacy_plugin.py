"""A third-party arch plugin written against the round-1 contract (module-level hooks, the old
docs/plugins.md example, verbatim): it must keep working unchanged (DESIGN rule 8)."""

from pathlib import Path

from lorakit.arch import ArchInfo
from lorakit.errors import LorakitError
from lorakit.hookspecs import hookimpl

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@hookimpl
def arch_info():
    return ArchInfo(description="pixel-space UNet with a CLIP text encoder (example)",
                    denoiser="unet", default_targets={"unet": TARGETS}, default_resolution=32)


@hookimpl
def recognizes_model(model_index):
    return model_index.get("_class_name") == "PixelDiffusion"


@hookimpl
def load_components(model_path, config, device, weight_dtype):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(model_path)
    if not (path / "unet").is_dir():
        raise LorakitError(f"--model {path} has no unet/ folder; pass a PixelDiffusion model.")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(device, weight_dtype).eval()
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device, weight_dtype).eval()
    return {
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "noise_scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    }


@hookimpl
def target_modules(config, components):
    return {"unet": list(config.target_modules or TARGETS)}


@hookimpl
def encode_images(components, pixel_values, batch):
    return {"pixels": pixel_values}


@hookimpl
def encode_prompt(components, captions):
    tok, te = components["tokenizer"], components["text_encoder"]
    ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids.to(te.device)
    return {"text": te(ids)[0]}


@hookimpl
def compute_loss(components, batch, config, generator):
    from lorakit.diffusion import denoising_loss

    unet = components["unet"]
    text = batch["text"].to(unet.dtype)
    predict = lambda noisy, t: unet(noisy.to(unet.dtype), t, text).sample
    return denoising_loss(predict, batch["pixels"].float(), components["noise_scheduler"], config, generator)


@hookimpl
def save_lora(components, lora_layers, output_dir, weight_name):
    import json
    from safetensors.torch import save_file

    state, meta = lora_layers["unet"]
    save_file({f"unet.{k}": v for k, v in state.items()}, str(Path(output_dir) / weight_name),
              metadata={"lora_adapter_metadata": json.dumps({"unet": meta})})


@hookimpl
def write_tiny_model(path, seed):
    import json
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
    from lorakit.tiny import tiny_clip_text_config, tiny_clip_tokenizer

    torch.manual_seed(seed)
    path = Path(path)
    UNet2DConditionModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(path / "unet")
    CLIPTextModel(tiny_clip_text_config()).save_pretrained(path / "text_encoder")
    tiny_clip_tokenizer().save_pretrained(path / "tokenizer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "PixelDiffusion"}))
