"""GradCache on a small model: chunked steps give the parameter gradients of the un-chunked
step, and dropout is replayed (same masks in the no-grad and the re-encoding pass)."""

import copy

import torch
import torch.nn.functional as F

from engine.gradcache import grad_cache_step
from kernels import infonce

B, R, IN, D = 7, 2, 10, 16


def make_model(p_drop):
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(IN, 32), torch.nn.GELU(), torch.nn.Dropout(p_drop), torch.nn.Linear(32, D)
    ).double()


def inputs():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, IN, generator=g, dtype=torch.float64) for n in (B, B, B * R)]


def loss_fn(q, t, n):
    return infonce(q.float(), t.float(), n.float().view(B, R, D), temperature=0.05, backend="torch")


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_chunked_equals_unchunked():
    model = make_model(0.0)
    ref_model = copy.deepcopy(model)
    xs = inputs()

    def encode(x):
        return F.normalize(model(x), dim=-1)

    loss = grad_cache_step(encode, [list(x.split(2)) for x in xs], loss_fn)

    ref_loss = loss_fn(*(F.normalize(ref_model(x), dim=-1) for x in xs))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss.detach())
    for g, r in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
        assert r.abs().max() > 0


def test_dropout_masks_are_replayed():
    """Reference: the same chunks encoded once with autograd, in the same order from the same
    seed, so each chunk draws the same dropout mask as in GradCache's first pass."""
    model = make_model(0.3)
    ref_model = copy.deepcopy(model)
    xs = inputs()
    streams = [list(x.split(2)) for x in xs]

    torch.manual_seed(5)
    loss = grad_cache_step(lambda x: F.normalize(model(x), dim=-1), streams, loss_fn)
    after = torch.rand(4)

    torch.manual_seed(5)
    embs = [torch.cat([F.normalize(ref_model(c), dim=-1) for c in s]) for s in streams]
    ref_loss = loss_fn(*embs)
    ref_loss.backward()
    ref_after = torch.rand(4)

    torch.testing.assert_close(loss, ref_loss.detach())
    for g, r in zip(grads(model), grads(ref_model)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(after, ref_after)  # the RNG ends where one ordinary step leaves it
