"""Aspect-ratio buckets (``--buckets``): train on images close to their own shape.

Each image goes to the bucket ``(width, height)`` whose aspect ratio is nearest its own,
from a fixed list that depends on the resolution only:

* both sides are multiples of :func:`bucket_multiple` -- 64, or 8 below 256 px, so small
  resolutions (tiny test models) still get several buckets -- and of the arch's
  ``size_multiple`` (the step is their least common multiple);
* landscape buckets take every width ``w`` from ``resolution`` to ``2 * resolution`` in steps
  of that multiple, with the largest height ``h`` (a multiple) such that ``w * h <= resolution²``;
  portrait buckets are their transposes; aspect ratios outside ``[1/4, 4]`` are dropped.

A batch holds images of one bucket only. The order of an epoch is a pure function of
(seed, epoch): each bucket's examples are shuffled, cut into global batches (a short last
batch of a bucket is filled up by repeating that bucket's examples from its start, so
every image is seen each epoch and a small bucket still trains), and the list of batches is
shuffled. Nothing here imports torch.
"""

from __future__ import annotations

import math
import random
from collections import Counter

MAX_ASPECT = 4.0


def bucket_multiple(resolution: int) -> int:
    return 64 if resolution >= 256 else 8


def make_buckets(resolution: int, multiple: int = 8) -> list[tuple[int, int]]:
    """Every ``(width, height)`` bucket for ``resolution``, sorted, square included; every
    side a multiple of ``multiple`` (the arch's size multiple) too."""
    m = math.lcm(bucket_multiple(resolution), multiple)
    area = resolution * resolution
    landscape = set()
    first = -(-resolution // multiple) * multiple  # the resolution itself when it is a multiple
    for w in range(first, 2 * resolution + 1, m):
        h = (area // w) // m * m
        if h >= m and w / h <= MAX_ASPECT:
            landscape.add((w, h))
    return sorted(landscape | {(h, w) for w, h in landscape})


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to ``width / height``; on a tie,
    the larger area, then the first in ``buckets``."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def bucketed_batches(buckets_of: list[tuple[int, int]], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of example indices for ``epoch``; ``buckets_of[i]`` is example i's bucket."""
    rng = random.Random(seed * 1_000_003 + epoch)
    members: dict[tuple[int, int], list[int]] = {}
    for index, bucket in enumerate(buckets_of):
        members.setdefault(bucket, []).append(index)
    batches = []
    for bucket in sorted(members):
        order = list(members[bucket])
        rng.shuffle(order)
        short = -len(order) % global_batch
        order += [order[i % len(order)] for i in range(short)]
        batches += [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    rng.shuffle(batches)
    return batches


def summary(buckets_of: list[tuple[int, int]]) -> str:
    """``"buckets: 64x64 (4), 80x48 (2)"``: each bucket used, most images first."""
    counts = Counter(buckets_of)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return "buckets: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in ranked)
