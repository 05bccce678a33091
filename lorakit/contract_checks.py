"""The contract checks, one function per property: ``check_<name>(contract)``.

Each takes an :class:`lorakit.contract.ArchContract` (the arch's plugin manager and data,
its shared tiny model and training run), returns figures, fails through
``contract.fail(hooks, message)`` naming the hook responsible, and reports a capability the
arch lacks through ``contract.not_offered(why)``. :data:`CHECKS` lists them in order; run
them through the contract (``contract.check(name)``), which also names :data:`HOOKS` when
a check fails with an exception of its own. Nothing here imports torch at module level.
"""

from __future__ import annotations

from lorakit.contract_outputs import SEED, compare_outputs, instance_inside, lora_layer_names, probing
from lorakit.contract_outputs import with_trained_text
from lorakit.errors import LorakitError
from lorakit.rng import Rows


def check_targets(c) -> dict:
    """Every chosen LoRA target (``target_modules`` hook, else ``ArchInfo.default_targets``)
    names layers of its component; LoRA parameters are the only trainable ones."""
    import torch

    from lorakit.archbase import default_target_modules

    config, components = c.fresh
    targets = c.pm.hook.target_modules(config=config, components=components) or default_target_modules(c.info, config)
    for name, wanted in targets.items():
        module = components.get(name)
        if not isinstance(module, torch.nn.Module):
            c.fail("target_modules", f"component '{name}' is not a module that load_components returned")
        layers = [n for n, _ in module.named_modules() if n]
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in layers)]
        if missing:
            c.fail("target_modules", f"target(s) {', '.join(missing)} of component '{name}' match no layer "
                                     f"of its {type(module).__name__}")
    trainer = c.trainer
    layers = {name: len(lora_layer_names(trainer.components.get(name))) for name in targets}
    if not all(layers.values()):
        c.fail("target_modules", f"the run put no LoRA layer into {[n for n, k in layers.items() if not k]}")
    trainable = [(name, p_name, p) for name, m in trainer.components.items() if isinstance(m, torch.nn.Module)
                 for p_name, p in m.named_parameters() if p.requires_grad]
    not_lora = [f"{name}.{p_name}" for name, p_name, _ in trainable if "lora_" not in p_name]
    if not_lora:
        c.fail(("load_components", "target_modules"),
               f"{len(not_lora)} non-LoRA parameters are trainable, e.g. {', '.join(not_lora[:3])}")
    if len(trainable) != len(trainer.params):
        c.fail("target_modules", f"{len(trainable)} trainable LoRA tensors but {len(trainer.params)} optimized")
    return {"layers": layers, "trainable_tensors": len(trainable),
            "trainable_params": sum(p.numel() for _, _, p in trainable)}


def check_loss(c) -> dict:
    """``compute_loss`` returns a finite float tensor of shape (B,) for a loop-built batch of B=2."""
    import torch

    trainer = c.trainer
    with probing(trainer.components, trainer.lora_configs):
        with c.calling("encode_text" if c.offers("encode_text") else "encode_prompt"):
            batch = with_trained_text(c.pm, c.info, trainer.lora_configs, trainer.components,
                                      trainer.make_batch(0, [0, 1]))
        generator = torch.Generator().manual_seed(SEED)
        loss = c.pm.hook.compute_loss(components=trainer.components, batch=batch, config=trainer.config,
                                      generator=generator, rows=Rows.from_generator(generator, len(batch["captions"])))
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or tuple(loss.shape) != (2,):
        got = f"shape {tuple(loss.shape)} of {loss.dtype}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        c.fail("compute_loss", f"returned {got} for a batch of 2, expected a float tensor of shape (2,): "
                               "one loss per sample")
    if not bool(torch.isfinite(loss).all()):
        c.fail("compute_loss", f"returned non-finite losses {loss.tolist()}")
    return {"batch": 2, "loss": [round(float(v), 6) for v in loss]}


