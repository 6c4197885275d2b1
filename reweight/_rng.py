"""Randomness of the meta step, kept apart from the user's global RNG streams."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["isolated_rng", "replayable_rng"]


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


@contextmanager
def replayable_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield a function that rewinds the CPU (and ``device``'s) RNG to its state at entry.

    Two forwards separated by a rewind draw the same dropout masks.
    """
    cpu_state = torch.get_rng_state()
    module = None if device.type == "cpu" else torch.get_device_module(device.type)
    device_state = None if module is None else module.get_rng_state(device)

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if module is not None:
            module.set_rng_state(device_state, device)

    yield rewind
