"""The forward engine's batch / layer norm JVP rules equal PyTorch's built-in forward-AD formulas."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from reweight.engines._fast_jvp import FastNormJVP


def primal_and_tangent(fn, primals, tangents, fast):
    with torch.no_grad(), fwAD.dual_level():
        args = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        if fast:
            with FastNormJVP():
                out = fwAD.unpack_dual(fn(*args))
        else:
            out = fwAD.unpack_dual(fn(*args))
    return out.primal, out.tangent


def batch_norm_4d(x, w, b):
    return F.batch_norm(x, torch.zeros(5, dtype=x.dtype), torch.ones(5, dtype=x.dtype), w, b, training=True)


def batch_norm_2d(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)


def layer_norm_last(x, w, b):
    return F.layer_norm(x, (6,), w, b)


def layer_norm_two_dims(x, w, b):
    return F.layer_norm(x, (3, 6), w, b)


CASES = [
    (batch_norm_4d, [(4, 5, 3, 3), (5,), (5,)]),
    (batch_norm_2d, [(7, 5), (5,), (5,)]),
    (layer_norm_last, [(4, 3, 6), (6,), (6,)]),
    (layer_norm_two_dims, [(4, 3, 6), (3, 6), (3, 6)]),
]


@pytest.mark.parametrize("fn, shapes", CASES)
@pytest.mark.parametrize(
    "mask, affine", [((1, 1, 1), True), ((1, 0, 0), True), ((0, 1, 1), True), ((0, 0, 1), True), ((1, 0, 0), False)]
)
def test_rules_equal_builtin_forward_ad(fn, shapes, mask, affine):
    g = torch.Generator().manual_seed(0)
    primals = [torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes]
    tangents = [torch.randn(*s, dtype=torch.float64, generator=g) if m else None for s, m in zip(shapes, mask)]
    if not affine:
        primals[1:], tangents[1:] = [None, None], [None, None]

    ref = primal_and_tangent(fn, primals, tangents, fast=False)
    got = primal_and_tangent(fn, primals, tangents, fast=True)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)


def test_running_statistics_are_updated_as_batch_norm_does():
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    stats = [(torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)) for _ in range(2)]
    for fast, (mean, var) in zip((False, True), stats):
        with torch.no_grad(), fwAD.dual_level():
            x_dual = fwAD.make_dual(x, torch.randn_like(x))
            if fast:
                with FastNormJVP():
                    F.batch_norm(x_dual, mean, var, None, None, training=True, momentum=0.3)
            else:
                F.batch_norm(x_dual, mean, var, None, None, training=True, momentum=0.3)
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])
    assert not torch.equal(stats[0][0], torch.zeros(5, dtype=torch.float64))


def test_eval_mode_batch_norm_is_left_to_pytorch():
    x = torch.randn(4, 5, dtype=torch.float64)
    mean, var = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    ref = primal_and_tangent(lambda a: F.batch_norm(a, mean, var, training=False), [x], [torch.ones_like(x)], False)
    got = primal_and_tangent(lambda a: F.batch_norm(a, mean, var, training=False), [x], [torch.ones_like(x)], True)
    torch.testing.assert_close(got[1], ref[1])
