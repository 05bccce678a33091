"""Run by check_old_stack.sh, once in each stack.

``produce WORK`` (lorakit's stack): writes tiny SD1.5 and SDXL models in the layout their
published checkpoints have (CLIP weights under ``text_model.``, a tokenizer with vocab.json and
merges.txt: what transformers 4 reads; transformers 5 reads it identically, checked here),
trains a LoRA on each (rank 4, alpha 8, attention and non-attention UNet targets, every text
encoder), converts it to the diffusers-example format (``lorakit convert``: no header, scale in
the weights, for loaders that read no adapter metadata) and merges it with a second one
(``lorakit merge``), and saves fixed inputs with the expected outputs: the trained components'
(for the first two), and the two LoRAs' as adapters at the merge weights.

``check WORK`` (the old stack, lorakit not imported): loads each model with diffusers'
pipeline, checks the base reproduces lorakit's stack, loads the LoRA file with
``load_lora_weights`` and compares every output with the trained one (max abs diff < 1e-5).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TOLERANCE = 1e-5
ARCHS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
WEIGHTS = "pytorch_lora_weights.safetensors"


def versions() -> str:
    import diffusers
    import peft
    import torch
    import transformers

    return f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}"


def text_encoders(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text())
    return sorted(k for k, v in index.items() if k.startswith("text_encoder") and isinstance(v, list) and v[0])


def published_layout(tiny: Path, target: Path) -> Path:
    """A copy of ``tiny`` with CLIPTextModel weights under ``text_model.`` (as every published
    SD checkpoint has them) and vocab.json / merges.txt beside each tokenizer.json."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, target)
    for name in text_encoders(target):
        config = json.loads((target / name / "config.json").read_text())
        file = target / name / "model.safetensors"
        if config.get("architectures") == ["CLIPTextModel"]:
            state = load_file(str(file))
            save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, str(file),
                      metadata={"format": "pt"})
    for tok in sorted(target.glob("tokenizer*/tokenizer.json")):
        model = json.loads(tok.read_text())["model"]
        (tok.parent / "vocab.json").write_text(json.dumps(model["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        (tok.parent / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    return target


def fixed_inputs(unet_config: dict, encoders: dict) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    size = 8
    inputs = {
        "sample": torch.randn(2, unet_config["in_channels"], size, size, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, unet_config["cross_attention_dim"], generator=g),
        "input_ids": torch.randint(0, 512, (2, 77), generator=g),
    }
    if unet_config.get("addition_embed_type") == "text_time":
        time_dim = 6 * unet_config["addition_time_embed_dim"]
        text_dim = unet_config["projection_class_embeddings_input_dim"] - time_dim
        inputs["text_embeds"] = torch.randn(2, text_dim, generator=g)
        inputs["time_ids"] = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    return inputs


def outputs_of(components: dict, inputs: dict) -> dict:
    """The UNet's noise prediction and each text encoder's last and penultimate hidden states."""
    import torch

    extra = {}
    if "text_embeds" in inputs:
        extra["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    out = {}
    with torch.no_grad():
        unet = components["unet"].eval()
        out["unet"] = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], **extra).sample
        for name, module in components.items():
            if name.startswith("text_encoder"):
                result = module.eval()(inputs["input_ids"], output_hidden_states=True)
                out[f"{name}.last"] = result[0]
                out[f"{name}.penultimate"] = result.hidden_states[-2]
    return {k: v.contiguous() for k, v in out.items()}


def _lora_layers(comps: dict) -> dict:
    return {k: sum(1 for _, m in v.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)) for k, v in comps.items()}


def produce(work: Path) -> None:
    """Per arch: a trained LoRA (expected: the trained components' outputs) and a merge of it
    with a second one (``lorakit merge``; expected: both loaded as adapters at the weights)."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    from lorakit.convert import convert
    from lorakit.merge import merge
    from lorakit.testing import example_data, tiny_config
    from lorakit.tiny import make_tiny_model
    from lorakit.training import Trainer

    print(f"lorakit's stack: {versions()}")
    torch.set_num_threads(1)
    for arch, pipeline in ARCHS.items():
        tiny = make_tiny_model(arch, work / f"{arch}-tiny")
        model = published_layout(tiny, work / f"{arch}-model")
        cls = getattr(diffusers, pipeline)
        a, b = cls.from_pretrained(tiny), cls.from_pretrained(model)
        for name in text_encoders(model):  # transformers 5 reads the published layout identically
            sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        config = tiny_config(arch, model, example_data(), work / f"{arch}-lora", rank=4, alpha=8, max_steps=3,
                             target_modules=TARGETS, train_text_encoder=True)
        trainer = Trainer(config).setup()
        result = trainer.run()
        names = ["unet", *text_encoders(model)]
        comps = {k: trainer.components[k] for k in names}
        inputs = fixed_inputs(dict(b.unet.config), comps)
        save_file(inputs, str(work / f"{arch}-inputs.safetensors"))
        save_file(outputs_of({k: getattr(b, k) for k in names}, inputs), str(work / f"{arch}-base.safetensors"))
        files = {"trained": {"weights": str(result.weights), "layers": _lora_layers(comps)}}
        save_file(outputs_of(comps, inputs), str(work / f"{arch}-trained.safetensors"))
        # the same LoRA as diffusers' examples write it (no header, scale folded in): for loaders
        # that read no adapter metadata (diffusers < 0.34), which take alpha = rank
        example = convert(arch, result.weights, work / f"{arch}-example.safetensors", "diffusers-example", model=str(model))
        files["diffusers-example"] = {"weights": str(example), "layers": _lora_layers(comps)}

        second = Trainer(tiny_config(arch, model, example_data(), work / f"{arch}-lora2", rank=2, alpha=1, max_steps=3,
                                     seed=1, learning_rate=1e-2, target_modules=["to_q", "to_v"])).setup().run()
        merged = merge(arch, [result.weights, second.weights], work / f"{arch}-merged.safetensors", [0.7, 0.6])
        both = cls.from_pretrained(model)
        for i, f in enumerate((result.weights, second.weights)):
            both.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"l{i}")
        both.set_adapters(["l0", "l1"], adapter_weights=[0.7, 0.6])
        both_comps = {k: getattr(both, k) for k in names}
        save_file(outputs_of(both_comps, inputs), str(work / f"{arch}-merged-want.safetensors"))
        files["merged"] = {"weights": str(merged.path), "layers": _lora_layers(both_comps)}
        (work / f"{arch}.json").write_text(json.dumps(files))
        for what, facts in files.items():
            print(f"{arch}: {what} {Path(facts['weights']).name} "
                  f"({', '.join(f'{k} {n} LoRA layers' for k, n in facts['layers'].items())})")


def check(work: Path) -> int:
    import diffusers
    from safetensors.torch import load_file

    print(f"old stack: {versions()}")
    failed = 0
    for arch, pipeline in ARCHS.items():
        inputs = load_file(str(work / f"{arch}-inputs.safetensors"))
        want_base = load_file(str(work / f"{arch}-base.safetensors"))
        for what, facts in json.loads((work / f"{arch}.json").read_text()).items():
            want = load_file(str(work / f"{arch}-{'merged-want' if what == 'merged' else 'trained'}.safetensors"))
            pipe = getattr(diffusers, pipeline).from_pretrained(str(work / f"{arch}-model"))
            comps = {k: getattr(pipe, k) for k in facts["layers"]}
            base = outputs_of(comps, inputs)
            weights = Path(facts["weights"])
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
            got = outputs_of(comps, inputs)
            for name, expected in facts["layers"].items():
                loaded = _lora_layers({name: comps[name]})[name]
                ok = loaded == expected
                failed += not ok
                print(f"{arch} {what} {name}: {loaded} of {expected} LoRA layers loaded {'ok' if ok else 'FAIL'}")
            for key in want:
                base_diff = (base[key] - want_base[key]).abs().max().item()
                diff = (got[key] - want[key]).abs().max().item()
                effect = (want[key] - want_base[key]).abs().max().item()
                ok = diff < TOLERANCE and base_diff < TOLERANCE and effect > 100 * TOLERANCE
                failed += not ok
                print(f"{arch} {what} {key}: max |old stack - lorakit's| = {diff:.2e} (base model {base_diff:.2e}, "
                      f"LoRA effect {effect:.2e}) {'ok' if ok else 'FAIL'}")
    print("all outputs reproduced" if not failed else f"{failed} checks FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    what, folder = sys.argv[1], Path(sys.argv[2])
    if what == "produce":
        produce(folder)
    else:
        sys.exit(check(folder))
