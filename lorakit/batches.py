"""Data order and sizes: which examples each process trains on, in which micro-batch, at
which size.

The order of an epoch is a pure function of (seed, epoch) and the global batch
(``batch_size x processes``); each process takes its slice. Without ``--buckets`` every
example trains at the square resolution; with it, at its aspect-ratio bucket
(:mod:`lorakit.buckets`), one bucket per batch.
"""

from __future__ import annotations

from lorakit import buckets
from lorakit.errors import LorakitError

#: Steps of a run given neither --max-steps nor --epochs.
DEFAULT_MAX_STEPS = 1000


def checked_resolution(config, info, native=None) -> int:
    """The square training resolution (``--resolution``, else the model's, else the arch's),
    refused in one line when it is not a multiple of the arch's ``size_multiple``."""
    resolution, m = int(config.resolution or native or info.default_resolution), info.size_multiple
    if resolution % m:
        lower, upper = resolution // m * m, (resolution // m + 1) * m
        raise LorakitError(
            f"--resolution {resolution} is not a multiple of {m} (--arch {config.arch} needs sides in steps of "
            f"{m}); use {lower or upper} or {upper}."
        )
    return resolution


class Batches:
    """Micro-batches of example indices of ``dataset`` for process ``rank`` of ``world``."""

    def __init__(self, dataset, config, resolution: int, world: int = 1, rank: int = 0, multiple: int = 8):
        self.dataset, self.config, self.resolution = dataset, config, resolution
        self.world, self.rank, self.multiple = world, rank, multiple
        self._image_sizes: dict = {}
        self._bucket_list = None
        self._per_epoch = None

    def size_of(self, sample) -> tuple[int, int]:
        """The ``(width, height)`` a sample is trained at: its bucket, or the square."""
        if not self.config.buckets:
            return (self.resolution, self.resolution)
        if self._bucket_list is None:
            self._bucket_list = buckets.make_buckets(self.resolution, self.multiple)
        return buckets.nearest_bucket(*self.image_size(sample), self._bucket_list)

    def image_size(self, sample) -> tuple[int, int]:
        """The ``(width, height)`` of a sample's image file (read once)."""
        if sample.key not in self._image_sizes:
            self._image_sizes[sample.key] = sample.open().size
        return self._image_sizes[sample.key]

    def bucket_summary(self) -> str:
        """``"buckets: 64x64 (4), ..."``; refuses examples of several images (they share a size)."""
        if self.dataset.group_size > 1:
            raise LorakitError(
                f"--buckets needs one image per example, but this run's examples group "
                f"{self.dataset.group_size} (e.g. a mode's image pairs); drop --buckets."
            )
        return buckets.summary([self.size_of(e[0]) for e in self.dataset.examples])

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of example indices for ``epoch``."""
        import torch

        bs = self.config.batch_size
        global_batch = bs * self.world
        lo, hi = self.rank * bs, (self.rank + 1) * bs
        if self.config.buckets:
            sizes = [self.size_of(e[0]) for e in self.dataset.examples]
            chunks = buckets.bucketed_batches(sizes, global_batch, self.config.seed, epoch)
            return [chunk[lo:hi] for chunk in chunks]
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        while len(order) < global_batch:
            order = order + order
        return [order[b * global_batch : (b + 1) * global_batch][lo:hi] for b in range(len(order) // global_batch)]

    def prepared(self, prepare, samples, augments) -> list:
        """``[prepare(sample, augment), ...]`` in order, on ``--num-workers`` threads when set
        (image decoding and resizing release the GIL). Each result depends only on its sample and
        its augmentation (a function of (seed, epoch, sample)), never on the worker, so the
        outcome is the same with any number of workers."""
        workers = min(self.config.num_workers or 0, len(samples))
        if workers < 2:
            return [prepare(s, a) for s, a in zip(samples, augments)]
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lorakit-data") as pool:
            return list(pool.map(prepare, samples, augments))

    def batches_per_epoch(self) -> int:
        if self._per_epoch is None:  # the same every epoch: one bucket plan's count, or len // global batch
            self._per_epoch = len(self.epoch_batches(0))
        return self._per_epoch

    def run_steps(self) -> int:
        """Optimizer steps of the run: ``--max-steps`` or ``--epochs``, whichever ends first;
        1000 when neither is given. An epoch is this order's micro-batches (without
        ``--buckets`` a last partial global batch is left out, with them each bucket's last
        batch is filled up); its final step may take micro-batches of the next epoch when
        ``--gradient-accumulation`` does not divide their number."""
        c = self.config
        by_epochs = -(-c.epochs * self.batches_per_epoch() // c.gradient_accumulation) if c.epochs else None
        limits = [n for n in (c.max_steps, by_epochs) if n]
        return min(limits) if limits else DEFAULT_MAX_STEPS

    def epoch_of(self, step: int) -> int:
        """The epoch (from 1) optimizer step ``step`` (from 1) ends in."""
        return max(0, step * self.config.gradient_accumulation - 1) // self.batches_per_epoch() + 1

    def micro_batches(self, start_micro: int):
        """Endless stream of ``(epoch, indices)`` from micro-batch number ``start_micro`` on."""
        epoch, offset = divmod(start_micro, self.batches_per_epoch())
        while True:
            for indices in self.epoch_batches(epoch)[offset:]:
                yield epoch, indices
            epoch, offset = epoch + 1, 0
