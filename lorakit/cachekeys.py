"""What an encoding depends on, hashed into its key in the persistent cache.

An image entry's key covers the image's content (sha256 of its file bytes, or of its decoded
pixels), the size it is cut to, the flip and crop position, the frozen encoders that turn it
into tensors, and the code that does it; a caption entry's key covers the caption text, the
encoder(s) and tokenizers, and the code. A changed image, size, crop, flip, model, VAE or
lorakit version therefore gives a new key: the entry is encoded again, the old one is simply
never found.

An encoder is identified by a fingerprint of the module as loaded: its class, config (less
the path it was loaded from), dtype and an xxh3-128 hash over every tensor of its state dict,
computed once per run. Hashing the tensors rather than the files' names,
sizes or mtimes catches a replaced ``--vae``, a re-saved folder and a precision change alike,
and needs no knowledge of which files make which component.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

#: source files whose code shapes every encoding (prepare_image, the VAE helpers)
_CORE_SOURCES = ("images.py", "archbase.py", "pipelines.py", "cachekeys.py")


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    from lorakit.fsutil import sha256_of

    return sha256_of(path)


def pixels_sha256(image) -> str:
    """sha256 of a decoded image (mode, size, pixels): the content of an image without a file."""
    h = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def sample_content(sample) -> str:
    """The content hash of a sample's image: its own ``digest`` when it has one (file bytes,
    dataset bytes), else the decoded pixels'."""
    if getattr(sample, "digest", None) is not None:
        return sample.digest()
    return pixels_sha256(sample.open())


def _fast_hash(first: bytes = b""):
    """xxh3-128 (``datasets`` depends on xxhash) for the bulk of weights and cached tensors: an
    identity check against accidental change, ~3x faster than sha256 here; sha256 without it."""
    try:
        import xxhash
    except ImportError:  # pragma: no cover
        return hashlib.sha256(first)
    return xxhash.xxh3_128(first)


def module_fingerprint(module) -> str:
    """Hash of a frozen module as loaded: class, config, mode and every tensor (see above)."""
    import torch

    h = _fast_hash(f"{type(module).__module__}.{type(module).__qualname__}:{module.training}".encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict = {k: v for k, v in as_dict.items() if k not in ("_name_or_path", "_commit_hash")}
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
        h.update(str(getattr(config, "_attn_implementation", "")).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy: the buffer
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what makes a tokenizer's ids: its class, full definition (vocabulary, merges,
    normalizer: the backend's JSON where it has one, else the vocabulary), length and padding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return digest(type(tokenizer).__qualname__, definition, getattr(tokenizer, "model_max_length", None),
                  getattr(tokenizer, "padding_side", None), getattr(tokenizer, "all_special_tokens", None))


def code_identity(pm, arch: str, device) -> str:
    """The code and libraries that compute encodings: lorakit's version and encoding sources,
    the plugins implementing the encode hooks (the module, every module of its subpackage, the
    version of the distribution that installed it), torch/diffusers/transformers/PIL."""
    import importlib.metadata as md

    import lorakit

    sources = [Path(lorakit.__file__).parent / name for name in _CORE_SOURCES]
    tops = set()
    for hook in (pm.hook.encode_images, pm.hook.encode_prompt, pm.hook.encode_text):
        for impl in hook.get_hookimpls():
            module = inspect.getmodule(impl.function)
            try:
                path = Path(inspect.getsourcefile(impl.function))
            except TypeError:  # pragma: no cover - a builtin has no source
                sources.append(Path(repr(impl.function)))
                continue
            sources.append(path)
            name = getattr(module, "__name__", "")
            tops.add(name.split(".")[0])
            in_subpackage = name.count(".") >= (1 if path.name == "__init__.py" else 2)
            if in_subpackage:  # a plugin package: its helpers (encoder I/O, preprocessing) count too
                sources += sorted(path.parent.glob("*.py"))
    h = hashlib.sha256()
    for path in dict.fromkeys(sources):
        h.update(str(path.name).encode())
        h.update(path.read_bytes() if path.is_file() else str(path).encode())
    installed = md.packages_distributions()
    plugin_dists = sorted({d for top in tops for d in installed.get(top, ()) if d != "lorakit"})
    versions = {}
    for dist in ("torch", "diffusers", "transformers", "pillow", "numpy", *plugin_dists):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return digest(lorakit.__version__, versions, arch, str(getattr(device, "type", device)), h.hexdigest())


class Keys:
    """Keys of one run's entries; fingerprints are computed once, when first needed."""

    def __init__(self, pm, components, info, arch: str, device, interpolation: str = "bicubic"):
        self.pm, self.components, self.info, self.arch, self.device = pm, components, info, arch, device
        self.interpolation = interpolation  # the resize filter (--image-interpolation-mode)
        self._memo: dict = {}
        self.content: dict = {}  # sample key -> content hash

    def _once(self, name, make):
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def code(self) -> str:
        return self._once("code", lambda: code_identity(self.pm, self.arch, self.device))

    def _modules(self, names) -> list[str]:
        import torch

        return [n for n in names if isinstance(self.components.get(n), torch.nn.Module)]

    def _fingerprint(self, names) -> dict:
        return {n: self._once(("module", n), lambda n=n: module_fingerprint(self.components[n])) for n in names}

    def _tokenizers(self) -> dict:
        names = [n for n, v in sorted(self.components.items())
                 if hasattr(v, "get_vocab") and hasattr(v, "model_max_length")]
        return {n: self._once(("tok", n), lambda n=n: tokenizer_fingerprint(self.components[n])) for n in names}

    def _processors(self) -> dict:
        """transformers image processors / feature extractors among the components (their resize,
        crop and normalisation shape image encodings, e.g. a CLIP vision encoder's input)."""
        try:
            from transformers.feature_extraction_utils import FeatureExtractionMixin
            from transformers.image_processing_base import ImageProcessingMixin
        except ImportError:  # pragma: no cover - transformers is a dependency
            return {}
        kinds = (FeatureExtractionMixin, ImageProcessingMixin)
        return {n: digest(type(v).__qualname__, v.to_json_string()) for n, v in sorted(self.components.items())
                if isinstance(v, kinds)}

    def _all_but(self, excluded) -> list[str]:
        return self._modules(n for n in sorted(self.components) if n not in excluded)

    def image_encoders(self) -> dict:
        """The input encoders (all frozen modules but the denoiser when the arch names none)."""
        names = self._modules(self.info.input_encoders) or self._all_but({self.info.denoiser})
        return self._once("images", lambda: digest(self._fingerprint(names), self._processors(), self.code()))

    def text_encoders(self, encoder: str | None) -> str:
        """One prompt encoder (``encode_text``), or every module but the denoiser and the input
        encoders (``encode_prompt``, which may use any), with every tokenizer."""
        names = [encoder] if encoder else self._all_but({self.info.denoiser, *self.info.input_encoders})
        return self._once(("text", encoder), lambda: digest(self._fingerprint(names), self._tokenizers(), self.code()))

    def content_of(self, sample) -> str:
        if sample.key not in self.content:
            self.content[sample.key] = sample_content(sample)
        return self.content[sample.key]

    def image(self, sample, size, flip: bool) -> str:
        """Key of a centre-cropped image at ``size = (w, h)`` (crop and resize follow from the
        content, the size, the flip and the resize filter; the code that derives them is in :meth:`code`)."""
        return digest("image", self.image_encoders(), self.content_of(sample), list(size), bool(flip), "centre",
                      self.interpolation)

    def text(self, caption: str, encoder: str | None) -> str:
        return digest("text", self.text_encoders(encoder), encoder, caption)
