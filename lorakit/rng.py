"""Randomness per sample: the same draws on 1 or N processes, and nothing to save for a resume.

Every random number of a training step (noise, noise levels / timesteps) is drawn per row of
the micro-batch from a stream of its own, seeded from (seed, global step, micro-batch within
the step, the row's place in the global batch). One process with batch 4 and four processes
with batch 1 therefore draw the same numbers for the same samples, and a checkpoint holds no
noise state: step N's draws are a function of N. (Caption dropout and augmentation are keyed
per sample in :mod:`lorakit.images`; the data order is a function of (seed, epoch) and the
global batch in :mod:`lorakit.batches`.)

``compute_loss`` receives a :class:`Rows`; the objectives' helpers take a :class:`Rows` or,
for plugins written against the older contract, a ``torch.Generator`` (drawn from as one
batch, as before: such draws depend on how the global batch is split over processes).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import hashlib

#: seeds are non-negative 63-bit integers (torch.Generator.manual_seed takes up to 2**64 - 1)
_MASK = 2**63 - 1


def derive_seed(*parts) -> int:
    """A seed that is a pure function of ``parts`` (their ``str``), stable across runs,
    machines and Python versions (blake2b, not ``hash``)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK


class Rows:
    """One random stream per row of a micro-batch; draws are batch first, row ``i`` of every
    draw coming from stream ``i`` (consecutive draws continue each row's stream).

    Slicing (``rows[:n]``) gives the streams of those rows, shared, so a plugin or mode that
    splits a batch (e.g. instance and class halves) draws for each half what the whole would.
    """

    def __init__(self, generators: list):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds) -> "Rows":
        import torch

        return cls([torch.Generator().manual_seed(int(s)) for s in seeds])

    @classmethod
    def for_micro_batch(cls, seed: int, step: int, micro: int, start: int, count: int, groups: int = 1) -> "Rows":
        """The rows of one process's micro-batch: ``count`` examples from position ``start`` of
        the global batch, each of ``groups`` samples, ordered as the core assembles a batch
        (every example's first sample, then every example's second, ...)."""
        return cls.from_seeds(
            derive_seed("row", seed, step, micro, group, start + i) for group in range(groups) for i in range(count)
        )

    @classmethod
    def from_generator(cls, generator, count: int) -> "Rows":
        """``count`` rows seeded from ``generator`` (advancing it): for evaluation and checks
        that hold one seeded generator rather than a training step."""
        import torch

        return cls.from_seeds(torch.randint(0, _MASK, (count,), generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, index) -> "Rows":
        if not isinstance(index, slice):
            raise TypeError("Rows are sliced (rows[a:b]), not indexed")
        return Rows(self.generators[index])

    def _check(self, shape) -> tuple:
        shape = tuple(int(n) for n in shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"a per-row draw of shape {shape} needs {len(self)} rows first (one per sample)")
        return shape

    def _stack(self, draw, shape):
        import torch

        shape = self._check(shape)
        return torch.stack([draw(shape[1:], g) for g in self.generators])

    def randn(self, shape, dtype=None):
        import torch

        return self._stack(lambda s, g: torch.randn(s, generator=g, dtype=dtype or torch.float32), shape)

    def rand(self, shape, dtype=None):
        import torch

        return self._stack(lambda s, g: torch.rand(s, generator=g, dtype=dtype or torch.float32), shape)

    def randint(self, low: int, high: int, shape):
        import torch

        return self._stack(lambda s, g: torch.randint(low, high, s, generator=g), shape)

    def normal(self, mean: float, std: float, shape):
        import torch

        return self._stack(lambda s, g: torch.normal(mean, std, size=s, generator=g), shape)


# --- draws from a Rows or from a torch.Generator (the older contract), as one call ---------


def randn(source, shape, dtype=None):
    """Standard normal of ``shape`` (float32 unless ``dtype``), on the CPU."""
    import torch

    if isinstance(source, Rows):
        return source.randn(shape, dtype)
    return torch.randn(tuple(shape), generator=source, dtype=dtype or torch.float32)


def rand(source, shape, dtype=None):
    """Uniform on [0, 1) of ``shape``, on the CPU."""
    import torch

    if isinstance(source, Rows):
        return source.rand(shape, dtype)
    return torch.rand(size=tuple(shape), generator=source, dtype=dtype or torch.float32)


def randint(source, low: int, high: int, shape):
    """Integers in [low, high) of ``shape`` (int64), on the CPU."""
    import torch

    if isinstance(source, Rows):
        return source.randint(low, high, shape)
    return torch.randint(low, high, tuple(shape), generator=source)


def normal(source, mean: float, std: float, shape):
    """Normal(mean, std) of ``shape``, on the CPU."""
    import torch

    if isinstance(source, Rows):
        return source.normal(mean, std, shape)
    return torch.normal(mean=mean, std=std, size=tuple(shape), generator=source)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device=None):
    """torch's global RNG (CPU, and ``device``'s when it is an initialised CUDA device) seeded
    ``seed`` inside, restored after: what draws from it (LoRA dropout) is a function of the
    step, not of what ran before, so a resume needs no saved state for it."""
    import torch

    cuda = device is not None and getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_initialized()
    devices = [device] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield
