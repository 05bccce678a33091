"""The plugin contract: every hook an architecture (or mode) plugin can implement.

An *arch plugin* teaches lorakit one model family. It is registered under the
``lorakit.archs`` entry-point group; the entry-point name is the arch id that users
pass to ``--arch``. A *mode plugin* (``lorakit.modes`` group)
changes how a run is put together and wraps arch hooks instead of copying them.

Each run builds a fresh plugin manager holding exactly one arch plugin, the chosen
mode plugins and lorakit's own defaults, so ``firstresult`` hooks are answered by the
arch (or by a mode wrapping it). Implementations may accept fewer arguments than a
spec lists; specs only ever grow arguments.

Conventions shared by all hooks:

* ``components`` is a plain ``dict`` from component name (``"unet"``, ``"vae"``,
  ``"text_encoder"``, ``"tokenizer"``, ``"noise_scheduler"``, ...) to the loaded object.
  Names are the arch's choice; the core only reads the names the arch itself reports.
* ``config`` is the run's validated :class:`lorakit.config.TrainConfig`.
* Tensors in a batch have the batch dimension first.
* Plugins import torch/diffusers inside hook bodies, never at module top level, so
  ``lorakit list-archs`` stays fast.
"""

from __future__ import annotations

import pluggy

PROJECT = "lorakit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks an arch plugin must implement for ``lorakit train`` to run.
#: A tuple entry means "one of these". ``target_modules`` is not required: without it the core
#: derives the targets from ``ArchInfo.default_targets``.
REQUIRED_TRAIN_HOOKS = (
    "arch_info",
    "load_components",
    "encode_images",
    ("encode_prompt", "encode_text"),
    "compute_loss",
    "save_lora",
)


@hookspec(firstresult=True)
def arch_info():
    """Describe the architecture.

    Returns a :class:`lorakit.arch.ArchInfo`: a one-line ``description``, the
    ``default_resolution``, the ``denoiser`` component (the one ``--target-modules``
    applies to), the ``text_encoders`` that ``--train-text-encoder`` adds LoRA to
    (empty if text-encoder LoRA is unsupported), the ``default_targets`` per component,
    and ``pipeline_class`` (the diffusers pipeline class name of the base model).
    Must not import torch.
    """


@hookspec(firstresult=True)
def recognizes_model(model_index):
    """Say whether a base model folder belongs to this arch.

    ``model_index`` is the parsed ``model_index.json`` of the model (a dict; ``{}`` if the
    folder has none). Return ``True`` or ``False``. Used to refuse a model of another
    architecture and to suggest the ``--arch`` that recognises it. Must be cheap.
    """


@hookspec(firstresult=True)
def load_components(model_path, config, device, weight_dtype):
    """Load every component the arch needs for training from ``model_path``.

    ``model_path`` is a local directory in diffusers' layout (the core resolves hub ids to
    a local snapshot first). Returns a dict of components: modules frozen
    (``requires_grad_(False)``), in eval mode, moved to ``device``; frozen weights in
    ``weight_dtype`` except where the arch knows better (e.g. a VAE that overflows in fp16).
    Non-module entries are allowed (tokenizers, schedulers, paths); the optional
    ``"default_resolution"`` entry (an int read from the model's config) is used when
    ``--resolution`` is not given.
    Raise :class:`lorakit.errors.LorakitError` with a one-line fix when the folder is not
    a model of this arch.
    """


@hookspec(firstresult=True)
def target_modules(config, components):
    """Which modules of which component receive LoRA.

    Returns ``{component_name: [module name or suffix, ...]}``. Honour
    ``config.target_modules`` (user override for the denoiser) and
    ``config.train_text_encoder`` (add the text encoders). Every listed component must
    be an ``nn.Module`` in ``components``.
    """


@hookspec(firstresult=True)
def encode_images(components, pixel_values, batch):
    """Turn images into what the loss consumes (latents, image embeddings, ...).

    ``pixel_values``: float tensor ``(B, 3, H, W)`` in ``[-1, 1]`` on the components'
    device. ``batch`` carries per-image metadata (``original_size``, ``crop_top_left``,
    ``target_size`` as ``(B, 2)`` int tensors). Returns a dict of tensors, batch first.

    Must be pure: the result depends only on the inputs and the frozen components (use
    the distribution mean, not a sample), so the core may compute it once and cache it.
    Called under ``torch.no_grad()``.
    """


