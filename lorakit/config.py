"""TrainConfig: one validated object per run (CLI flags > config file > defaults).

The core's options are declared here, once (:data:`CORE_OPTIONS`); an arch adds its own
(``ArchInfo.options``), its objective family its own (:mod:`lorakit.objectives`), and each
mode its own (the ``declare_options`` hook). A run accepts exactly the options of its arch,
objective and modes besides the core's; the CLI, config files and docs/cli.md are all
generated from the same declarations.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.images import INTERPOLATION
from lorakit.options import Option, by_name

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")

_RUN, _DATA, _LORA, _OPT, _CKPT, _SYS = "Run", "Data", "LoRA", "Optimiser", "Checkpoints", "Precision and speed"
_TRACK, _VAL, _HUB, _CARD = "Tracking", "Validation samples", "Hub", "Model card"
#: --report-to's choices (see lorakit.tracking).
REPORT_TO = ("tensorboard", "wandb", "all", "none")
#: --optimizer's choices (see lorakit.optimizers).
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")

CORE_OPTIONS = (
    Option("arch", str, "", "Architecture id (see `lorakit list-archs`).", panel=_RUN, resume=True, default_text="required"),
    Option("model", str, "", "Hub id or local diffusers model folder.", panel=_RUN, default_text="required"),
    Option("data", str, None, "Image folder (metadata.jsonl or .txt captions) or dataset.", panel=_RUN),
    Option("output", str, "", "Folder for the LoRA, checkpoints and config.", panel=_RUN, default_text="required"),
    Option("vae", str, None, "Replacement image encoder (the VAE or the arch's equivalent), hub id or folder; see docs/archs.",
           panel=_RUN, default_text="the model's"),
    # single-file models and hub revisions/variants (lorakit.models, lorakit.singlefile, lorakit.variants)
    Option("model_config", str, None, "With a single-file --model: diffusers folder or hub id supplying its configs "
           "and tokenizers (needed offline).", panel=_RUN, default_text="diffusers' default for the file"),
    Option("revision", str, None, "Branch, tag or commit of a hub --model.", panel=_RUN, default_text="main"),
    Option("variant", str, None, "Weight variant of a hub or folder --model (e.g. fp16: *.fp16.safetensors).",
           panel=_RUN, default_text="the plain weights"),
    Option("caption_column", str, None, "Caption column of metadata.jsonl / dataset.", panel=_DATA, default_text="text"),
    Option("image_column", str, None, "Image column of a dataset.", panel=_DATA, default_text="image"),
    Option("resolution", int, None, "Training size in pixels: the square side, or with --buckets the target area's side.",
           minimum=8, panel=_DATA, resume=True, default_text="the model's native"),
    Option("center_crop", bool, True, "Crop position: centre, or a random window per epoch.", panel=_DATA,
           flags=("--center-crop/--random-crop",), default_text="center"),
    Option("buckets", bool, False, "Aspect-ratio buckets: train near each image's own shape, not square.",
           panel=_DATA, resume=True),
    Option("random_flip", bool, False, "Flip images left-right at random.", panel=_DATA),
    Option("caption_dropout", float, 0.0, "Probability of training on an empty caption.", minimum=0, maximum=1,
           exclusive_maximum=True, panel=_DATA),
    Option("cache", bool, True, "Encode images and captions once and cache them (--no-cache: every step).", panel=_DATA),
    Option("disk_cache", bool, True, "Keep the cached encodings on disk (memory-mapped, reused by later runs and "
           "resumes); --no-disk-cache: in RAM for this run only.", panel=_DATA),
    Option("cache_dir", str, None, "Folder of the persistent encoding cache (--disk-cache).", panel=_DATA,
           default_text="$LORAKIT_CACHE_DIR/encodings, else ~/.cache/lorakit/encodings"),
    Option("num_workers", int, 0, "Threads decoding and augmenting a batch's images (0: none).", minimum=0, panel=_DATA,
           aliases=("dataloader_workers",), flags=("--num-workers", "--dataloader-workers")),
    Option("image_interpolation_mode", str, "bicubic", "Filter that resizes images to the training size "
           "(diffusers' script defaults to lanczos).", choices=INTERPOLATION, panel=_DATA, resume=True),
    Option("max_train_samples", int, None, "Train on the first N examples of the data only (in the data's order).",
           minimum=1, panel=_DATA, resume=True, default_text="all"),
    Option("rank", int, 4, "LoRA rank.", minimum=1, panel=_LORA, resume=True),
    Option("alpha", float, None, "LoRA alpha.", minimum=0, exclusive_minimum=True, panel=_LORA, resume=True,
           default_text="= rank"),
    Option("dropout", float, 0.0, "Dropout on the LoRA path.", minimum=0, maximum=1, exclusive_maximum=True,
           panel=_LORA, resume=True, flags=("--lora-dropout",), aliases=("lora_dropout",)),
    Option("target_modules", list, None, "Comma-separated layer names for the denoiser's LoRA.", panel=_LORA,
           resume=True, default_text="the arch's"),
    Option("train_text_encoder", bool, False, "Also train text-encoder LoRA.", panel=_LORA, resume=True),
    Option("text_encoder_lr", float, None, "Learning rate of text-encoder LoRA.", minimum=0, exclusive_minimum=True,
           panel=_LORA, default_text="= --learning-rate"),
    Option("init_lora_weights", str, "gaussian", "Initialisation of the LoRA matrices.", choices=("gaussian", "default"),
           panel=_LORA, resume=True),
    Option("init_lora", str, None, "Start from an existing LoRA file (lorakit/diffusers, kohya/A1111, diffusers-example "
           "or PEFT): its rank, alpha and targets are used, its weights are step 0.", panel=_LORA, resume=True),
    Option("learning_rate", float, 1e-4, "Learning rate.", minimum=0, exclusive_minimum=True, panel=_OPT,
           flags=("--learning-rate", "--lr"), aliases=("lr",)),
    Option("optimizer", str, "adamw", "Optimizer: adamw (torch), adamw8bit (bitsandbytes, GPU), prodigy (prodigyopt; "
           "use --learning-rate 1), adafactor (transformers).", choices=OPTIMIZERS, panel=_OPT, resume=True),
    Option("scale_lr", bool, False, "Multiply the learning rate(s) by gradient accumulation x batch size x processes.",
           panel=_OPT),
    Option("adam_beta1", float, 0.9, "AdamW beta1.", minimum=0, maximum=1, exclusive_maximum=True, panel=_OPT),
    Option("adam_beta2", float, 0.999, "AdamW beta2.", minimum=0, maximum=1, exclusive_maximum=True, panel=_OPT),
    Option("adam_weight_decay", float, 1e-2, "AdamW weight decay.", minimum=0, panel=_OPT),
    Option("adam_epsilon", float, 1e-8, "AdamW epsilon.", minimum=0, exclusive_minimum=True, panel=_OPT),
    Option("max_steps", int, None, "Optimizer steps to train; with --epochs, the first reached ends the run.",
           minimum=1, panel=_OPT, default_text="1000 unless --epochs"),
    Option("epochs", int, None, "Passes over the data to train; with --max-steps, the first reached ends the run.", minimum=1, panel=_OPT),
    Option("batch_size", int, 1, "Examples per micro-batch per device.", minimum=1, panel=_OPT, resume=True),
    Option("gradient_accumulation", int, 1, "Micro-batches per optimizer step.", minimum=1, panel=_OPT, resume=True),
    Option("lr_scheduler", str, "constant", "Learning-rate schedule.", choices=LR_SCHEDULERS, panel=_OPT),
    Option("lr_warmup_steps", int, 0, "Warm-up steps of the LR schedule.", minimum=0, panel=_OPT),
    Option("max_grad_norm", float, 1.0, "Clip gradients to this norm; 0 disables.", minimum=0, panel=_OPT),
    Option("mixed_precision", str, "no", "Mixed precision; LoRA weights stay fp32.", choices=("no", "fp16", "bf16"),
           panel=_SYS, resume=True, default_text="accelerate's (launch flag or config file), else no"),
    Option("gradient_checkpointing", bool, False, "Trade compute for memory.", panel=_SYS),
    Option("shard_frozen", bool, False, "Shard the frozen denoiser across the processes (FSDP2; the LoRA stays "
           "whole): each stores 1/N of the base. Needs 2+ processes.", panel=_SYS),
    Option("allow_tf32", bool, False, "Allow TF32 matmuls on Ampere and newer GPUs (faster; no effect on CPU).", panel=_SYS),
    Option("seed", int, 0, "Seed for everything random.", minimum=0, maximum=2**32 - 1, panel=_OPT, resume=True),
    Option("checkpoint_every", int, None, "Save checkpoint-N every N steps.", minimum=1, panel=_CKPT),
    Option("checkpoints_limit", int, None, "Keep only the newest N checkpoints.", minimum=1, panel=_CKPT,
           default_text="all"),
    Option("resume", str, None, "'latest' or a checkpoint folder to continue from.", panel=_CKPT),
    Option("overwrite", bool, False, "Replace an earlier run in --output.", panel=_CKPT),
    Option("save_format", str, None, "Final LoRA file(s): diffusers (pytorch_lora_weights.safetensors), kohya "
           "(OUTPUT/<folder name>.safetensors for A1111, ComfyUI, kohya) or both.", choices=("diffusers", "kohya", "both"),
           panel=_CKPT, default_text="both where the arch has a kohya layout, else diffusers"),
    Option("validation_prompt", list, None, "Prompt for sample images before, during and after training "
           "(repeat the flag for several; a list in a config file).", panel=_VAL, multiple=True),
    Option("num_validation_images", int, 1, "Sample images per prompt (seeds --seed, --seed+1, ...).", minimum=1,
           panel=_VAL),
    Option("validation_every", int, None, "Write sample images every N steps.", minimum=1, panel=_VAL),
    Option("validation_epochs", int, None, "Write sample images every N epochs.", minimum=1, panel=_VAL),
    Option("validation_steps", int, 25, "Inference steps per sample image.", minimum=1, panel=_VAL),
    Option("validation_guidance", float, None, "Guidance scale of the sample images.", minimum=0, panel=_VAL,
           default_text="the arch's"),
    Option("report_to", str, None, "Experiment tracker for losses, learning rates, gradient norms and samples.",
           choices=REPORT_TO, panel=_TRACK, default_text="tensorboard if installed, else none"),
    Option("logging_dir", str, None, "Folder the trackers write to.", panel=_TRACK, default_text="OUTPUT/logs"),
    Option("run_name", str, None, "The run's name in the tracker (TensorBoard: a subfolder of --logging-dir).",
           panel=_TRACK, default_text="the --output folder's name"),
    Option("push_to_hub", bool, False, "Upload the LoRA, model card and samples to the Hugging Face Hub at the end "
           "(token: HF_TOKEN or `hf auth login`; checked before training).", panel=_HUB),
    Option("hub_model_id", str, None, "Hub repo to upload to, USER/NAME or NAME.", panel=_HUB,
           default_text="your account / the --output folder's name"),
    Option("hub_private", bool, False, "Make the Hub repo private when it is created.", panel=_HUB),
    Option("push_checkpoints", bool, False, "Also upload each checkpoint as it is saved (in the background).",
           panel=_HUB),
    Option("license", str, None, "License id for the model card's front matter (e.g. openrail++, mit).", panel=_CARD,
           default_text="the local base model's card's, else none"),
    Option("num_threads", int, None, "CPU threads for torch.", minimum=1, panel=_SYS, default_text="torch's default"),
)
CORE = by_name(CORE_OPTIONS)
#: Not options but part of every config: the active modes (the CLI's --<mode> flags).
RUN_KEYS = ("modes", "model_sha256", "init_lora_sha256")  # model_sha256: a single-file --model's, set when it loads
# init_lora_sha256: the --init-lora file's, set when it is read
#: Written into a run's lorakit_config.json for the record, not options: a config file's are skipped
#: (the run config stays a valid --config file).
RECORDED_KEYS = ("num_processes",)


class TrainConfig:
    """The options of one run, read as attributes (``config.learning_rate``).

    Built from keyword arguments (any option of the core, the arch, its objective or a mode);
    :func:`validate` fills the defaults of the run's declared options and refuses the rest.
    """

    def __init__(self, **values):
        modes = values.pop("modes", None)
        given = {k: v for k, v in values.items() if v is not None}  # None: the default applies
        data = {o.name: copy.copy(o.default) for o in CORE_OPTIONS}
        data["modes"] = list(modes or [])
        data.update(given)
        object.__setattr__(self, "_values", data)
        object.__setattr__(self, "_given", set(given))

    def __getattr__(self, name):
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"this run has no option '{name}' (not declared by the core, its arch or its modes)")

    def __setattr__(self, name, value):
        self._values[name] = value

    def __eq__(self, other):
        return isinstance(other, TrainConfig) and self._values == other._values

    def __repr__(self):
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in sorted(self._values.items()))})"

    def given(self, name: str) -> bool:
        """Whether the user set ``name`` (rather than its default applying)."""
        return name in self._given

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------- the run's options


def run_options(arch: str, modes=()) -> dict:
    """``{name: Option}`` a run of ``arch`` with ``modes`` accepts (imports plugins, not torch)."""
    from lorakit.objectives import options_for
    from lorakit.plugins import arch_info, mode_options

    info = arch_info(arch)
    declared = list(CORE_OPTIONS) + list(options_for(info.objective)) + list(info.options)
    for mode in modes:
        declared += list(mode_options(mode))
    return by_name(declared)


def resume_keys(config) -> list[str]:
    """The options a resumed run must share with its checkpoint (declared ``resume=True``)."""
    try:
        options = run_options(config.arch, config.modes)
    except LorakitError:
        options = CORE
    return sorted([name for name, o in options.items() if o.resume] + ["modes"]
                  + [k for k in ("model_sha256", "init_lora_sha256") if k in config._values])  # the same single file on resume


def read_config_file(path: str | Path) -> dict:
    """Read a TOML or YAML file of options (keys as the flags spell them, dashes or underscores)."""
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
        elif path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise LorakitError(f"config file {path} must end in .toml, .yaml, .yml or .json.")
    except LorakitError:
        raise
    except Exception as exc:
        raise LorakitError(f"config file {path} could not be parsed: {exc}") from None
    if not isinstance(raw, dict):
        raise LorakitError(f"config file {path} must hold a table of options, not {type(raw).__name__}.")
    return raw.get("train", raw) if isinstance(raw.get("train"), dict) else raw


def _by_key(options: dict) -> dict:
    return {key: o for o in options.values() for key in o.keys()}


def build_config(cli_values: dict, config_file: str | None = None) -> TrainConfig:
    """Merge defaults < config file < explicitly given CLI values, then validate."""
    values = {}
    if config_file:
        values.update({("modes" if k == "modes" else k): v for k, v in read_config_file(config_file).items()
                       if k not in RECORDED_KEYS})
    values.update({k: v for k, v in cli_values.items() if v is not None})
    modes = values.pop("modes", None)
    arch = values.get("arch")
    if not arch:
        raise LorakitError("no --arch given; choose one from `lorakit list-archs`.")
    options = _by_key(run_options(arch, modes or ()))
    named = {}
    for key, value in values.items():
        option = options.get(key)
        if option is None:
            raise LorakitError(unknown_option_message(key, arch, modes or (), where=f"config file {config_file}"))
        named[option.name] = option.coerce(value, f"config file {config_file}" if config_file else "option")
    config = TrainConfig(**named, modes=modes)
    validate(config)
    return config


def config_yaml(config: TrainConfig) -> str:
    """The resolved options as a YAML config file (``--print-config``): every option of the run
    by the key a config file takes; ``--config`` of it gives the same config."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=True, allow_unicode=True)


