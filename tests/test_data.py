"""Simulators of reweight.data: realised noise rates, transition structure, long-tail counts, meta split."""

import numpy as np
import pytest
import torch

from reweight.data import (
    apply_transition,
    flip1_noise,
    flip1_transition,
    flip2_noise,
    flip2_transition,
    long_tail,
    long_tail_counts,
    meta_split,
    uniform_noise,
    uniform_transition,
)

K = 10
Y = np.repeat(np.arange(K), 2000)  # 20 000 labels, balanced


def _within(observed: float, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - p) <= sigmas * np.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.6])
def test_uniform_noise_rate_and_structure(rate):
    n = uniform_noise(Y, rate, num_classes=K, seed=0)
    assert n.labels.shape == Y.shape and n.corrupted.dtype == bool
    np.testing.assert_array_equal(n.corrupted, n.labels != Y)
    assert _within(n.corrupted.mean(), rate, len(Y))
    t = n.transition
    np.testing.assert_allclose(np.diag(t), 1 - rate)
    off = t[~np.eye(K, dtype=bool)]
    np.testing.assert_allclose(off, rate / (K - 1))
    if rate > 0:  # every wrong class is reached, about equally
        wrong = n.labels[n.corrupted] - Y[n.corrupted]
        assert len(np.unique(wrong % K)) == K - 1


def test_uniform_noise_including_true_class_flips_p_k_minus_1_over_k():
    n = uniform_noise(Y, 0.6, num_classes=K, seed=1, exclude_true=False)
    assert _within(n.corrupted.mean(), 0.6 * (K - 1) / K, len(Y))
    np.testing.assert_allclose(np.diag(n.transition), 0.4 + 0.06)


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_flip1_sends_all_mass_to_one_other_class(rate):
    n = flip1_noise(Y, rate, num_classes=K, seed=3)
    t = n.transition
    np.testing.assert_allclose(t.sum(1), 1.0)
    np.testing.assert_allclose(np.diag(t), 1 - rate)
    for c in range(K):
        targets = np.nonzero((t[c] > 0) & (np.arange(K) != c))[0]
        assert len(targets) == 1 and t[c, targets[0]] == pytest.approx(rate)
        observed = np.unique(n.labels[(Y == c) & n.corrupted])
        np.testing.assert_array_equal(observed, targets)  # corrupted samples of class c land only there
        assert _within(n.corrupted[Y == c].mean(), rate, int((Y == c).sum()))
    assert _within(n.corrupted.mean(), rate, len(Y))


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_flip2_sends_half_the_mass_to_each_of_two_classes(rate):
    n = flip2_noise(Y, rate, num_classes=K, seed=4)
    t = n.transition
    np.testing.assert_allclose(np.diag(t), 1 - rate)
    for c in range(K):
        targets = np.nonzero((t[c] > 0) & (np.arange(K) != c))[0]
        assert len(targets) == 2
        np.testing.assert_allclose(t[c, targets], rate / 2)
        lab = n.labels[(Y == c) & n.corrupted]
        assert set(np.unique(lab)) == set(targets)
        m = int((Y == c).sum())
        for j in targets:
            assert _within((n.labels[Y == c] == j).mean(), rate / 2, m)
    assert _within(n.corrupted.mean(), rate, len(Y))


def test_flip_targets_are_random_per_seed_and_never_the_class_itself():
    seen = set()
    for seed in range(5):
        t = flip1_transition(K, 0.4, seed=seed)
        assert (np.diag(t) == 0.6).all()
        targets = (t * (1 - np.eye(K))).argmax(1)
        assert (targets != np.arange(K)).all()
        seen.add(tuple(targets))
    assert len(seen) > 1
    t2 = flip2_transition(K, 0.4, seed=0)
    assert ((t2 > 0).sum(1) == 3).all()


@pytest.mark.parametrize("fn", [uniform_noise, flip1_noise, flip2_noise])
def test_noise_is_deterministic_under_a_seed(fn):
    a, b, c = fn(Y, 0.4, seed=7), fn(Y, 0.4, seed=7), fn(Y, 0.4, seed=8)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.transition, b.transition)
    assert (a.labels != c.labels).any()


