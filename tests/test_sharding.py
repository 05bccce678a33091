"""The frozen denoiser sharded across processes (lorakit/sharding.py): two CPU processes (gloo)
train the LoRA an unsharded run trains, resume exactly, and the file reloads in diffusers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.testing import example_data

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).parent / "collectives_probe.py"
FSDP_CONFIG = ROOT / "docs" / "accelerate_fsdp.yaml"
WEIGHTS = "pytorch_lora_weights.safetensors"


def launch(model, out, *extra, arch="sd15", config_file=None, fsdp=(), probe=None):
    """`lorakit train` on two CPU processes: `accelerate launch --multi_gpu`, or with
    ``config_file`` (an accelerate config; the docs' FSDP one asks for sharding), or with
    accelerate's ``--use_fsdp`` and the ``fsdp`` flags."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = ["--config_file", str(config_file)] if config_file else ["--multi_gpu", "--num_machines", "1"]
    if fsdp:
        launcher = ["--use_fsdp", *fsdp, "--num_machines", "1"]
    launcher += ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    target = [str(PROBE)] if probe else ["-m", "lorakit.cli"]
    if probe:
        env["LORAKIT_PROBE_OUT"] = str(probe)
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *launcher, *target, "train", "--arch", arch,
         "--model", str(model), "--data", str(example_data()), "--output", str(out), "--resolution", "32",
         "--num-threads", "1", "--learning-rate", "1e-3", *extra],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def same_weights(a, b) -> None:
    a, b = load_file(str(Path(a) / WEIGHTS)), load_file(str(Path(b) / WEIGHTS))
    assert a.keys() == b.keys() and len(a) > 0
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"
    assert any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)  # it trained


def test_sharded_run_trains_the_unsharded_lora_resumes_exactly_and_reloads(tmp_path, lorakit_tiny_model):
    """Unsharded 4 steps == sharded 2 steps (--shard-frozen) + a resume to 4 sharded through
    the docs' accelerate FSDP config == the same 2 steps resumed unsharded: bit for bit, and
    the file reloads in diffusers as the unsharded one does. The sharded steps make exactly one
    all_reduce (the LoRA gradients and the loss, as unsharded) plus FSDP's all-gathers."""
    model = lorakit_tiny_model("sd15")
    plain = launch(model, tmp_path / "plain", "--max-steps", "4")
    assert "sharded the frozen" not in plain.stderr + plain.stdout
    first = launch(model, tmp_path / "sharded", "--max-steps", "2", "--checkpoint-every", "2", "--shard-frozen",
                   probe=tmp_path / "probe")
    said = "sharded the frozen unet over 2 processes (4 blocks of BasicTransformerBlock): 1.5 of 3.0 MiB on each"
    assert (first.stdout + first.stderr).count(said) == 1
    checkpoint = tmp_path / "sharded" / "checkpoint-2"
    unsharded = launch(model, tmp_path / "unsharded", "--max-steps", "4", "--resume", str(checkpoint))
    resumed = launch(model, tmp_path / "sharded", "--max-steps", "4", "--resume", "latest", config_file=FSDP_CONFIG)
    assert said in resumed.stdout + resumed.stderr  # the accelerate config shards too
    assert "sharded the frozen" not in unsharded.stdout + unsharded.stderr
    same_weights(tmp_path / "sharded", tmp_path / "plain")
    same_weights(tmp_path / "unsharded", tmp_path / "plain")  # a sharded run's checkpoint resumes unsharded

    for rank in (0, 1):
        steps = json.loads((tmp_path / f"probe.{rank}.json").read_text())
        assert len(steps) == 2
        for calls in steps:
            assert calls.count("all_reduce") == 1, calls
            gathers = [c for c in calls if c != "all_reduce"]
            # 4 blocks + the root, gathered for the forward and again for the backward
            assert gathers == ["all_gather_single"] * 10, calls

    from diffusers import StableDiffusionPipeline

    from lorakit.testing import lora_deltas

    deltas, outputs = [], []
    for run in ("plain", "sharded"):
        pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
        pipe.load_lora_weights(str(tmp_path / run), weight_name=WEIGHTS)
        deltas.append(lora_deltas(pipe.unet))
        sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            outputs.append(pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=hidden).sample)
    assert len(deltas[0]) == 32 and deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    assert torch.equal(outputs[0], outputs[1])