def unknown_option_message(key: str, arch: str, modes, where: str = "") -> str:
    """One line for an option the run does not accept: whose option it is, if anyone's."""
    from lorakit.plugins import declared_elsewhere

    flag = "--" + key.replace("_", "-")
    owner = declared_elsewhere(key.replace("-", "_"), arch, modes)
    prefix = f"{where}: " if where and where != "config file None" else ""
    if owner:
        return f"{prefix}{flag} does not apply to --arch {arch}{' with ' + ', '.join(modes) if modes else ''} (it is an option of {owner}); drop it."
    return f"{prefix}unknown option '{key}'. See `lorakit train --help`."


def validate(config: TrainConfig) -> TrainConfig:
    """Check every option of the run against its declaration, fill the defaults of the arch's,
    objective's and modes' options, refuse options that do not apply, and ask the plugins'
    ``check_config`` hooks, all before any model loads."""
    from lorakit.plugins import get_plugin_manager

    if not config.arch:
        raise LorakitError("no --arch given; choose one from `lorakit list-archs`.")
    options = run_options(config.arch, config.modes)
    for name in list(config.to_dict()):
        if name not in options and name not in RUN_KEYS:
            raise LorakitError(unknown_option_message(name, config.arch, config.modes))
    for name, option in options.items():
        if name not in config._values:
            config._values[name] = copy.copy(option.default)
        value = option.coerce(config._values[name], option.flag) if name in config._given else config._values[name]
        option.check(value)
        config._values[name] = value
    pm = get_plugin_manager(config.arch, config.modes)
    info = pm.hook.arch_info()
    _check_core(config, info, pm, options)
    from lorakit import hub, optimizers, validation

    hub.check_options(config)
    optimizers.check(config)
    from lorakit.diskcache import check_cache_dir

    check_cache_dir(config)
    validation.check_options(config)
    from lorakit.saveformat import check_save_format

    check_save_format(config, info)
    pm.hook.check_config(config=config, info=info)
    return config


