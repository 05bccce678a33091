"""Filling the persistent encoding cache: only the missing entries are encoded, split between
the run's processes, then every process reads the shared cache.

The missing entries are grouped into the chunks the in-memory cache would encode (images by
size, then captions, ``CACHE_CHUNK`` at a time, in the same order), so a run on an empty
cache computes exactly the tensors it would hold in memory. With N processes, process r
encodes chunks r, r+N, ...; after a barrier each reads what the others sealed. An entry still
missing then (a cache folder that is not shared between machines) is encoded locally.
"""

from __future__ import annotations

import time

from lorakit.images import Augment


def fill_disk(cache, samples, note) -> None:
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
            jobs += _chunks("image", None, list(missing.items()), cache.chunk)
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
    _encode(cache, jobs[rank::world], note, total)
    if world > 1:
        cache.barrier()
        store.refresh()
        _encode(cache, [(kind, e, [(k, p) for k, p in items if k not in store]) for kind, e, items in jobs], note, None)


def _chunks(kind, encoder, items, size):
    return [(kind, encoder, items[i : i + size]) for i in range(0, len(items), size)]


def _encode(cache, jobs, note, total) -> None:
    """Encode ``jobs`` and seal them into this process's shards, noting progress every ~10%."""
    store, done, shown, started = cache.store, 0, 0, time.perf_counter()
    mine = sum(len(items) for _, _, items in jobs)
    for kind, encoder, items in jobs:
        if not items:
            continue
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
        done += len(items)
        if total and done - shown >= max(1, mine // 10):
            shown = done
            rate = done / max(time.perf_counter() - started, 1e-9)
            note(f"caching: {done}/{mine} entries of this process ({rate:.1f}/s)")
    store.flush()