def test_noise_accepts_torch_labels_and_returns_numpy():
    n = flip1_noise(torch.as_tensor(Y), 0.2, seed=0)
    np.testing.assert_array_equal(n.labels, flip1_noise(Y, 0.2, seed=0).labels)
    assert isinstance(n.labels, np.ndarray)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize("fn", [uniform_noise, flip1_noise, flip2_noise])
def test_bad_noise_rate_raises(fn, rate):
    with pytest.raises(ValueError, match="rate"):
        fn(Y, rate)


def test_bad_labels_and_classes_raise():
    with pytest.raises(ValueError, match="num_classes"):
        flip1_noise(Y, 0.2, num_classes=5)
    with pytest.raises(ValueError, match="1-D"):
        flip1_noise(Y.reshape(2, -1), 0.2)
    with pytest.raises(TypeError, match="integers"):
        flip1_noise(Y.astype(float), 0.2)
    with pytest.raises(ValueError, match=">= 0"):
        uniform_noise(np.array([-1, 0, 1]), 0.2)
    with pytest.raises(ValueError, match="num_classes"):
        flip2_noise(np.array([0, 1, 0, 1]), 0.2)  # Flip-2 needs 3 classes
    with pytest.raises(TypeError, match="seed"):
        flip1_noise(Y, 0.2, seed=1.5)
    with pytest.raises(ValueError, match="row"):
        apply_transition(Y, np.full((K, K), 0.5))
    with pytest.raises(ValueError, match="square"):
        apply_transition(Y, np.ones((K, K - 1)))


def test_uniform_transition_is_row_stochastic():
    for ex in (True, False):
        np.testing.assert_allclose(uniform_transition(5, 0.3, exclude_true=ex).sum(1), 1.0)


def test_long_tail_counts_follow_the_exponential_profile():
    counts = long_tail_counts(1000, K, 100)
    assert counts[0] == 1000 and counts[-1] == 10
    assert (np.diff(counts) < 0).all()
    mu = 100 ** (-1 / (K - 1))
    np.testing.assert_allclose(counts, np.round(1000 * mu ** np.arange(K)))
    assert long_tail_counts(500, K, 1).tolist() == [500] * K


@pytest.mark.parametrize("imbalance", [10, 50, 100])
def test_long_tail_subsample_has_the_counts_and_imbalance(imbalance):
    lt = long_tail(Y, imbalance, seed=0)
    got = np.bincount(Y[lt.indices], minlength=K)
    np.testing.assert_array_equal(got, lt.counts)
    assert got[0] == 2000
    assert got[0] / got[-1] == pytest.approx(imbalance, rel=0.05)
    assert len(np.unique(lt.indices)) == len(lt.indices)
    np.testing.assert_array_equal(lt.indices, long_tail(Y, imbalance, seed=0).indices)
    assert (lt.indices != long_tail(Y, imbalance, seed=1).indices).any()


def test_long_tail_errors():
    with pytest.raises(ValueError, match="imbalance"):
        long_tail(Y, 0.5)
    with pytest.raises(ValueError, match="smallest class"):
        long_tail_counts(10, K, 100)
    with pytest.raises(ValueError, match="fewer"):
        long_tail(Y, 10, n_max=5000)


def test_meta_split_is_balanced_disjoint_and_seeded():
    s = meta_split(Y, 20, seed=0)
    np.testing.assert_array_equal(np.bincount(Y[s.meta], minlength=K), [20] * K)
    assert len(np.intersect1d(s.train, s.meta)) == 0
    np.testing.assert_array_equal(np.union1d(s.train, s.meta), np.arange(len(Y)))
    np.testing.assert_array_equal(s.meta, meta_split(Y, 20, seed=0).meta)
    assert (s.meta != meta_split(Y, 20, seed=1).meta).any()


def test_meta_split_errors():
    with pytest.raises(ValueError, match="per_class"):
        meta_split(Y, 0)
    with pytest.raises(ValueError, match="none to train"):
        meta_split(Y, 2000)
