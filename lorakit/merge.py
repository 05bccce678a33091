"""``lorakit merge``: several LoRAs of one arch as one file whose effect is their weighted sum.

Exact by concatenating ranks: for each layer, the inputs' ``lora_A`` rows are stacked and
their ``lora_B`` columns placed side by side, each ``B`` multiplied by its input's weight and
scale (alpha / rank, or alpha / sqrt(rank) with rslora), so that

    B_merged @ A_merged = sum_i  w_i * scale_i * B_i @ A_i

and the merged layer's alpha equals its rank (scale 1). Layers of lower rank (one only some
inputs have, merged from those) are padded with zero rows and columns to the component's
largest rank, and the targets are the inputs' own target names: the file's config is then one
rank and one alpha, no per-layer patterns, so it matches the layers under transformers 4 and 5
alike (patterns and full paths would name CLIP layers in one layout only) and every peft that
diffusers loads with reads it.
With ``rank`` the merged change of each layer is truncated by SVD to that rank and the
relative Frobenius error ``|D - D_r| / |D|`` reported, per layer and overall.

Inputs are read by :mod:`lorakit.formats.read` (every format lorakit reads); the result is a
lorakit/diffusers-format file, written by :mod:`lorakit.formats.write` (atomically).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from lorakit.errors import LorakitError

_LAYER = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


@dataclasses.dataclass
class MergeResult:
    path: Path
    layers: int
    #: ``{component.module: relative Frobenius error}`` of the truncation (empty when exact)
    errors: dict
    #: overall relative Frobenius error over every layer (0.0 when exact)
    error: float
    rank: int | None

    def summary(self) -> str:
        if self.rank is None:
            return f"wrote {self.path} ({self.layers} layers, exact: ranks concatenated)"
        worst = max(self.errors, key=self.errors.get) if self.errors else "none"
        return (f"wrote {self.path} ({self.layers} layers at rank <= {self.rank}; relative Frobenius error "
                f"{self.error:.4g} overall, worst {self.errors.get(worst, 0.0):.4g} at {worst})")


def parse_weights(text: str | None, count: int) -> list[float]:
    """``"0.7,0.3"`` -> ``[0.7, 0.3]``: one finite number per input (all 1.0 when not given)."""
    if text is None or text == "":
        return [1.0] * count
    parts = [p.strip() for p in str(text).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        raise LorakitError(f"--weights {text}: write one number per LoRA, separated by commas (e.g. 0.7,0.3).") from None
    if not all(math.isfinite(w) for w in weights):
        raise LorakitError(f"--weights {text}: every weight must be a finite number.")
    if len(weights) != count:
        raise LorakitError(f"--weights {text} gives {len(weights)} weights for {count} LoRAs; give one per LoRA.")
    return weights


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern``: a key matches a module path suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def layer_scale(meta: dict, module: str, rank: int) -> float:
    """The factor PEFT multiplies ``B @ A`` by for ``module`` under the adapter config ``meta``."""
    alpha = float(_pattern_value(meta.get("alpha_pattern"), module, meta.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if meta.get("use_rslora") else alpha / rank


def _pairs(state: dict, source, component: str) -> dict:
    """``{module: (A, B)}`` of one component's PEFT state dict; anything but plain LoRA refused."""
    pairs: dict = {}
    for key, tensor in state.items():
        match = _LAYER.match(key)
        if not match:
            raise LorakitError(f"{source}: {component}.{key} is not a plain LoRA weight (lora_A/lora_B); "
                               "DoRA, LoRA biases and saved modules cannot be merged.")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LorakitError(f"{source}: layer {component}.{module} lacks lora_A or lora_B; the file is incomplete.")
    return {m: (p["A"], p["B"]) for m, p in pairs.items()}


def _check_plain(meta: dict, source, component: str) -> None:
    for field in ("use_dora", "lora_bias"):
        if meta.get(field):
            raise LorakitError(f"{source}: its {component} LoRA uses {field}, which a rank-concatenated merge "
                               "cannot hold; merge plain LoRAs.")


