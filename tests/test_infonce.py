"""InfoNCE: both backends (Triton through the interpreter on CPU, the torch path) against a
float64 matmul + cross-entropy oracle; error bounded by twice the naive fp32/bf16 error."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import infonce

infonce_mod = importlib.import_module("kernels.infonce")
BACKENDS = ["triton", "torch"]


def naive_infonce(q, t, negatives, temperature):
    """The plain definition: the full (B, B + r) logit matrix and cross-entropy."""
    logits = q @ t.T
    if negatives is not None:
        logits = torch.cat([logits, torch.einsum("bd,brd->br", q, negatives)], dim=1)
    logits = logits.double() if q.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits / temperature, torch.arange(q.shape[0], device=q.device))


def make_inputs(B, D, r, dtype=torch.float32, device="cpu", scale=1.0):
    """L2-normalised embeddings (as MoCa feeds the loss), positives correlated with queries."""
    q = F.normalize(torch.randn(B, D, device=device, dtype=torch.float64), dim=-1)
    t = F.normalize(q + 0.5 * torch.randn_like(q), dim=-1)
    noise = torch.randn(B, r, D, device=device, dtype=torch.float64)
    neg = F.normalize(q[:, None] + 0.7 * noise, dim=-1) if r else None
    return [(x * scale).to(dtype) for x in (q, t, neg) if x is not None]


def loss_and_grads(fn, inputs, grad_out):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    loss = fn(*xs)
    grads = torch.autograd.grad(loss, xs, grad_outputs=grad_out.to(loss.dtype))
    return loss.detach().double(), [g.double() for g in grads]


def check_against_oracle(inputs, backend, temperature=0.03):
    """err(ours) <= 2 * err(naive in the same dtype) + 4 eps_fp32 |logit|max * unit.

    The second term is the rounding of any lse-based kernel: probabilities come from
    exp(s - lse) with |s|, |lse| up to |logit|max, so they carry ~|logit|max * eps of absolute
    error, where naive softmax (exp(s - max) / sum) is exact at its largest entry. unit is 1
    for the loss and grad_out * max|x| / (B * tau) for gradients (their size when P = O(1)).
    """
    grad_out = torch.tensor(0.7 + torch.rand(()).item())
    with_neg = len(inputs) == 3

    def ours(q, t, *neg):
        return infonce(q, t, neg[0] if with_neg else None, temperature, backend=backend)

    def naive(q, t, *neg):
        return naive_infonce(q, t, neg[0] if with_neg else None, temperature)

    exact = loss_and_grads(naive, [x.double() for x in inputs], grad_out)
    ref = loss_and_grads(naive, inputs, grad_out)
    got = loss_and_grads(ours, inputs, grad_out)
    max_norm = max(x.double().norm(dim=-1).max().item() for x in inputs)
    rounding = 4 * torch.finfo(torch.float32).eps * max_norm**2 / temperature
    max_abs = max(x.double().abs().max().item() for x in inputs)
    grad_unit = grad_out.item() * max_abs / (inputs[0].shape[0] * temperature)
    names = ["loss", "dq", "dt", "dneg"]
    for name, e, r, g in zip(names, [exact[0], *exact[1]], [ref[0], *ref[1]], [got[0], *got[1]]):
        assert g.shape == e.shape, name
        err, ref_err = (g - e).abs().max().item(), (r - e).abs().max().item()
        tol = 2 * ref_err + rounding * (1.0 if name == "loss" else grad_unit)
        assert err <= tol, f"{name}: err {err:.3g} > {tol:.3g} (naive {inputs[0].dtype} err {ref_err:.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [0, 1, 2])
@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("B", [1, 7, 97, 300])
def test_matches_float64(B, D, r, backend):
    check_against_oracle(make_inputs(B, D, r), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocked_backward_and_large_logits(backend, monkeypatch):
    """Several (CHUNK x CHUNK) blocks with a ragged tail and off-diagonal blocks, and logits in the
    hundreds (unnormalised inputs), so the online log-sum-exp must not overflow."""
    monkeypatch.setattr(infonce_mod, "_CHUNK", 128)
    q, t, neg = make_inputs(300, 72, 2, scale=2.5)
    check_against_oracle([q, t, neg], backend, temperature=0.05)


@pytest.fixture
def tma_descs(monkeypatch):
    """MOCA_TMA=1: records, per score-GEMM launch, whether its operands came through TMA descriptors."""
    monkeypatch.setenv("MOCA_TMA", "1")
    calls = []

    def spy(q, t, cfg):
        out = descs(q, t, cfg)
        calls.append(out[2])
        return out

    descs = infonce_mod._descs
    monkeypatch.setattr(infonce_mod, "_descs", spy)
    return calls


@pytest.mark.parametrize("B, D, r", [(7, 64, 0), (300, 80, 2), (97, 72, 1)])
def test_tma_matches_float64(tma_descs, monkeypatch, B, D, r):
    """Score tiles through TMA descriptors: rows, key columns and the K tail (D = 80, 72 with BLOCK_K 64) past
    the operands' edges read zeros; the blocked backward's descriptors view row chunks at an offset."""
    monkeypatch.setattr(infonce_mod, "_CHUNK", 128)
    check_against_oracle(make_inputs(B, D, r), "triton")
    assert tma_descs and all(tma_descs)  # the forward and every backward block


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("frozen", ["q", "t_neg"])
def test_partial_requires_grad(frozen, backend):
    q, t, neg = make_inputs(37, 64, 2)
    q.requires_grad_(frozen != "q")
    t.requires_grad_(frozen == "q")
    neg.requires_grad_(frozen == "q")
    want = [x for x in (q, t, neg) if x.requires_grad]
    loss = infonce(q, t, neg, backend=backend)
    got = torch.autograd.grad(loss, want)
    q64, t64, n64 = (x.double().requires_grad_(x.requires_grad) for x in (q, t, neg))
    exact = torch.autograd.grad(naive_infonce(q64, t64, n64, 0.03), [x for x in (q64, t64, n64) if x.requires_grad])
    for g, e in zip(got, exact):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_refuses_double_backward(backend):
    """A gradient penalty (create_graph=True) raises: the Triton backward's gradients carry no graph, so second
    derivatives came back missing (dq) or wrong (dt)."""
    q, t, neg = (x.requires_grad_() for x in make_inputs(7, 16, 2))
    with pytest.raises(RuntimeError, match="infonce has no double backward"):
        torch.autograd.grad(infonce(q, t, neg, 0.5, backend=backend), q, create_graph=True)


def test_rejects_bad_inputs():
    """Checked errors, not asserts (`python -O` drops those, and a 3-row t would read out of bounds)."""
    q, t = make_inputs(5, 64, 0)
    for args, error, message in [
        ((q, t, torch.randn(4, 2, 64)), ValueError, r"negatives must be \(B, r, D\) = \(5, r, 64\)"),
        ((q, t, torch.randn(5, 2, 32)), ValueError, "negatives must be"),
        ((q, t[:3]), ValueError, r"q, t must both be \(B, D\)"),
        ((q[:0], t[:0]), ValueError, "empty batch"),
        ((q, t.double()), TypeError, "t: torch.float64"),
        ((q, t, None, 0.0), ValueError, "temperature must be a finite number > 0"),
        ((q, t, None, -0.03), ValueError, "temperature must be"),
    ]:
        for backend in ("torch", "triton"):
            with pytest.raises(error, match=message):
                infonce(*args, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, D, r", [(4096, 2048, 2), (9001, 1000, 1), (257, 80, 0)])
def test_gpu_matches_float64(B, D, r, dtype, tma, monkeypatch):
    monkeypatch.setenv("MOCA_TMA", tma)
    if B > 8192:
        monkeypatch.setattr(infonce_mod, "_CHUNK", 4096)  # exercise the blocked backward on a GPU
    check_against_oracle(make_inputs(B, D, r, dtype=dtype, device="cuda"), "triton")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [131072, 262144])
def test_gpu_memory_is_linear_in_batch(B):
    """D = 2048, bf16: a (B x B) matrix would be 32 GiB at B = 131072; we need the gradients, the
    fp32 dt accumulator (its storage holds the returned dt) and bounded blocks."""
    D = 2048
    q, t, neg = (x.requires_grad_() for x in make_inputs(B, D, 2, dtype=torch.bfloat16, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    infonce(q, t, neg).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = sum(x.numel() * x.element_size() for x in (q, t, neg))
    chunk = infonce_mod._CHUNK
    bound = grads + B * D * 2 + chunk * chunk * 2 + 3 * chunk * D * 4 * 3 + 256 * 2**20
    assert peak <= bound, f"peak {peak / 2**30:.2f} GiB > bound {bound / 2**30:.2f} GiB"
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(t.grad.float()).all()
