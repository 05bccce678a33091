"""TrainConfig: one validated object per run (CLI flags > config file > defaults)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError

MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


@dataclass
class TrainConfig:
    arch: str = ""
    model: str = ""
    data: str | None = None
    output: str = ""

    # replacement image encoder (a VAE, e.g. an fp16-safe one, or the arch's equivalent); the arch decides
    vae: str | None = None

    # data
    caption_column: str | None = None
    image_column: str | None = None
    resolution: int | None = None
    center_crop: bool = True
    buckets: bool = False  # aspect-ratio buckets instead of square crops, see lorakit.buckets
    random_flip: bool = False
    caption_dropout: float = 0.0
    cache: bool = True
    num_workers: int = 0

    # LoRA
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] | None = None
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    init_lora_weights: str = "gaussian"

    # optimisation
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0

    # diffusion
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None

    # checkpoints and outputs
    checkpoint_every: int | None = None
    checkpoints_limit: int | None = None
    resume: str | None = None
    overwrite: bool = False
    validation_prompt: str | None = None
    validation_every: int | None = None
    num_threads: int | None = None

    # modes
    modes: list[str] = field(default_factory=list)
    # DreamBooth prior preservation (mode "dreambooth")
    instance_data: str | None = None
    instance_prompt: str | None = None
    class_data: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    repeats: int = 1
    class_generation_steps: int = 25

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict:
    """Read a TOML or YAML file of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"config file {path} does not exist; check the --config path.")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raise LorakitError(f"config file {path} must end in .toml, .yaml or .yml.")
    except LorakitError:
        raise
    except Exception as exc:
        raise LorakitError(f"config file {path} could not be parsed: {exc}") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"config file {path} must hold a table of options, not {type(raw).__name__}.")
    raw = raw.get("train", raw) if isinstance(raw.get("train"), dict) else raw
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise LorakitError(f"config file {path}: unknown option '{key}'. See `lorakit train --help`.")
        out[name] = _checked_value(path, key, FIELDS[name].type, value)
    return out


def _checked_value(path, key, annotation: str, value):
    """A config-file value of the field's type (an int is a fine float), or one error line."""
    kinds = {part.strip() for part in str(annotation).split("|")}
    if value is None and "None" in kinds:
        return value
    if "bool" in kinds:
        ok, want = isinstance(value, bool), "true or false"
    elif "int" in kinds:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif "float" in kinds:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif "list[str]" in kinds:
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        want = "a list of names (or one comma-separated string)"
        if ok and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise LorakitError(f"config file {path}: '{key}' must be {want}, got {value!r}.")
    return value


def build_config(cli_values: dict, config_file: str | None = None) -> TrainConfig:
    """Merge defaults < config file < explicitly given CLI values, then validate."""
    values = {}
    if config_file:
        values.update(read_config_file(config_file))
    values.update({k: v for k, v in cli_values.items() if v is not None})
    config = TrainConfig(**values)
    validate(config)
    return config


def validate(config: TrainConfig) -> TrainConfig:
    def bad(msg):
        raise LorakitError(msg)

    if not config.arch:
        bad("no --arch given; choose one from `lorakit list-archs`.")
    if not config.model:
        bad("no --model given; pass a hub id or a local diffusers model folder.")
    if not config.output:
        bad("no --output given; pass the folder the LoRA and checkpoints go to.")
    if "dreambooth" not in config.modes and not config.data:
        bad("no --data given; pass an image folder or a dataset.")
    if config.rank <= 0:
        bad(f"--rank must be a positive integer, got {config.rank}.")
    if config.alpha is not None and config.alpha <= 0:
        bad(f"--alpha must be positive, got {config.alpha}.")
    if config.learning_rate <= 0:
        bad(f"--learning-rate must be positive, got {config.learning_rate}.")
    if config.text_encoder_lr is not None and config.text_encoder_lr <= 0:
        bad(f"--text-encoder-lr must be positive, got {config.text_encoder_lr}.")
    if config.max_steps <= 0:
        bad(f"--max-steps must be positive, got {config.max_steps}.")
    if config.batch_size <= 0:
        bad(f"--batch-size must be positive, got {config.batch_size}.")
    if config.gradient_accumulation <= 0:
        bad(f"--gradient-accumulation must be positive, got {config.gradient_accumulation}.")
    if config.resolution is not None and (config.resolution < 8 or config.resolution % 8):
        bad(f"--resolution must be a multiple of 8 (at least 8), got {config.resolution}.")
    if config.mixed_precision not in MIXED_PRECISION:
        bad(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got '{config.mixed_precision}'.")
    if config.prediction_type is not None and config.prediction_type not in PREDICTION_TYPES:
        bad(f"--prediction-type must be one of {', '.join(PREDICTION_TYPES)}, got '{config.prediction_type}'.")
    if config.lr_scheduler not in LR_SCHEDULERS:
        bad(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got '{config.lr_scheduler}'.")
    if config.lr_warmup_steps < 0:
        bad(f"--lr-warmup-steps must be >= 0, got {config.lr_warmup_steps}.")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        config.max_grad_norm = None
    if config.snr_gamma is not None and config.snr_gamma <= 0:
        bad(f"--snr-gamma must be positive, got {config.snr_gamma}.")
    if not 0.0 <= config.caption_dropout < 1.0:
        bad(f"--caption-dropout must be in [0, 1), got {config.caption_dropout}.")
    if not 0.0 <= config.dropout < 1.0:
        bad(f"--lora-dropout must be in [0, 1), got {config.dropout}.")
    if config.checkpoint_every is not None and config.checkpoint_every <= 0:
        bad(f"--checkpoint-every must be positive, got {config.checkpoint_every}.")
    if config.checkpoints_limit is not None and config.checkpoints_limit <= 0:
        bad(f"--checkpoints-limit must be positive, got {config.checkpoints_limit}.")
    if config.init_lora_weights not in ("gaussian", "default"):
        bad(f"--init-lora-weights must be 'gaussian' or 'default', got '{config.init_lora_weights}'.")
    if config.repeats <= 0:
        bad(f"--repeats must be positive, got {config.repeats}.")
    if config.num_class_images < 0:
        bad(f"--num-class-images must be >= 0, got {config.num_class_images}.")
    if config.prior_loss_weight < 0:
        bad(f"--prior-loss-weight must be >= 0, got {config.prior_loss_weight}.")
    if isinstance(config.target_modules, str):
        config.target_modules = [t.strip() for t in config.target_modules.split(",") if t.strip()]
    if config.target_modules is not None and not config.target_modules:
        bad("--target-modules is empty; give a comma-separated list such as to_q,to_k,to_v,to_out.0.")
    return config