@hookspec(firstresult=True)
def encode_prompt(components, captions):
    """Turn a list of captions into conditioning tensors.

    Returns a dict of tensors, batch first (``len(captions)`` rows). Pure, like
    :func:`encode_images`: the core caches results unless text-encoder LoRA is trained,
    in which case it calls this inside the training step with gradients enabled.
    """


@hookspec(firstresult=True)
def encode_text(components, captions, encoder):
    """The outputs of one text encoder for a list of captions (optional; per-encoder caching).

    ``encoder`` is one of ``ArchInfo.prompt_encoders``. Returns a dict of tensors, batch first
    (``len(captions)`` rows), with keys no other encoder uses. An arch that implements it
    lets the core cache each encoder separately: a frozen encoder's outputs are computed once
    per distinct caption even while another encoder trains. The core then builds the batch's
    conditioning by merging the dicts of every prompt encoder; ``encode_prompt`` is not
    called for training. Pure, like :func:`encode_images`.
    """


@hookspec
def check_config(config, info):
    """Validate the run's options before any model loads (every plugin of the run may answer).

    ``config`` holds every option of the run, the arch's and the modes' included, already
    type-checked and range-checked against their declarations; ``info`` is the arch's
    :class:`lorakit.arch.ArchInfo`. Raise :class:`lorakit.errors.LorakitError` with a
    one-line fix for a combination that cannot work. Must not import torch.
    """


@hookspec
def declare_options():
    """Options a *mode* plugin adds (a list of :class:`lorakit.options.Option`).

    Arch plugins declare theirs in ``ArchInfo.options``. A mode's options are accepted only
    when the mode is on, and appear in ``lorakit train --help`` under the mode's panel.
    Must not import torch.
    """


@hookspec(firstresult=True)
def compute_loss(components, batch, config, generator, rows):
    """The training objective for one micro-batch.

    ``batch`` holds the outputs of :func:`encode_images` and :func:`encode_prompt` plus
    the per-image metadata, all on the training device. Draw every random number (noise,
    timesteps) from ``rows``, a :class:`lorakit.rng.Rows` with one CPU stream per row of the
    batch (``rows.randn(shape)``, ``rand``, ``randint``, ``normal``, batch first; slice it as
    you slice the batch), or pass it to the helpers of :mod:`lorakit.objectives`: each row's
    draws then depend only on (seed, step, the sample's place in the global batch), so a run
    gives the same result on 1 or N processes and resumes exactly on any process count.
    ``generator`` (the contract before ``rows``; a plugin may keep declaring only it) is a
    CPU ``torch.Generator`` seeded per micro-batch and process: draws from it make the run
    reproducible and resumable on the same process count, not invariant across counts.
    Returns a float tensor of shape ``(B,)``: the loss of each sample, with any per-sample
    weighting (min-SNR, ...) already applied.
    """


@hookspec(firstresult=True)
def save_lora(components, lora_layers, output_dir, weight_name):
    """Write the adapter in the format the arch's diffusers loader reads.

    ``lora_layers`` maps each trained component name to ``(state_dict, metadata)``: the
    PEFT state dict of its LoRA weights and its LoRA config as a JSON-able dict. Write
    ``output_dir / weight_name`` as safetensors, metadata included, so that a reload
    reproduces the trained model exactly.
    """


@hookspec(firstresult=True)
def build_pipeline(components, config):
    """Assemble an inference pipeline from already-loaded components (LoRA included).

    Used for sample images and for images a mode generates (e.g. a prior-preservation
    mode's class images). Return ``None`` if the arch has
    no inference pipeline.
    """


@hookspec(firstresult=True)
def load_pipeline(model_path, device, dtype):
    """Load the base model's inference pipeline for ``lorakit generate``."""


@hookspec(firstresult=True)
def load_lora(pipeline, path, adapter_name):
    """Load a lorakit LoRA file into an inference pipeline as adapter ``adapter_name``.

    For pipelines that have ``load_lora_weights`` this is a thin call; for those that do
    not, the arch does the model-level load. Must reproduce the trained model exactly.
    """


