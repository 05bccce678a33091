"""Five fixed runs whose final weights are recorded in this folder.

They pin the training results across refactors: the same command lines must give
bit-identical LoRA tensors (``tests/test_reference_runs.py``). Record again only for a
change that is meant to change results, and say so in the commit:

    python -m tests.reference.runs --record
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
SHAPES = Path(__file__).parents[2] / "lorakit" / "examples" / "shapes"

#: name -> (arch of the tiny model, CLI arguments after `lorakit train`). {model}, {data},
#: {output}, {instance} and {cls} are filled in per run.
RUNS = {
    # the README quick start (one thread: the result must not depend on the core count)
    "quickstart": ("sd15", "--arch sd15 --model {model} --data {data} --output {output} --resolution 64 --rank 4 "
                   "--alpha 8 --max-steps 500 --checkpoint-every 250 --learning-rate 1e-3 --overwrite --num-threads 1"),
    "sdxl-te": ("sdxl", "--arch sdxl --model {model} --data {data} --output {output} --resolution 32 --rank 4 "
                "--alpha 8 --max-steps 6 --batch-size 2 --random-flip --train-text-encoder --text-encoder-lr 5e-4 "
                "--learning-rate 1e-3 --snr-gamma 5 --num-threads 1"),
    "kandinsky22": ("kandinsky22", "--arch kandinsky22 --model {model} --data {data} --output {output} --resolution 32 "
                    "--rank 4 --max-steps 6 --batch-size 2 --learning-rate 1e-3 --num-threads 1"),
    "kandinsky22-prior": ("kandinsky22-prior", "--arch kandinsky22-prior --model {model}/prior --data {data} "
                          "--output {output} --resolution 32 --rank 4 --max-steps 6 --batch-size 2 "
                          "--learning-rate 1e-3 --caption-dropout 0.2 --num-threads 1"),
    "wuerstchen": ("wuerstchen", "--arch wuerstchen --model {model} --data {data} --output {output} --resolution 32 "
                   "--rank 4 --alpha 4 --max-steps 6 --batch-size 2 --train-text-encoder --learning-rate 1e-3 "
                   "--num-threads 1"),
    "dreambooth-sd15": ("sd15", "--arch sd15 --model {model} --dreambooth --instance-data {instance} "
                        "--instance-prompt 'a photo of sks shape' --class-prompt 'a photo of a shape' "
                        "--class-data {cls} --num-class-images 3 --output {output} --resolution 32 --rank 4 "
                        "--max-steps 6 --batch-size 2 --learning-rate 1e-3 --prior-loss-weight 0.5 --num-threads 1"),
}


def _instance_folder(root: Path) -> Path:
    folder = root / "instance"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("red.png", "red_circle.png", "blue.png", "blue_circle.png"):
        shutil.copy(SHAPES / name, folder / name)
    return folder


def run(name: str, root: Path) -> dict:
    """Run ``name`` under ``root`` through the CLI and return its final LoRA tensors."""
    import shlex

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.tiny import make_tiny_model

    arch, args = RUNS[name]
    root.mkdir(parents=True, exist_ok=True)
    model_arch = "kandinsky22" if arch == "kandinsky22-prior" else arch
    model = make_tiny_model(model_arch, root / f"model-{model_arch}", seed=0)
    cls = root / "class"
    if name.startswith("dreambooth"):
        cls.mkdir(exist_ok=True)
        shutil.copy(SHAPES / "green.png", cls / "green.png")  # one given, two generated
    filled = args.format(model=model, data=SHAPES, output=root / f"out-{name}",
                         instance=_instance_folder(root), cls=cls)
    result = CliRunner().invoke(app, ["train", *shlex.split(filled)])
    if result.exit_code != 0:
        raise RuntimeError(f"reference run {name} failed ({result.exit_code}): {result.output}\n{result.exception!r}")
    return load_file(str(root / f"out-{name}" / "pytorch_lora_weights.safetensors"))


def reference(name: str) -> Path:
    return HERE / f"{name}.safetensors"


def record(names=None) -> None:
    import tempfile

    from safetensors.torch import save_file

    for name in names or RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            tensors = run(name, Path(tmp))
        save_file(tensors, str(reference(name)))
        print(f"recorded {reference(name)} ({len(tensors)} tensors)")


if __name__ == "__main__":
    if "--record" not in sys.argv:
        sys.exit(__doc__)
    record([a for a in sys.argv[1:] if a != "--record"] or None)
