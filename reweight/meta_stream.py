"""An endless, resumable stream of batches from the clean meta loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch

__all__ = ["MetaBatchStream"]


class MetaBatchStream:
    """Cycles ``loader`` forever; each pass starts from a seed, so a resumed stream repeats exactly.

    A pass's shuffling order depends only on its seed, which :meth:`state_dict` records with the
    position in the pass; a restored stream replays the pass up to that position.

    Args:
        loader: any re-iterable of batches (a ``DataLoader``, a list of batches, ...).
        draw_seed: returns the seed of the next pass.

    Raises:
        TypeError: if ``loader`` is not iterable or is a one-shot iterator.
        ValueError: if ``loader`` is empty.
    """

    def __init__(self, loader: Iterable[Any], draw_seed: Callable[[], int]) -> None:
        if not isinstance(loader, Iterable):
            raise TypeError(f"meta_loader must be iterable, got {type(loader).__name__}")
        if isinstance(loader, Iterator):
            raise TypeError("meta_loader must be re-iterable (a DataLoader or a list), not a one-shot iterator")
        if isinstance(loader, Sized) and len(loader) == 0:
            raise ValueError("meta_loader is empty: it must yield at least one batch of clean samples")
        self._loader = loader
        self._draw_seed = draw_seed
        self._iterator: Iterator[Any] | None = None
        self._prefetched: list[Any] = []
        self.epoch = 0
        self.position = 0
        self.epoch_seed: int | None = None

    def _start_pass(self, seed: int, skip: int = 0) -> None:
        # A DataLoader draws its shuffling seed in iter() and on the first next(): do both, and any
        # replay after a resume, under the pass's seed and leave the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self._iterator = iter(self._loader)
            self.epoch_seed, self.position, self._prefetched = seed, 0, []
            for _ in range(skip):
                self._pull()
            try:
                self._prefetched.append(next(self._iterator))
            except StopIteration:
                pass

    def _pull(self) -> Any:
        assert self._iterator is not None
        if self._prefetched:
            batch = self._prefetched.pop()
        else:
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.position == 0:
                    raise ValueError("meta_loader yielded no batches: it must hold at least one clean sample") from None
                raise
        self.position += 1
        return batch

    def next(self) -> Any:
        """The next meta batch, starting a new pass when the current one is exhausted.

        An error raised by the loader propagates unchanged; the next call replays the pass up to the
        batch that failed and tries it again (a restarted loader, as after a resume).
        """
        try:
            if self._iterator is None:
                if self.epoch_seed is None:
                    self._start_pass(self._draw_seed())
                else:  # restored from a state dict, or after a loader error
                    self._start_pass(self.epoch_seed, skip=self.position)
            try:
                return self._pull()
            except StopIteration:
                self.epoch += 1
                self._start_pass(self._draw_seed())
                return self._pull()
        except BaseException:
            self._iterator = None  # a failed iterator (a finished generator, a dead worker) is not reused
            raise

    def state_dict(self) -> dict[str, int | None]:
        return {"epoch": self.epoch, "position": self.position, "epoch_seed": self.epoch_seed}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        self.epoch, self.position, self.epoch_seed = state["epoch"], state["position"], state["epoch_seed"]
        self._iterator = None
