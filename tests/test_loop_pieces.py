"""The loop's pieces (batches, cache, step, state) on a toy arch defined here: a 1x1-conv
"denoiser", an average-pooling image encoder and two tiny text encoders. No diffusers model."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lorakit import plugins
from lorakit.arch import ArchInfo
from lorakit.buckets import make_buckets
from lorakit.errors import LorakitError, PluginError
from lorakit.hookspecs import hookimpl
from lorakit.testing import example_data, tiny_config
from lorakit.training import Trainer

CALLS: Counter = Counter()  # captions (or images) each encoder saw, over one test
DIM = 6


class TextEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, DIM)
        self.proj = torch.nn.Linear(DIM, DIM)

    def forward(self, ids):
        return self.proj(self.embed(ids))


class Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.proj = torch.nn.Linear(DIM, 3)

    def forward(self, latents, cond):
        return self.conv(latents) + self.proj(cond)[:, :, None, None]


class ImageEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, 8) * self.scale


def _ids(captions):
    rows = [list(c.encode()[:8]) + [0] * (8 - len(c.encode()[:8])) for c in captions]
    return torch.tensor(rows, dtype=torch.long)


class ToyArch:
    info = ArchInfo(
        description="toy arch for the loop's own tests",
        denoiser="net",
        default_targets={"net": ["proj"], "te_a": ["proj"]},
        text_encoders=("te_a",),
        prompt_encoders=("te_a", "te_b"),
        input_encoders=("img",),
        default_resolution=32,
    )

    @hookimpl
    def arch_info(self):
        return self.info

    @hookimpl
    def recognizes_model(self, model_index):
        return True

    @hookimpl
    def load_components(self, model_path, config, device, weight_dtype):
        torch.manual_seed(0)
        parts = {"net": Denoiser(), "img": ImageEncoder(), "te_a": TextEncoder(), "te_b": TextEncoder()}
        return {k: v.to(device).eval() for k, v in parts.items()}

    @hookimpl
    def target_modules(self, config, components):
        return {"net": ["proj"], **({"te_a": ["proj"]} if config.train_text_encoder else {})}

    @hookimpl
    def encode_images(self, components, pixel_values, batch):
        CALLS["img"] += len(pixel_values)
        return {"latents": components["img"](pixel_values)}

    @hookimpl
    def encode_text(self, components, captions, encoder):
        CALLS[encoder] += len(captions)
        return {f"{encoder}_emb": components[encoder](_ids(captions))}

    @hookimpl
    def encode_prompt(self, components, captions):
        return {**self.encode_text(components, captions, "te_a"), **self.encode_text(components, captions, "te_b")}

    @hookimpl
    def compute_loss(self, components, batch, config, generator):
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        cond = batch["te_a_emb"].mean(1) + batch["te_b_emb"].mean(1)
        pred = components["net"](latents + noise, cond)
        return ((pred - noise) ** 2).flatten(1).mean(1)

    @hookimpl
    def save_lora(self, components, lora_layers, output_dir, weight_name):
        tensors = {f"{n}.{k}": v.contiguous() for n, (state, _) in lora_layers.items() for k, v in state.items()}
        save_file(tensors, str(output_dir / weight_name))


def variant(name, **changes):
    """Register a subclass of the toy arch under ``name`` (``info=`` changes ArchInfo fields)."""
    info = changes.pop("info", {})
    cls = type(name, (ToyArch,), {"info": ArchInfo(**{**ToyArch.info.__dict__, **info}), **changes})
    plugins.register(name, cls)
    return name


@pytest.fixture(autouse=True)
def toy_plugins():
    CALLS.clear()
    plugins.register("toy", ToyArch)
    yield
    for name in list(plugins._extra[plugins.ARCH_GROUP]):
        if name.startswith("toy"):
            plugins.unregister(name)


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "toy-model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyPipeline"}))
    return folder


def toy(model, out, arch="toy", data=None, **overrides):
    return Trainer(tiny_config(arch, model, data or example_data(), out, batch_size=2, **overrides)).setup()


def distinct_captions():
    return len({json.loads(line)["text"] for line in (example_data() / "metadata.jsonl").read_text().splitlines()})


def test_a_frozen_encoder_runs_once_per_caption_while_the_other_trains(model, tmp_path):
    trainer = toy(model, tmp_path / "o", train_text_encoder=True, max_steps=10)  # 10 x 2 > 12 images: 2 epochs
    assert sorted(trainer.lora_configs) == ["net", "te_a"]
    assert CALLS["te_b"] == distinct_captions() and CALLS["te_a"] == 0
    result = trainer.run()
    assert CALLS["te_b"] == distinct_captions()  # never again during training
    assert CALLS["te_a"] == 10 * 2  # every step, with gradients
    assert all(math.isfinite(x) for x in result.losses)
    assert any(k.startswith("te_a.") for k in load_file(str(result.weights)))


def test_a_size_multiple_is_kept_by_resolution_and_buckets(model, tmp_path):
    arch = variant("toy16", info={"size_multiple": 16})
    with pytest.raises(LorakitError, match=r"^(?=.*\b40\b)(?=.*\b16\b)--resolution[^\n]*$"):
        toy(model, tmp_path / "a", arch=arch, resolution=40)
    native40 = variant("toy16-native40", info={"size_multiple": 16, "default_resolution": 40})
    with pytest.raises(LorakitError, match=r"^--resolution 40 is not a multiple of 16 [^\n]*use 32 or 48\.$"):
        toy(model, tmp_path / "a", arch=native40, resolution=None)  # the default, once resolved
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in make_buckets(64, 16))
    assert make_buckets(64, 8) == make_buckets(64)  # the default multiple changes nothing
    assert any(w % 16 for w, h in make_buckets(64, 8))
    data = tmp_path / "mixed"
    data.mkdir()
    rows = []
    for i, size in enumerate([(96, 64), (64, 96), (64, 64), (100, 40), (40, 100)]):
        Image.new("RGB", size, (40 * i, 90, 200)).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (data / "metadata.jsonl").write_text("\n".join(rows))
    trainer = toy(model, tmp_path / "b", arch=arch, data=data, resolution=64, buckets=True, max_steps=2)
    sides = {s for e in trainer.dataset.examples for s in trainer.size_of(e[0])}
    assert len(sides) > 1 and all(s % 16 == 0 for s in sides), sides
    for indices in trainer.epoch_batches(0):
        assert all(s % 16 == 0 for row in trainer.make_batch(0, indices)["target_size"].tolist() for s in row)
    trainer.run()


@pytest.mark.parametrize("shape", [(), (2, 1)])
def test_compute_loss_of_the_wrong_shape_names_the_hook(model, tmp_path, shape):
    def compute_loss(self, components, batch, config, generator):
        loss = ToyArch.compute_loss(self, components, batch, config, generator)
        return loss.mean() if shape == () else loss[:, None]

    arch = variant("toy-loss", compute_loss=hookimpl(compute_loss))
    trainer = toy(model, tmp_path / "o", arch=arch)
    with pytest.raises(PluginError) as err:
        trainer.run()
    assert str(err.value) == f"arch plugin 'toy-loss': compute_loss returned shape {shape}, expected (B,) = (2,)"


def test_encode_prompt_not_batch_first_names_the_hook(model, tmp_path):
    def encode_prompt(self, components, captions):
        return {"te_a_emb": components["te_a"](_ids(captions)).transpose(0, 1), "te_b_emb": components["te_b"](_ids(captions))}

    arch = variant("toy-prompt", encode_prompt=hookimpl(encode_prompt), encode_text=None)  # all-or-nothing path
    with pytest.raises(PluginError, match=r"arch plugin 'toy-prompt': encode_prompt returned 'te_a_emb' of shape "
                                          r"\(8, \d, 6\), expected batch first"):
        toy(model, tmp_path / "o", arch=arch)


def test_one_collective_call_per_step():
    from lorakit.parallel import reduce_step

    class TwoProcesses:  # the other process holds twice this one's gradients and loss
        num_processes, calls = 2, 0

        def reduce(self, tensor, reduction):
            assert reduction == "mean"
            self.calls += 1
            return (tensor + 2 * tensor) / 2

    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.ones(2))]
    grads = [torch.randn(3, 4), torch.randn(5)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    accelerator = TwoProcesses()
    loss, _ = reduce_step(accelerator, params, 0.5, "cpu")
    assert accelerator.calls == 1
    assert loss == pytest.approx(0.75)
    for p, g in zip(params, grads):
        assert p.grad.shape == g.shape and torch.allclose(p.grad, 1.5 * g)
    assert params[2].grad is None


def test_input_encoders_are_released_once_cached_and_training_goes_on(model, tmp_path, caplog):
    trainer = toy(model, tmp_path / "o", max_steps=4)
    with caplog.at_level(logging.INFO, logger="lorakit"):
        result = trainer.run()
    assert trainer.components["img"] is None and trainer.components["te_b"] is None
    assert trainer.components["te_a"] is None  # frozen and cached too (no --train-text-encoder)
    assert "inputs cached: img, te_a, te_b freed" in caplog.text
    assert all(math.isfinite(x) for x in result.losses) and result.weights.is_file()
    images = CALLS["img"]
    assert math.isfinite(trainer.eval_loss(repeats=1))
    assert CALLS["img"] == images and trainer.components["img"] is None  # the training set is all cached
    # a held-out set needs the encoders again: they are brought back, not missing
    from lorakit.data import load_captioned_images

    held = tmp_path / "held"
    held.mkdir()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(held / "g.png")
    (held / "metadata.jsonl").write_text(json.dumps({"file_name": "g.png", "text": "a new caption"}))
    assert math.isfinite(trainer.eval_loss(load_captioned_images(str(held)), repeats=1))
    assert CALLS["img"] == images + 1 and isinstance(trainer.components["img"], ImageEncoder)


def test_what_is_still_needed_is_never_released(model, tmp_path):
    fresh = toy(model, tmp_path / "a", max_steps=2, center_crop=False)  # random crops: encoded every step
    fresh.run()
    assert isinstance(fresh.components["img"], torch.nn.Module)
    kept = toy(model, tmp_path / "b", max_steps=2, validation_prompt="a red circle", validation_every=1)
    kept.run()
    assert all(isinstance(kept.components[n], torch.nn.Module) for n in ("img", "te_a", "te_b"))
    assert kept.cache.released == ["img", "te_a", "te_b"]  # on the CPU between sample images


def test_train_state_round_trip_without_a_trainer(tmp_path):
    from lorakit.config import TrainConfig
    from lorakit.state import TrainState

    def objects(seed):
        torch.manual_seed(seed)
        module = torch.nn.Module()
        module.lora_A = torch.nn.Linear(3, 2, bias=False)
        module.base = torch.nn.Linear(3, 3)
        optimizer = torch.optim.AdamW(module.lora_A.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
        return module, optimizer, scheduler, torch.Generator().manual_seed(seed)

    config = TrainConfig(rank=4)
    module, optimizer, scheduler, generator = objects(0)
    module.lora_A(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    torch.randn(3, generator=generator)
    state = TrainState(config, {"net": module}, optimizer, scheduler, generator, global_step=7)
    path = state.save(tmp_path, lambda folder: (folder / "pytorch_lora_weights.safetensors").write_bytes(b""))
    assert path.name == "checkpoint-7"
    assert sorted(p.name for p in path.iterdir()) == [
        "lora_params.safetensors", "lorakit_checksums.json", "optimizer.pt", "pytorch_lora_weights.safetensors",
        "rng_state.safetensors", "scheduler.pt", "training_state.json",
    ]
    # the checksums, written last, cover every other file of the checkpoint
    sealed = json.loads((path / "lorakit_checksums.json").read_text())["files"]
    assert sorted(sealed) == sorted(p.name for p in path.iterdir() if p.name != "lorakit_checksums.json")
    module2, optimizer2, scheduler2, generator2 = objects(1)
    restored = TrainState(config, {"net": module2}, optimizer2, scheduler2, generator2)
    restored.load(path)
    assert restored.global_step == 7
    assert torch.equal(module2.lora_A.weight, module.lora_A.weight)
    assert not torch.equal(module2.base.weight, module.base.weight)  # only LoRA is saved
    assert torch.equal(generator2.get_state(), generator.get_state())
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(LorakitError, match="different run .*rank: checkpoint 4 vs now 8"):
        TrainState(TrainConfig(rank=8), {"net": module2}, optimizer2, scheduler2, generator2).load(path)
