"""An endless, resumable stream of batches from the clean meta loader."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
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

    def extend(self, extra: Iterable[Any], *, restart: bool = True) -> None:
        """Every pass from now on yields ``extra``'s batches after the loader's (batches held back until now).

        With ``restart`` the current pass ends here and the next batch starts a new one; without it (restoring a
        stream that was extended) the recorded pass is replayed over the extended loader.

        Raises:
            TypeError: if ``extra`` is not re-iterable.
        """
        if not isinstance(extra, Iterable) or isinstance(extra, Iterator):
            raise TypeError(f"the batches to add must be re-iterable, got {type(extra).__name__}")
        self._loader = _Joined(self._loader, extra)
        if restart and self.epoch_seed is not None:
            self.epoch, self.position, self.epoch_seed = self.epoch + 1, 0, self._draw_seed()
        self._iterator = None

    def state_dict(self) -> dict[str, int | None]:
        return {"epoch": self.epoch, "position": self.position, "epoch_seed": self.epoch_seed}

    @staticmethod
    def check_state(state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` has the structure of a :meth:`state_dict` (reads only).

        ``epoch`` and ``position`` are ints ``>= 0``; ``epoch_seed`` is an int, or ``None`` for a stream
        that has not started (then ``epoch`` and ``position`` are 0).
        """
        keys = {"epoch", "position", "epoch_seed"}
        if not isinstance(state, Mapping) or set(state) != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"meta stream state must be a dict with keys {sorted(keys)}, got {got}")

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        if not (count(state["epoch"]) and count(state["position"])):
            raise ValueError(
                "meta stream state: epoch and position must be ints >= 0, "
                f"got {state['epoch']!r}, {state['position']!r}"
            )
        seed = state["epoch_seed"]
        if seed is None and (state["epoch"] or state["position"]):
            raise ValueError("meta stream state: a stream past its start must record its pass's epoch_seed")
        if seed is not None and not count(seed):
            raise ValueError(f"meta stream state: epoch_seed must be an int >= 0 or None, got {seed!r}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next batch replays the recorded pass up to its position.

        Raises:
            ValueError: if ``state`` is malformed (see :meth:`check_state`); nothing is changed then.
        """
        self.check_state(state)
        self.epoch, self.position, self.epoch_seed = state["epoch"], state["position"], state["epoch_seed"]
        self._iterator = None


class _Joined:
    """The batches of ``first``, then those of ``second``, on every iteration."""

    def __init__(self, first: Iterable[Any], second: Iterable[Any]) -> None:
        self.first, self.second = first, second

    def __iter__(self) -> Iterator[Any]:
        yield from self.first
        yield from self.second
