"""Each sample's index beside the sample, for ``MetaReweighter(..., loss_history=True)``'s ``sample_ids``."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

__all__ = ["WithIndex"]


class WithIndex(Dataset):
    """``dataset`` whose item ``i`` is ``(i, dataset[i])``: a ``DataLoader`` over it yields ``ids, batch``.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(6, 2), torch.arange(6))
        >>> ids, (x, y) = next(iter(DataLoader(WithIndex(data), batch_size=4)))
        >>> ids.tolist(), x.shape
        ([0, 1, 2, 3], torch.Size([4, 2]))
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            kind = type(dataset).__name__
            raise TypeError(f"dataset must be a map-style dataset (__getitem__ and __len__), got {kind}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]