def test_sharded_flux_transformer_trains_the_unsharded_lora(tmp_path, lorakit_tiny_model):
    """The FLUX-class case: both block kinds diffusers declares become shards; sharded here by
    accelerate's launch flags, its blocks kept gathered from forward to backward."""
    model = lorakit_tiny_model("flux")
    launch(model, tmp_path / "plain", "--max-steps", "2", arch="flux")
    flags = ("--fsdp_version", "2", "--fsdp_reshard_after_forward", "false", "--fsdp_sync_module_states", "false")
    sharded = launch(model, tmp_path / "sharded", "--max-steps", "2", arch="flux", fsdp=flags, probe=tmp_path / "probe")
    for calls in json.loads((tmp_path / "probe.0.json").read_text()):  # gathered once a step, not twice
        assert sorted(calls) == ["all_gather_single"] * 5 + ["all_reduce"], calls
    assert "sharded the frozen transformer over 2 processes (" in sharded.stdout + sharded.stderr
    assert "blocks of FluxTransformerBlock, FluxSingleTransformerBlock)" in sharded.stdout + sharded.stderr
    same_weights(tmp_path / "sharded", tmp_path / "plain")


# --------------------------------------------------------------------- accelerate's FSDP settings

FSDP = {"ACCELERATE_USE_FSDP": "true"}


@pytest.mark.parametrize("env, reshard, blocks", [
    ({}, True, ()),
    ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, False, ()),
    ({"FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, False, ()),
    ({"FSDP_SHARDING_STRATEGY": "1"}, True, ()),
    ({"FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "A, B"}, True, ("A", "B")),
    ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "A"}, True, ()),
])
def test_accelerate_fsdp_settings_become_the_plan(env, reshard, blocks):
    from lorakit.sharding import accelerate_plan

    plan = accelerate_plan({**FSDP, **env})
    assert (plan.reshard_after_forward, plan.blocks) == (reshard, blocks)
    assert accelerate_plan({**env}) is None  # no FSDP asked for


@pytest.mark.parametrize("env, says", [
    ({"FSDP_OFFLOAD_PARAMS": "true"}, "offloads parameters to the CPU, which lorakit does not do; set fsdp_offload_params: false"),
    ({"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "set fsdp_activation_checkpointing: false and pass --gradient-checkpointing"),
    ({"FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "has sharding strategy NO_SHARD, which lorakit does not build"),
    ({"FSDP_SHARDING_STRATEGY": "4"}, "has sharding strategy HYBRID_SHARD, which lorakit does not build"),
])
def test_accelerate_fsdp_settings_lorakit_cannot_apply_are_one_line_before_the_model_loads(env, says, monkeypatch):
    from accelerate.utils import DistributedType

    from lorakit.parallel import check_data_parallel

    class Launched:
        distributed_type = DistributedType.MULTI_CPU  # what accelerate says on CPU, FSDP or not

    check_data_parallel(Launched())
    for name, value in {**FSDP, **env}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LorakitError, match="^accelerate's FSDP setup .*" + says.replace("(", r"\(").replace(")", r"\)")):
        check_data_parallel(Launched())


def test_blocks_are_what_diffusers_declares(lorakit_tiny_model):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from lorakit.sharding import block_classes

    unet = UNet2DConditionModel.from_pretrained(str(lorakit_tiny_model("sd15")), subfolder="unet")
    flux = FluxTransformer2DModel.from_pretrained(str(lorakit_tiny_model("flux")), subfolder="transformer")
    # the UNet's _repeated_blocks, not its _no_split_modules (ResnetBlock2D, whole up blocks)
    assert block_classes(unet) == ["BasicTransformerBlock"]
    assert block_classes(flux) == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    assert block_classes(unet, ("ResnetBlock2D",)) == ["ResnetBlock2D"]
    with pytest.raises(LorakitError, match="^fsdp_transformer_layer_cls_to_wrap names FluxTransformerBlock, which "
                                           "UNet2DConditionModel does not have; drop the setting"):
        block_classes(unet, ("FluxTransformerBlock",))
    with pytest.raises(LorakitError, match="^Linear declares no blocks to shard"):
        block_classes(torch.nn.Linear(2, 2))


def test_no_shard_frozen_conflicts_with_accelerates_fsdp_setup():
    from lorakit.config import TrainConfig
    from lorakit.sharding import requested

    assert requested(TrainConfig(arch="sd15", shard_frozen=True), {}).source == "--shard-frozen"
    assert requested(TrainConfig(arch="sd15"), {}) is None
    assert requested(TrainConfig(arch="sd15", shard_frozen=True), FSDP).source.startswith("accelerate's FSDP setup")
    with pytest.raises(LorakitError, match="^--no-shard-frozen conflicts with accelerate's FSDP setup .*; drop one"):
        requested(TrainConfig(arch="sd15", shard_frozen=False), FSDP)