def check_batch_first(c) -> dict:
    """Every tensor from ``encode_images``, ``encode_prompt`` and (per ``ArchInfo.prompt_encoders``,
    where implemented) ``encode_text`` has one row per input, B=3."""
    import torch

    rows, size, (_, components) = 3, c.size, c.fresh
    pixels = torch.rand(rows, 3, size, size, generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    meta = {k: torch.tensor([v] * rows) for k, v in
            (("original_size", [size, size]), ("crop_top_left", [0, 0]), ("target_size", [size, size]))}
    captions = ["a red circle", "a plain blue image", ""]
    calls = {"encode_images": lambda: c.pm.hook.encode_images(components=components, pixel_values=pixels, batch=meta),
             "encode_prompt": lambda: c.pm.hook.encode_prompt(components=components, captions=captions)}
    for encoder in c.info.prompt_encoders if c.offers("encode_text") else ():
        calls[f"encode_text({encoder})"] = lambda e=encoder: c.pm.hook.encode_text(
            components=components, captions=captions, encoder=e)
    figures = {}
    for call, run in calls.items():
        hook = call.split("(")[0]
        with c.calling(hook), torch.no_grad():
            out = run()
        if not isinstance(out, dict):
            c.fail(hook, f"{call} returned {type(out).__name__}, expected a dict of tensors")
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
                c.fail(hook, f"{call} returned {key!r} of shape {tuple(value.shape)} for {rows} inputs, "
                             f"expected batch first ({rows}, ...)")
        figures[call] = {k: list(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
    return figures


def check_reload(c) -> dict:
    """The arch's own ``load_pipeline`` + ``load_lora`` reproduce the trained denoiser's outputs."""
    import torch

    lacking = [h for h in ("load_pipeline", "load_lora") if not c.offers(h)]
    if lacking:
        c.not_offered(f"no {' / '.join(lacking)} hook: a trained LoRA cannot be loaded for inference")
    result, trainer = c.trained, c.trainer
    pipeline = c.pm.hook.load_pipeline(model_path=c.model, device=trainer.device, dtype=torch.float32)
    c.pm.hook.load_lora(pipeline=pipeline, path=result.weights, adapter_name="default")
    return compare_outputs(c.pm, c.info, trainer, pipeline, c.fail, HOOKS["reload"], c.atol)


def check_diffusers_reload(c) -> dict:
    """diffusers' ``Pipeline.from_pretrained(model).load_lora_weights(file)`` reproduces them too
    (where ``ArchInfo.pipeline_loads_lora``)."""
    import diffusers
    import torch

    from lorakit.pipelines import lora_file

    name = c.info.pipeline_class
    if not name:
        c.not_offered("ArchInfo.pipeline_class is empty: no diffusers pipeline to load the LoRA into")
    if not c.info.pipeline_loads_lora:
        c.not_offered(f"ArchInfo.pipeline_loads_lora is False ({name} has no load_lora_weights); "
                      "the reload check covers the arch's own load_lora")
    cls = getattr(diffusers, name, None)
    if not hasattr(cls, "load_lora_weights"):
        c.fail("arch_info", f"pipeline_loads_lora is True but diffusers has no {name}.load_lora_weights; "
                            "set pipeline_loads_lora=False or fix pipeline_class")
    result, trainer, how = c.trained, c.trainer, f"{name}.from_pretrained"
    try:
        pipeline = cls.from_pretrained(c.model, dtype=torch.float32).to(trainer.device)
    except Exception as exc:  # e.g. a deprecated model class that model_index.json cannot name
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        pipeline = None
        if c.offers("load_pipeline"):
            loaded = c.pm.hook.load_pipeline(model_path=c.model, device=trainer.device, dtype=torch.float32)
            pipeline = instance_inside(loaded, cls)
        if pipeline is None:
            c.fail(("write_tiny_model", "arch_info"), f"{how}(model) failed: {reason}")
        how = f"the {name} inside load_pipeline's pipeline ({how} failed: {reason})"
    folder, weight_name = lora_file(result.weights)
    pipeline.load_lora_weights(folder, weight_name=weight_name, adapter_name="default")
    return {"pipeline": how, **compare_outputs(c.pm, c.info, trainer, pipeline, c.fail, ("save_lora",), c.atol)}


def check_resume(c) -> dict:
    """Half the steps + ``--resume latest`` + the rest equals the straight run, bit for bit."""
    import torch
    from safetensors.torch import load_file

    result, steps = c.trained, int(c.settings["max_steps"])
    half, out = steps // 2, c.workdir / "resumed"
    c.train(out, max_steps=half, checkpoint_every=half)
    _, resumed = c.train(out, checkpoint_every=half, resume="latest")
    a, b = load_file(str(result.weights)), load_file(str(resumed.weights))
    hooks = ("compute_loss", "encode_images", "encode_prompt")
    if a.keys() != b.keys():
        c.fail(hooks, f"the resumed run saved other tensors: {sorted(set(a) ^ set(b))[:3]}")
    for key in a:
        if not torch.equal(a[key], b[key]):
            diff = float((a[key].float() - b[key].float()).abs().max())
            c.fail(hooks, f"{half} steps + resume + {steps - half} differ from {steps} straight steps at {key} "
                          f"(max diff {diff:.3g}): draw every random number from compute_loss's rows, and "
                          "keep encoders pure")
    return {"tensors": len(a), "steps": f"{half}+{steps - half} == {steps}"}


def check_generate(c) -> dict:
    """``lorakit.inference.generate`` with the trained LoRA gives PIL images of the asked size
    (2 steps); an arch that refuses with a LorakitError does not offer generation."""
    from PIL import Image

    from lorakit.inference import generate

    lacking = [h for h in ("load_pipeline", "generate_images") if not c.offers(h)]
    if lacking:
        c.not_offered(f"no {' / '.join(lacking)} hook: the arch cannot generate images")
    result, size, prompts = c.trained, c.size, ["a red circle", "a plain blue image"]
    try:
        images = generate(c.arch, str(c.model), prompts, loras=[(result.weights, 1.0)], steps=2,
                          resolution=size, seed=0, device=str(c.trainer.device))
    except LorakitError as exc:  # the arch says why (and what to do instead): a capability it lacks
        c.not_offered(f"generate_images / load_pipeline refused: {exc}")
    sizes = [img.size if isinstance(img, Image.Image) else type(img).__name__ for img in images or []]
    if sizes != [(size, size)] * len(prompts):
        c.fail("generate_images", f"{len(prompts)} prompts at {size}px gave {sizes}, "
                                  f"expected {len(prompts)} PIL images of {size}x{size}")
    return {"images": len(images), "size": list(sizes[0])}


def check_samples(c) -> dict:
    """A run with ``validation_prompt`` and ``validation_every`` writes a sample image."""
    from PIL import Image

    lacking = [h for h in ("build_pipeline", "generate_images") if not c.offers(h)]
    if lacking:
        c.not_offered(f"no {' / '.join(lacking)} hook: no sample images during training")
    out = c.workdir / "samples-run"
    trainer, _ = c.train(out, max_steps=1, validation_prompt="a red circle", validation_every=1)
    samples = sorted((out / "samples").glob("*.png"))
    if not samples:
        if c.pm.hook.build_pipeline(components=trainer.components, config=trainer.config) is None:
            c.not_offered("build_pipeline returned no pipeline for this model: no sample images")
        c.fail(("build_pipeline", "generate_images"), f"a run with validation_prompt wrote no image in {out}")
    with Image.open(samples[0]) as image:
        return {"files": [p.name for p in samples], "size": list(image.size)}


def check_modes(c) -> dict:
    """Each installed mode with a recipe (``lorakit.contract.register_mode_recipe``) trains
    with this arch."""
    from lorakit.plugins import mode_entries

    installed = list(mode_entries())
    chosen = {m: r for m, r in c.recipes.items() if m in installed}
    if not chosen:
        c.not_offered(f"no mode recipe for the installed modes ({', '.join(installed) or 'none'}); "
                      "see lorakit.contract.register_mode_recipe")
    figures = {m: "no recipe" for m in installed if m not in chosen}
    for mode, recipe in chosen.items():
        with c.calling(f"mode {mode}", *HOOKS["modes"]):
            figures[mode] = recipe(c, c.workdir / f"mode-{mode}")
    return figures


#: Every check by name, in the order ``ArchContract.run_all`` runs them.
CHECKS = {
    "targets": check_targets, "loss": check_loss, "batch_first": check_batch_first, "reload": check_reload,
    "diffusers_reload": check_diffusers_reload, "resume": check_resume, "generate": check_generate,
    "samples": check_samples, "modes": check_modes,
}
#: The hooks a check names when it fails with an exception of its own.
HOOKS = {
    "targets": ("load_components", "target_modules"), "loss": ("compute_loss",),
    "batch_first": ("encode_images", "encode_prompt", "encode_text"),
    "reload": ("save_lora", "load_pipeline", "load_lora"), "diffusers_reload": ("save_lora",),
    "resume": ("compute_loss",), "generate": ("load_pipeline", "load_lora", "set_lora_scales", "generate_images"),
    "samples": ("build_pipeline", "generate_images"), "modes": ("compute_loss",),
}