@hookspec(firstresult=True)
def set_lora_scales(pipeline, adapter_names, scales):
    """Activate the named adapters with the given scales (several LoRAs at once)."""


@hookspec(firstresult=True)
def generate_images(pipeline, prompts, generator, num_inference_steps, resolution, guidance_scale):
    """Generate one PIL image per prompt with an inference pipeline.

    ``generator`` is a ``torch.Generator`` or a list with one per prompt (per-image seeds,
    diffusers' convention; a mode may use it so an interrupted generation
    resumes with the same images). ``resolution=None`` and ``guidance_scale=None`` mean the
    pipeline's defaults (for ``resolution``: the model's native size).
    """


@hookspec(firstresult=True)
def kohya_prefixes():
    """The kohya-style key prefix of each component that can carry LoRA.

    Returns ``{component_name: prefix}``, or ``None`` if the arch has no kohya convention
    (then ``lorakit convert --to kohya`` refuses it). A LoRA layer at module path ``P`` of
    the component is written as ``<prefix>_<P with '.' replaced by '_'>`` with
    ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``, ``P`` first renamed by
    :func:`kohya_module_names` where the arch implements it (kohya's own prefixes, e.g.
    ``lora_te1``, then go here). A plugin without that hook may instead put in the prefix any
    module path that the kohya reference model has above the component's own modules
    (e.g. ``"lora_te_text_model"`` for a CLIP text encoder of transformers >= 5).
    Must not import torch.
    """


@hookspec(firstresult=True)
def kohya_module_names(component, modules, model_config):
    """kohya's module path for each LoRA layer of ``component``.

    ``modules`` are module paths of the component as lorakit (diffusers/transformers) names
    them; ``model_config`` is the component's ``config.json`` as a dict, or ``None`` when no
    base model is known. Returns ``{module: kohya_path}`` (dotted, without the prefix):
    the path the same layer has in the model kohya's tools build, so the kohya key is
    ``<prefix>_<kohya_path with '.' replaced by '_'>``. Must be one-to-one; ``lorakit
    convert`` inverts it to read kohya files. Raise :class:`lorakit.LorakitError` for a
    layer that has no kohya name, or when the mapping needs ``model_config`` and it is
    ``None``. Without an implementation (or when it returns ``None``) the paths are kept.
    """


@hookspec(firstresult=True)
def kohya_metadata(model_configs):
    """The ``ss_*`` header fields kohya's tools read to tell the base model (strings).

    ``model_configs`` is ``{component: config dict}`` of the base model (empty when none is
    known). E.g. ``{"ss_base_model_version": "sd_v1", "ss_v2": "False"}``: A1111
    decides from them which checkpoints a LoRA is listed for. Return only what is known.
    """


@hookspec(firstresult=True)
def write_tiny_model(path, seed):
    """Write a tiny randomly initialised model of this arch to ``path``.

    The folder must load back through :func:`load_components` exactly like a real model
    (diffusers' layout, offline tokenizer). For tests, demos and bug reports.
    """


# --- hooks with a default in lorakit itself (modes wrap or replace them) -------------


@hookspec(firstresult=True)
def build_dataset(config, components, pm):
    """Build the training dataset: a :class:`lorakit.data.CaptionedImages`.

    lorakit's default reads ``config.data``. A mode plugin may return a different
    dataset (e.g. pairs of subject and class images) and may call arch hooks through
    ``pm.hook`` (for example to generate class images).
    """


@hookspec
def card_facts(config):
    """What a mode or arch adds to the model card of a run (every plugin's answer is used).

    Returns ``None`` or a dict with ``front_matter`` (entries merged into the card's YAML
    front matter; a list extends the card's list of the same key, e.g. ``tags``) and
    ``lines`` (markdown lines added to the card's list of training facts).
    """


@hookspec(firstresult=True)
def reduce_loss(per_sample_loss, batch, config):
    """Reduce per-sample losses to the scalar that is back-propagated.

    Returns ``(loss, metrics)``, ``metrics`` a dict of floats shown in the progress bar
    and logs. lorakit's default is the mean.
    """
