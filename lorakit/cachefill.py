"""Filling the persistent encoding cache: only the missing entries are encoded, split between
the run's processes, then every process reads the shared cache.

The missing entries are grouped into the chunks the in-memory cache would encode (images by
size, then captions, ``CACHE_CHUNK`` at a time, in the same order), so a run on an empty
cache computes exactly the tensors it would hold in memory. With N processes, process r
encodes chunks r, r+N, ...; after a barrier each reads what the others sealed. An entry still
missing then (a cache folder that is not shared between machines) is encoded locally.

Progress: the main process shows its own share (done / total, rate, ETA) through the run's
progress display when it has a ``task`` (a bar on a terminal, a line every ~10% in a log),
else as a ``note`` line every ~10%. With N processes it is this process's share, labelled
so: the others' counts would need a collective during the fill (their shards are sealed
every ``SHARD_BYTES``, too seldom to count by).
"""

from __future__ import annotations

import contextlib

from lorakit.cache import image_chunk
from lorakit.images import Augment
from lorakit.progress import TaskLines


def fill_disk(cache, samples, note, progress=None) -> None:
    store, keys, batches, config = cache.store, cache.keys, cache.batches, cache.config
    jobs: list = []  # (kind, encoder, [(key, payload), ...]) in the in-memory cache's order
    if cache.cache_images:
        for s in samples:  # sizes known from earlier runs: no decoding just to learn them
            known = store.image_sizes.get(keys.content_of(s))
            if known is not None:
                batches._image_sizes.setdefault(s.key, known)
        flips = (False, True) if config.random_flip else (False,)
        by_size: dict = {}
        for s in samples:
            for f in flips:
                by_size.setdefault(batches.size_of(s), []).append((s, f))
        for size in sorted(by_size):
            missing = {}
            for s, f in by_size[size]:
                key = keys.image(s, size, f)
                cache.image_cache.keys_by_name[(s.key, f)] = key
                if key not in store:
                    missing.setdefault(key, (s, f))
            jobs += _chunks("image", None, list(missing.items()), image_chunk(size))
    if cache.cache_prompts or cache.cached_encoders:
        captions = sorted({s.caption for s in samples} | ({""} if config.caption_dropout else set()))
        targets = ([(None, cache.prompt_cache)] if cache.cache_prompts else []) + [
            (e, cache.text_cache.setdefault(e, cache.lazy())) for e in cache.cached_encoders
        ]
        for encoder, entries in targets:
            missing = {}
            for caption in captions:
                key = keys.text(caption, encoder)
                entries.keys_by_name[caption] = key
                if key not in store:
                    missing.setdefault(key, caption)
            jobs += _chunks("text", encoder, list(missing.items()), cache.chunk)
    total = sum(len(items) for _, _, items in jobs)
    note(f"encoding cache {store.folder.parent}: {total} entries to encode, {len(store)} on disk")
    world, rank = batches.world, batches.rank
    progress = progress if rank == 0 and callable(getattr(progress, "task", None)) else None
    share = "caching" if world == 1 else f"caching (this process's share, {rank + 1} of {world})"
    _encode(cache, jobs[rank::world], _counter(progress, note, share))
    if world > 1:
        cache.barrier()
        store.refresh()
        left = [(kind, e, [(k, p) for k, p in items if k not in store]) for kind, e, items in jobs]
        _encode(cache, left, _counter(progress, note, "caching (what the other processes' shards did not bring)"))


def _counter(progress, note, label: str):
    """``(items) -> context yielding advance(n)``: a task of the progress display, or note lines."""
    def start(total: int):
        if progress is not None and total:
            return progress.task(label, total, "entries")
        return contextlib.nullcontext(TaskLines(note, label, total, "entries of this process"))
    return start


def _chunks(kind, encoder, items, size):
    return [(kind, encoder, items[i : i + size]) for i in range(0, len(items), size)]


def _encode(cache, jobs, counter) -> None:
    """Encode ``jobs`` and seal them into this process's shards, counting what is done."""
    mine = sum(len(items) for _, _, items in jobs)
    with counter(mine) as done:
        for kind, encoder, items in jobs:
            if items:
                _encode_chunk(cache, kind, encoder, items)
                done.advance(len(items))
    cache.store.flush()


def _encode_chunk(cache, kind, encoder, items) -> None:
    """Encode one chunk (images of one size, or captions for one encoder) into the store."""
    store = cache.store
    if kind == "image":
        prepared = [cache.prepare(s, Augment(flip=f)) for _, (s, f) in items]
        encoded = cache.encode_images(prepared)
        for j, (key, (s, _)) in enumerate(items):
            (h, w) = prepared[j][1]
            info = {"content": cache.keys.content_of(s), "image_size": [w, h]}
            store.put(key, {k: v[j] for k, v in encoded.items()}, info)
        cache.encoded["images"] += len(items)
    else:
        captions = [c for _, c in items]
        encoded = (cache.encode_text(captions, encoder, grad=False) if encoder
                   else cache.encode_prompt(captions, grad=False))
        for j, (key, _) in enumerate(items):
            store.put(key, {k: v[j] for k, v in encoded.items()})
        cache.encoded["text"] += len(items)
