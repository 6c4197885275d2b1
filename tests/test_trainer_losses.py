"""Framework-free per-sample losses used by the trainer integrations (reweight/losses.py)."""

import pytest
import torch
import torch.nn.functional as F

from reweight.losses import (
    binary_cross_entropy,
    causal_lm_loss,
    cross_entropy,
    sequence_cross_entropy,
    shift_causal_labels,
)


def logits_and_labels(seed: int = 0, n: int = 5, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64), torch.randint(0, k, (n,), generator=g)


def test_label_smoothing_matches_timms_definition():
    """timm's LabelSmoothingCrossEntropy per sample: (1 - s) nll + s mean_k(-log p_k)."""
    x, y = logits_and_labels()
    logp = F.log_softmax(x, -1)
    want = 0.8 * -logp.gather(1, y[:, None]).squeeze(1) + 0.2 * -logp.mean(-1)
    torch.testing.assert_close(cross_entropy(x, y, label_smoothing=0.2), want)


def test_soft_targets_match_timms_definition():
    """timm's SoftTargetCrossEntropy per sample: sum_k -t_k log p_k, rows not normalised."""
    x, y = logits_and_labels()
    soft = torch.rand(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(cross_entropy(x, soft), -(soft * F.log_softmax(x, -1)).sum(-1))
    torch.testing.assert_close(cross_entropy(x, F.one_hot(y, 4).double()), F.cross_entropy(x, y, reduction="none"))
    with pytest.raises(ValueError, match="soft targets"):
        cross_entropy(x, soft[:, :3])


def test_binary_cross_entropy_smooths_hard_labels_per_sample():
    x, y = logits_and_labels()
    off = 0.1 / 4
    dense = torch.full_like(x, off).scatter_(1, y[:, None], 1 - 0.1 + off)
    want = F.binary_cross_entropy_with_logits(x, dense, reduction="none").mean(-1)
    torch.testing.assert_close(binary_cross_entropy(x, y, smoothing=0.1), want)
    torch.testing.assert_close(binary_cross_entropy(x, dense, sum_classes=True), want * 4)
    hard = (dense > 0.5).double()  # binarised: the one-hot of y
    torch.testing.assert_close(
        binary_cross_entropy(x, dense, target_threshold=0.5),
        F.binary_cross_entropy_with_logits(x, hard, reduction="none").mean(-1),
    )


def test_sequence_losses_ignore_padding_and_reduce_per_sequence():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[0, 4:] = -100
    labels[2, 1:] = -100
    valid = labels != -100
    token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * valid
    sums = sequence_cross_entropy(logits, labels, reduction="sum")
    torch.testing.assert_close(sums, token.sum(-1))
    torch.testing.assert_close(sequence_cross_entropy(logits, labels, reduction="sequence_mean"), sums / valid.sum(-1))
    mean = sequence_cross_entropy(logits, labels).mean()  # token_mean: the mean over all valid tokens
    torch.testing.assert_close(mean, F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100))
    changed = logits.clone()
    changed[0, 4:] += 100.0  # padded positions carry no loss
    torch.testing.assert_close(sequence_cross_entropy(changed, labels, reduction="sum"), sums)
    with pytest.raises(ValueError, match="reduction"):
        sequence_cross_entropy(logits, labels, reduction="mean")


def test_causal_lm_loss_predicts_the_next_token():
    labels = torch.tensor([[3, 1, 2, -100]])
    assert shift_causal_labels(labels).tolist() == [[1, 2, -100, -100]]
    logits = torch.full((1, 4, 5), -30.0, dtype=torch.float64)
    logits[0, 0, 1] = logits[0, 1, 2] = 30.0  # confident and right on the two valid shifted tokens
    assert float(causal_lm_loss(logits, labels, reduction="sum")) < 1e-12
    logits[0, 1, 2], logits[0, 1, 0] = -30.0, 30.0  # now confident and wrong on the second
    assert float(causal_lm_loss(logits, labels, reduction="sum")) > 10
