"""The encoding cache: each image (both flips when flipping) and each caption is encoded
once, in a fixed order, by the frozen encoders; a batch is then assembled from the cache.

Text is cached per encoder when the arch implements ``encode_text``: a frozen encoder's
outputs are computed once per distinct caption even while another encoder trains LoRA
(that one runs inside the step, with gradients). Without ``encode_text``, prompts are cached
all-or-nothing through ``encode_prompt``. Once every frozen input is cached, the encoders
that produced it are released from the device (see :meth:`EncodingCache.release`).

With ``--disk-cache`` (the default) the encodings live in the persistent, memory-mapped
cache of :mod:`lorakit.diskcache`: only missing entries are encoded (split between the run's
processes, :mod:`lorakit.cachefill`), and batches read their rows from disk, so memory does
not grow with the dataset. ``--no-disk-cache`` keeps this run's encodings in RAM instead.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections import Counter

from lorakit.data import Augment, augment_for, caption_dropped, crop_geometry, prepare_image
from lorakit.errors import PluginError

log = logging.getLogger("lorakit")

CACHE_CHUNK = 8
#: pixels encoded at once while caching: a VAE encoder's activations are ~2.5 GB per 1024x1024
#: image in fp32, so eight at once would need ~20 GB next to the model (an OOM on 24 GB GPUs)
CACHE_PIXELS = 1024 * 1024


def image_chunk(size) -> int:
    """How many images of ``size = (w, h)`` are encoded at once while caching: ``CACHE_CHUNK``,
    fewer for large images (one 1024 px image at a time, four of 512 px)."""
    w, h = size
    return max(1, min(CACHE_CHUNK, CACHE_PIXELS // max(1, w * h)))


def check_batch_first(out: dict, hook: str, arch: str, rows: int) -> dict:
    """``out`` as the hook contract states it: every tensor batch first with ``rows`` rows."""
    import torch

    if not isinstance(out, dict):
        raise PluginError(f"arch plugin '{arch}': {hook} returned {type(out).__name__}, expected a dict of tensors")
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] != rows):
            raise PluginError(
                f"arch plugin '{arch}': {hook} returned {key!r} of shape {tuple(value.shape)}, "
                f"expected batch first with {rows} rows ({rows}, ...)"
            )
    return out


class EncodingCache:
    """Encodings of one run's frozen encoders and the micro-batches built from them."""

    chunk = CACHE_CHUNK

    def __init__(self, pm, components, config, info, batches, device, trained, reload=None, barrier=None):
        self.pm, self.components, self.config, self.info = pm, components, config, info
        self.batches, self.device, self.trained = batches, device, list(trained)
        self.reload = reload  # () -> freshly loaded components, to bring a dropped encoder back
        self.barrier = barrier or (lambda: None)  # every process of the run waits here
        self.encoded: Counter = Counter()  # entries this process encoded into the disk cache
        self.store = None
        if config.cache and getattr(config, "disk_cache", False):
            from lorakit.cachekeys import Keys
            from lorakit.diskcache import open_store

            self.store = open_store(config, rank=batches.rank)
            self.keys = Keys(pm, components, info, config.arch, device, getattr(config, "image_interpolation_mode", None) or "bicubic")
        self.image_cache = self.lazy()
        self.prompt_cache = self.lazy()
        self.text_cache: dict = {}
        self.released: list[str] = []
        self.cache_images = config.cache and config.center_crop
        self.per_encoder = bool(info.prompt_encoders) and bool(pm.hook.encode_text.get_hookimpls())
        frozen = [e for e in info.prompt_encoders if e not in self.trained]
        #: per-encoder path: frozen encoders cached, frozen ones run fresh (--no-cache), trained ones
        self.cached_encoders = frozen if self.per_encoder and config.cache else []
        self.fresh_encoders = frozen if self.per_encoder and not config.cache else []
        self.step_encoders = [e for e in info.prompt_encoders if e in self.trained] if self.per_encoder else []
        trained_text = [n for n in self.trained if n in info.text_encoders]
        self.cache_prompts = not self.per_encoder and config.cache and not trained_text

    # ------------------------------------------------------------------ filling
    def fill(self, note=log.info, progress=None) -> None:
        """Encode every image (both flips if flipping) and caption once, in a fixed order;
        ``progress`` (the run's display, with ``task``) shows the disk cache filling."""
        samples = self.batches.dataset.samples()
        if self.store is not None:
            from lorakit.cachefill import fill_disk

            return fill_disk(self, samples, note, progress)
        if self.cache_images:
            flips = (False, True) if self.config.random_flip else (False,)
            todo = [(s, f) for s in samples for f in flips]
            note(f"caching {len(todo)} image encodings")
            by_size: dict = {}  # images of different sizes cannot be stacked: encode per bucket
            for s, f in todo:
                by_size.setdefault(self.batches.size_of(s), []).append((s, f))
            for size in sorted(by_size):
                group = by_size[size]
                step = image_chunk(size)
                for i in range(0, len(group), step):
                    chunk = group[i : i + step]
                    augments = [Augment(flip=f) for _, f in chunk]
                    encoded = self.encode_images(self.batches.prepared(self.prepare, [s for s, _ in chunk], augments))
                    for j, (s, f) in enumerate(chunk):
                        self.image_cache[(s.key, f)] = {k: v[j].to("cpu") for k, v in encoded.items()}
        if not (self.cache_prompts or self.cached_encoders):
            return
        captions = sorted({s.caption for s in samples} | ({""} if self.config.caption_dropout else set()))
        for i in range(0, len(captions), CACHE_CHUNK):
            chunk = captions[i : i + CACHE_CHUNK]
            if self.cache_prompts:
                _store(self.prompt_cache, chunk, self.encode_prompt(chunk, grad=False))
            for encoder in self.cached_encoders:
                _store(self.text_cache.setdefault(encoder, {}), chunk, self.encode_text(chunk, encoder, grad=False))

    def lazy(self):
        """An empty cache of entries: read from the disk cache, or a dict in RAM."""
        from lorakit.diskcache import LazyEntries

        return {} if self.store is None else LazyEntries(self.store)

    # ------------------------------------------------------------------ encoders
    def encode_images(self, prepared) -> dict:
        import torch

        self._bring_back(self.info.input_encoders)
        pixels = torch.stack([p[0] for p in prepared]).to(self.device)
        with torch.no_grad():
            out = self.pm.hook.encode_images(components=self.components, pixel_values=pixels, batch=self.meta(prepared))
        return check_batch_first(out, "encode_images", self.config.arch, len(prepared))

    def encode_prompt(self, captions, grad: bool) -> dict:
        import torch

        self._bring_back(self.prompt_modules())
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = self.pm.hook.encode_prompt(components=self.components, captions=captions)
        return check_batch_first(out, "encode_prompt", self.config.arch, len(captions))

    def encode_text(self, captions, encoder: str, grad: bool) -> dict:
        import torch

        self._bring_back((encoder,))
        with contextlib.nullcontext() if grad else torch.no_grad():
            out = self.pm.hook.encode_text(components=self.components, captions=captions, encoder=encoder)
        return check_batch_first(out, "encode_text", self.config.arch, len(captions))

    def prompt_modules(self) -> list[str]:
        """The modules ``encode_prompt`` runs: the arch's prompt encoders, else its text encoders
        (an arch that encodes prompts all at once need not list them twice)."""
        return list(self.info.prompt_encoders or self.info.text_encoders)

    # ------------------------------------------------------------------ batches
    def augment(self, epoch, sample) -> Augment:
        c = self.config
        return augment_for(c.seed, epoch, sample.random_key, c.random_flip, not c.center_crop)

    def prepare(self, sample, augment):
        """``(pixels, original (h, w), crop (top, left), target (h, w))`` of one sample."""
        size = self.batches.size_of(sample)
        mode = getattr(self.config, "image_interpolation_mode", None) or "bicubic"
        return (*prepare_image(sample.open(), self.batches.resolution, augment, size, mode), (size[1], size[0]))

    def meta(self, prepared) -> dict:
        import torch

        return {
            name: torch.tensor([p[i] for p in prepared], dtype=torch.long, device=self.device)
            for i, name in ((1, "original_size"), (2, "crop_top_left"), (3, "target_size"))
        }

    def cached_geometry(self, sample, augment):
        """What :meth:`prepare` returns for a cached (centre-cropped) image, without pixels."""
        w, h = self.batches.image_size(sample)
        size = self.batches.size_of(sample)
        _, crop = crop_geometry(w, h, size, augment)
        return None, (h, w), crop, (size[1], size[0])

    def make_batch(self, epoch: int, indices: list[int], dataset=None) -> dict:
        """Assemble one micro-batch: encodings (cached or fresh), captions and metadata; the
        outputs of trained text encoders are added in the step (:meth:`add_trained_text`)."""
        import torch

        dataset = self.batches.dataset if dataset is None else dataset
        samples = [dataset.examples[i][pos] for pos in range(dataset.group_size) for i in indices]
        augments = [self.augment(epoch, s) for s in samples]
        names = [(s.key, a.flip) for s, a in zip(samples, augments)]
        rows = _rows(self.image_cache, names) if self.cache_images else None
        if rows is not None:
            images = _stacked(rows, self.device)
            meta = self.meta([self.cached_geometry(s, a) for s, a in zip(samples, augments)])
        else:
            prepared = self.batches.prepared(self.prepare, samples, augments)
            images, meta = self.encode_images(prepared), self.meta(prepared)
        c = self.config
        captions = ["" if caption_dropped(c.seed, epoch, s.random_key, c.caption_dropout) else s.caption for s in samples]
        batch = {**images, **meta, "captions": captions}
        if self.cache_prompts:
            rows = _rows(self.prompt_cache, captions)
            batch.update(self.encode_prompt(captions, grad=False) if rows is None else _stacked(rows, self.device))
        for encoder in self.cached_encoders + self.fresh_encoders:
            rows = _rows(self.text_cache.get(encoder, {}), captions)
            if rows is not None:
                batch.update(_stacked(rows, self.device))
            else:
                batch.update(self.encode_text(captions, encoder, grad=False))
        for key in sorted({k for s in samples for k in s.extras}):
            batch[key] = torch.tensor([s.extras.get(key, 0) for s in samples], device=self.device)
        return batch

    def add_trained_text(self, batch: dict) -> None:
        """The outputs of the text encoders that train LoRA, with gradients (inside the step)."""
        if self.per_encoder:
            for encoder in self.step_encoders:
                batch.update(self.encode_text(batch["captions"], encoder, grad=True))
        elif not self.cache_prompts:
            batch.update(self.encode_prompt(batch["captions"], grad=True))

    # ------------------------------------------------------------------ release
    def releasable(self) -> list[str]:
        """Frozen encoders whose every output is cached: not needed again for training."""
        import torch

        names = list(self.info.input_encoders) if self.cache_images else []
        names += self.cached_encoders if self.per_encoder else (self.prompt_modules() if self.cache_prompts else [])
        keep = set(self.trained) | {self.info.denoiser}
        return [n for n in dict.fromkeys(names) if n not in keep and isinstance(self.components.get(n), torch.nn.Module)]

    def release(self, drop: bool, note=log.info) -> list[str]:
        """Move the releasable encoders off the device; with ``drop``, out of memory too."""
        names = self.releasable()
        if names:
            note(f"inputs cached: {', '.join(names)} " + ("freed" if drop else "moved to the CPU until sample images"))
        for name in names:
            self.components[name].to("cpu")
            if drop:
                self.components[name] = None
        if drop and names:
            gc.collect()
        self.released = names
        return names

    @contextlib.contextmanager
    def encoders_on_device(self):
        """The released (not dropped) encoders back on the device for a while (sample images)."""
        kept = [n for n in self.released if self.components.get(n) is not None]
        for name in kept:
            self.components[name].to(self.device)
        try:
            yield
        finally:
            for name in kept:
                self.components[name].to("cpu")

    def _bring_back(self, names) -> None:
        """An input outside the cache (e.g. a held-out set) needs its released encoders back."""
        back = [n for n in self.released if n in names]
        if not back:
            return
        dropped = [n for n in back if self.components.get(n) is None]
        if dropped:
            fresh = self.reload()
            for name in dropped:
                self.components[name] = fresh[name]
        for name in back:
            self.components[name].to(self.device)
        log.info("encoding outside the cache: brought back %s", ", ".join(back))
        self.released = [n for n in self.released if n not in back]


def _store(cache: dict, captions, encoded: dict) -> None:
    for j, caption in enumerate(captions):
        cache[caption] = {k: v[j].detach().to("cpu") for k, v in encoded.items()}


def _rows(cache, names) -> list | None:
    """The cached entries of ``names``, or None when one is missing (or damaged on disk)."""
    rows = []
    for name in names:
        row = cache.get(name)
        if row is None:
            return None
        rows.append(row)
    return rows


def _stacked(rows: list[dict], device) -> dict:
    import torch

    return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
