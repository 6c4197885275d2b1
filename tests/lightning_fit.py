"""A small Lightning run whose training step hands ``reweight_step`` one more tensor of each batch (group ids,
sample ids). A module of its own, imported by the tests that need Lightning after they checked it is installed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 3


def fit_passing(callback, column: torch.Tensor, keyword: str, max_steps: int, root: str):
    """Fit a 6-16-3 MLP on 16 random samples (batches of 8) with ``callback``; each training step passes the batch's
    share of ``column`` to ``reweight_step`` as ``keyword``. Returns the trainer."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from reweight.integrations.lightning import reweight_step

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, CLASSES))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, extra = batch
            logits = self(x)
            w = reweight_step(self, x, y, logits, **{keyword: extra})
            return (w * F.cross_entropy(logits, y, reduction="none")).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(1)
    train = TensorDataset(torch.randn(16, 6, generator=gen), torch.randint(0, CLASSES, (16,), generator=gen), column)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_steps=max_steps, callbacks=[callback], default_root_dir=root,
    )  # fmt: skip
    trainer.fit(Lit(), DataLoader(train, batch_size=8))
    return trainer