def _check_core(config: TrainConfig, info, pm, options: dict) -> None:
    def bad(msg):
        raise LorakitError(msg)

    if not config.model:
        bad("no --model given; pass a hub id or a local diffusers model folder.")
    if not config.output:
        bad("no --output given; pass the folder the LoRA and checkpoints go to.")
    replaced = [i for i in pm.hook.build_dataset.get_hookimpls() if not i.plugin_name.startswith("lorakit.")]
    if not config.data and not replaced:
        bad("no --data given; pass an image folder or a dataset.")
    refused = info.refuses if isinstance(info.refuses, dict) else dict.fromkeys(info.refuses)
    for name, message in refused.items():
        option = options.get(name)
        if option is not None and config.given(name) and config._values[name] != option.default:
            bad(message or f"{option.flag} does not apply to --arch {config.arch}; drop it.")
    if config.train_text_encoder and not info.text_encoders:
        bad(f"--arch {config.arch} does not support --train-text-encoder; drop it.")
    multiple = max(8, int(info.size_multiple))
    if config.resolution is not None and config.resolution % multiple:
        bad(f"--resolution must be a multiple of {multiple} for --arch {config.arch}, got {config.resolution}.")
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        config.max_grad_norm = None
    if config.target_modules is not None and not config.target_modules:
        bad("--target-modules is empty; give a comma-separated list such as to_q,to_k,to_v,to_out.0.")
