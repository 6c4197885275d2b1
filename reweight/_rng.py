"""Randomness of the meta step, kept apart from the user's global RNG streams."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["isolated_rng"]


@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the CPU (and ``device``'s) global RNG seeded by ``seed``, then restore them.

    Dropout in the look-ahead, MetaInfoNet's sampling and the meta loader's shuffling thus depend only
    on the reweighter's own seed, and the user's random stream is the same with or without reweighting.
    """
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with module.device(index):
            module.manual_seed(seed)
        yield
