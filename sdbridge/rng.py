"""Random draws for a batch: one run generator, or one generator per sample.

A run normally draws everything from one seeded ``torch.Generator``. With independent samples
(``prompt.seed_per_prompt=true``, the COCO protocol) each sample of the batch owns a generator seeded from the run
seed and the sample's key (its caption id), and row ``i`` of every draw comes from generator ``i`` only. A sample's
result then does not depend on which other samples share its batch, its shard or its position: optimizing 8
captions at once gives each the image it would get alone.

A draw a method makes once for the whole batch (one shared t, SDI's one jitter) is drawn per sample with
:class:`SampleGenerators`, since a shared draw would tie each sample to its batch.

The helpers below take either kind of generator; code that draws batch-shaped randomness goes through them.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence, Union

import torch


def sample_seed(seed: int, key: str) -> int:
    """A 63-bit seed for the sample ``key`` of a run seeded ``seed`` (stable across machines and Python runs)."""
    digest = hashlib.sha256(f"sdbridge:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleGenerators:
    """One CPU ``torch.Generator`` per sample, seeded by :func:`sample_seed`.

    Offers the parts of ``torch.Generator`` a run uses (``get_state`` / ``set_state`` for exact resume,
    ``initial_seed`` for seeding networks), so it can stand where the run generator stands.
    """

    def __init__(self, seed: int, keys: Sequence[str]):
        if not keys:
            raise ValueError("SampleGenerators needs at least one sample key")
        self.seed = int(seed)
        self.keys = [str(k) for k in keys]
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, k)) for k in self.keys]

    def __len__(self) -> int:
        return len(self.generators)

    def initial_seed(self) -> int:
        return self.seed

    def get_state(self) -> torch.Tensor:
        return torch.stack([g.get_state() for g in self.generators])

    def set_state(self, state: torch.Tensor) -> None:
        if state.dim() != 2 or state.shape[0] != len(self.generators):
            raise ValueError(f"generator state for {state.shape[0] if state.dim() == 2 else 1} samples, "
                             f"this batch has {len(self.generators)}")
        for g, s in zip(self.generators, state):
            g.set_state(s.clone())

    def check(self, batch_size: int) -> None:
        if batch_size != len(self.generators):
            raise ValueError(f"a draw for {batch_size} samples from generators of {len(self.generators)} samples")


Generator = Union[torch.Generator, SampleGenerators]


def per_sample(generator: Generator, batch_size: int, draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """``draw(g)`` returns one sample's value with a leading dim of 1; returns the batch ``(batch_size, ...)``.

    With :class:`SampleGenerators` row i is drawn from generator i; with one run generator a single row is drawn
    and shared by the batch (the helpers below draw unshared batches from a run generator directly).
    """
    if isinstance(generator, SampleGenerators):
        generator.check(batch_size)
        return torch.cat([draw(g) for g in generator.generators])
    one = draw(generator)
    return one.expand(batch_size, *one.shape[1:]).clone()


def randn(shape: Sequence[int], generator: Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) of ``shape`` (leading dim = batch), on the CPU."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, SampleGenerators):
        return per_sample(generator, shape[0], lambda g: torch.randn((1, *shape[1:]), generator=g, dtype=dtype))
    return torch.randn(shape, generator=generator, dtype=dtype)


def randint(high: int, batch_size: int, generator: Generator, shared: bool = False, low: int = 0) -> torch.Tensor:
    """``(batch_size,)`` integers in [low, high): one per sample, or one for the batch when ``shared``."""
    if isinstance(generator, SampleGenerators) or shared:
        return per_sample(generator, batch_size, lambda g: torch.randint(low, high, (1,), generator=g))
    return torch.randint(low, high, (batch_size,), generator=generator)


def rand(batch_size: int, generator: Generator) -> torch.Tensor:
    """``(batch_size,)`` uniforms in [0, 1)."""
    if isinstance(generator, SampleGenerators):
        return per_sample(generator, batch_size, lambda g: torch.rand(1, generator=g))
    return torch.rand(batch_size, generator=generator)