def _trained_arch(file: Path) -> str | None:
    """The ``--arch`` a lorakit run folder's config says its LoRA was trained with."""
    import json

    try:
        return json.loads((file.parent / "lorakit_config.json").read_text()).get("arch")
    except (OSError, ValueError, AttributeError):
        return None


def read_inputs(pm, arch: str, sources, model_dir) -> list[tuple[Path, dict]]:
    """Each input as ``(path, {component: (state, metadata)})`` (any format lorakit reads);
    one its run says was trained for another arch is refused."""
    from lorakit.formats.read import open_lora, read_layers

    out = []
    for source in sources:
        lora = open_lora(source)
        trained = _trained_arch(lora.path)
        if trained and trained != arch:
            raise LorakitError(f"LoRA {lora.path} was trained with --arch {trained} (its lorakit_config.json says "
                               f"so), not {arch}; merge LoRAs of one arch.")
        layers = read_layers(lora, pm, model_dir)
        info = pm.hook.arch_info()
        stray = sorted(set(layers) - {info.denoiser, *info.text_encoders})
        if stray:
            raise LorakitError(f"LoRA {lora.path} holds layers of '{stray[0]}', which --arch {arch} has no LoRA for; "
                               "it was trained for another arch.")
        out.append((lora.path, layers))
    return out


def merge_layers(inputs, weights) -> tuple[dict, dict]:
    """``({component: {module: (A, B)}}, {component: target names})`` of the exact merge (B
    carries weight and scale; alpha = rank)."""
    import torch

    terms: dict = {}
    targets: dict = {}
    for (source, layers), weight in zip(inputs, weights):
        for component, (state, meta) in layers.items():
            _check_plain(meta, source, component)
            pairs = _pairs(state, source, component)
            names = meta.get("target_modules")
            targets.setdefault(component, set()).update(names if isinstance(names, (list, tuple)) else pairs)
            for module, (a, b) in pairs.items():
                rank = a.shape[0]
                terms.setdefault(component, {}).setdefault(module, []).append(
                    (source, a.float(), b.float() * (weight * layer_scale(meta, module, rank))))
    merged = {}
    for component, modules in terms.items():
        _check_layouts(component, modules)
        merged[component] = {}
        for module, parts in modules.items():
            first, a0, b0 = parts[0]
            other = next(((src, a, b) for src, a, b in parts if _shape(a, b) != _shape(a0, b0)), None)
            if other is not None:
                raise LorakitError(
                    f"layer {component}.{module} has shape {_shape(a0, b0)} in {first} but {_shape(other[1], other[2])} "
                    f"in {other[0]}: the LoRAs are for different models; merge LoRAs of one base model."
                )
            a = torch.cat([a for _, a, _ in parts], dim=0)
            b = torch.cat([b for _, _, b in parts], dim=1)
            merged[component][module] = (a.contiguous(), b.contiguous())
    return merged, targets


def pad(a, b, rank: int):
    """``(A, B)`` of rank ``rank`` with the same ``B @ A``: zero rows of A, zero columns of B."""
    import torch

    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    a = torch.cat([a, a.new_zeros(extra, *a.shape[1:])], dim=0)
    b = torch.cat([b, b.new_zeros(b.shape[0], extra, *b.shape[2:])], dim=1)
    return a.contiguous(), b.contiguous()


def _shape(a, b) -> tuple:
    """The shape of the weight a LoRA pair ``(A, B)`` changes."""
    return (b.shape[0], *a.shape[1:])


def _check_layouts(component: str, modules: dict) -> None:
    """One layer named in both transformers layouts (with and without ``text_model.``) would be
    two layers in the merged file: refused, since only the base model tells which is which."""
    names = set(modules)
    both = next((m for m in names if m.startswith("text_model.") and m[len("text_model."):] in names), None)
    if both:
        raise LorakitError(f"the LoRAs name {component}.{both} in two module layouts; pass --model (the base "
                           "model) so their layers can be matched.")


def _check_targets(component: str, factors: dict, targets: set) -> None:
    """Every merged layer is one the target names select (PEFT's rule: the name or a dotted suffix)."""
    stray = next((m for m in factors if not any(m == t or m.endswith("." + t) for t in targets)), None)
    if stray:
        raise LorakitError(f"layer {component}.{stray} is not among its LoRA's own target modules; the file "
                           "is inconsistent, so it cannot be merged.")


def truncate(a, b, rank: int):
    """``(A_r, B_r, relative error, |D|^2, |D - D_r|^2)``: the best rank-``rank`` factors of
    ``D = B @ A`` (SVD of the small core of the factors' QR decompositions: D itself is never
    formed)."""
    import torch

    a2, b2 = a.flatten(1).double(), b.flatten(1).double()
    qb, rb = torch.linalg.qr(b2)
    qa, ra = torch.linalg.qr(a2.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    b_r = ((qb @ u[:, :r]) * root).float().reshape(b.shape[0], r, *b.shape[2:])
    a_r = (root[:, None] * (vh[:r] @ qa.T)).float().reshape(r, *a.shape[1:])
    norm2, rest = float((s ** 2).sum()), float((s[r:] ** 2).sum())
    return a_r.contiguous(), b_r.contiguous(), (math.sqrt(rest / norm2) if norm2 > 0 else 0.0), norm2, rest


def merge(arch: str, sources, output, weights=None, rank: int | None = None, model=None,
          overwrite: bool = False) -> MergeResult:
    """Write the weighted sum of the LoRAs ``sources`` (files or output folders) to ``output``."""
    from peft import LoraConfig

    from lorakit.formats.write import write_layers
    from lorakit.lora import adapter_metadata
    from lorakit.models import resolve_model
    from lorakit.plugins import get_plugin_manager

    sources = list(sources)
    if len(sources) < 1:
        raise LorakitError("merge needs at least one LoRA file.")
    weights = list(weights) if weights is not None else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise LorakitError(f"--weights gives {len(weights)} weights for {len(sources)} LoRAs; give one per LoRA.")
    if rank is not None and rank < 1:
        raise LorakitError(f"--rank must be at least 1, got {rank}.")
    output = Path(output).expanduser()
    if output.suffix != ".safetensors":
        raise LorakitError(f"--output {output} must end in .safetensors; lorakit writes LoRA files as safetensors only.")
    if output.is_dir():
        raise LorakitError(f"--output {output} is a folder; pass a .safetensors file path.")
    if output.exists() and not overwrite:
        raise LorakitError(f"--output {output} exists; pass --overwrite or another --output.")
    pm = get_plugin_manager(arch)
    model_dir = resolve_model(str(model), flag="--model") if model else None
    merged, targets = merge_layers(read_inputs(pm, arch, sources, model_dir), weights)

    layers, errors, total, lost = {}, {}, 0.0, 0.0
    for component, modules in merged.items():
        factors = {}
        for module, (a, b) in sorted(modules.items()):
            if rank is not None:
                a, b, err, norm2, rest = truncate(a, b, rank)
                errors[f"{component}.{module}"] = err
                total, lost = total + norm2, lost + rest
            factors[module] = (a, b)
        r = max(a.shape[0] for a, _ in factors.values())
        _check_targets(component, factors, targets[component])
        state = {}
        for module, (a, b) in factors.items():
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = pad(a, b, r)
        config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted(targets[component]))  # the scale is in B
        layers[component] = (state, adapter_metadata(config))
    try:
        path = write_layers(pm, layers, output, "lorakit", model_dir=model_dir, overwrite=overwrite)
    except OSError as exc:
        from lorakit.fsutil import is_disk_full

        if not is_disk_full(exc):
            raise
        raise LorakitError(f"the disk is full: {output} was not written; free space there or pick another --output.") from None
    count = sum(len(m) for m in merged.values())
    return MergeResult(path, count, errors, math.sqrt(lost / total) if total > 0 else 0.0, rank)
