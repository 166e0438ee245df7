"""InfoNCE over a (gathered) global batch with per-query hard negatives: `infonce`.

logits_i = [q_i.t_1 .. q_i.t_B, q_i.n_i1 .. q_i.n_ir] / temperature, target i, mean
cross-entropy over the B queries. No (B x B) score matrix ever exists:

* forward: one Triton kernel is a tiled Q T^T GEMM whose epilogue folds each (BM x BN)
  score tile into an online log-sum-exp (fp32, base 2), split over key tiles for
  parallelism; it also takes the row-wise positive and hard-negative dots. Saved for
  backward: the (B,) lse and the (B, r) negative logits.
* backward: embeddings are wide (D = 2048 for the 3B model), so a (BM x D) gradient
  accumulator does not fit on chip and a flash-attention-style fused backward would
  recompute S once per D slice. Instead the host walks (CHUNK x CHUNK) blocks: a Triton
  kernel recomputes the block's scores and writes dS = softmax - onehot (input dtype,
  at most CHUNK^2 elements), then two cuBLAS GEMMs add dS @ T into the chunk's fp32 dq and
  dS^T @ Q into an fp32 dt. That is 4 GEMMs of B^2 D in all (naive: 3, plus B^2 memory).
  Hard negatives belong to one query, so their gradients are row-wise products.
* memory beyond inputs + gradients: O(B) saved by the forward, the CHUNK^2 dS block (128 MiB
  in bf16, whatever B), fp32 (CHUNK, D) dq and (CHUNK, r, D) blocks, and dt's fp32 accumulator,
  downcast in place at the end (its storage holds the returned dt: B D 2 bytes more than a bf16
  gradient, 1 GiB at B = 262144, D = 2048). That accumulator is the price of rounding dt once:
  accumulating it in bf16 would round it B / CHUNK times, and walking the blocks a second time
  column-first (an fp32 (CHUNK, D) accumulator per column chunk) costs a fifth GEMM.
* no gradient in the forward (unlike the LM loss): the exact lse of a row needs all B keys, so
  a gradient-in-forward pass works on (rows, B) blocks; at B = 262144 the 128 MiB scratch holds
  256 rows, and adding each block's dS^T Q into dt would read and write the fp32 (B, D) dt once
  per 256 rows (1024 x 4 GiB of traffic), far more than the recompute GEMM it saves.

* TMA (Hopper, opt-in like the LM loss's GEMMs: recon_loss.SHIPPED_TMA, MOCA_TMA=1): both kernels can
  take their score tiles' operands through host-built TMA descriptors over q and t (or the backward's
  row chunks of them) instead of masked pointer loads; reads past the edges, the K tail too, are zeros.

The torch backend runs the same blocked algorithm with torch ops in fp32; it is the CPU
path. Across ranks, `gathered_infonce` gathers with autograd (`gather_with_grad`).
"""

import math

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels._backend import autocast_off, interpreter_enabled, no_double_backward, resolve
from kernels.recon_loss import _cols_per_split, _desc, _scaled_downcast, _sm_count, _tile_matmul_tma, _use_tma

LOG2E = 1.4426950408889634
# Jitted code may read a module global only if it is a tl.constexpr: the sm_90 compiler refuses a
# plain float global (the interpreter accepts one, so only the compile gate sees this).
_LOG2E_JIT = tl.constexpr(LOG2E)
# Side of the score blocks the backward materialises (elements: CHUNK^2, bounded in B).
_CHUNK = 8192


@triton.jit
def _score_tile(Q, T, QD, TD, row0, col0, n_rows, n_cols, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                TMA: tl.constexpr):
    """fp32 (BM, BN) tile of Q[rows] @ T[cols]^T, rows = row0 + [0, BM), cols = col0 + [0, BN); rows >= n_rows
    and cols >= n_cols read as zeros. TMA: through the descriptors QD over Q (n_rows, D) in BM x BK blocks
    and TD over T (n_cols, D) in BN x BK blocks, whose reads past the edges (the K tail too) are zeros."""
    if TMA:
        return _tile_matmul_tma(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), QD, TD, row0, col0, D, BLOCK_K,
                                False, True, False, INPUT_PRECISION)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    q_rows = Q + rows.to(tl.int64)[:, None] * D  # int64: B * D passes 2^31 at B = 1M, D = 2048
    t_cols = T + cols.to(tl.int64)[None, :] * D
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(q_rows + ks[None, :], mask=(rows[:, None] < n_rows) & (ks[None, :] < D), other=0.0)
        b = tl.load(t_cols + ks[:, None], mask=(cols[None, :] < n_cols) & (ks[:, None] < D), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _row_dot(Q, X, x_row_stride, rows, B, D, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BM,) dots Q[r] . X[r] for each row r (X rows `x_row_stride` elements apart)."""
    q_rows = Q + rows.to(tl.int64)[:, None] * D
    x_rows = X + rows.to(tl.int64)[:, None] * x_row_stride
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < B) & (ks[None, :] < D)
        a = tl.load(q_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_rows + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * x, axis=1)
    return acc


@triton.jit
def _infonce_fwd_kernel(
    Q, T, NEG, M_OUT, L_OUT, POS, NEG_DOT, QD, TD,
    B, D, tiles_per_split, qk_scale,
    R: tl.constexpr, HAS_NEG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Program (s, m), s fastest (recon_loss._cols_per_split): query tile m against key tiles
    [s*tiles_per_split, (s+1)*tiles_per_split).

    Writes the partial base-2 running max and sum of that range to M_OUT[s], L_OUT[s] (B,);
    split 0 also writes the raw positive dots POS (B,) and hard-negative dots NEG_DOT (B, R)
    and folds the negatives into its partial. TMA: score tiles through QD, TD (`_score_tile`), else None.
    """
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if pid_s == 0:
        tl.store(POS + rows, _row_dot(Q, T, D, rows, B, D, BLOCK_M, BLOCK_K), mask=row_ok)
        if HAS_NEG:
            for j in range(R):
                dot = _row_dot(Q, NEG + j * D, R * D, rows, B, D, BLOCK_M, BLOCK_K)
                tl.store(NEG_DOT + rows * R + j, dot, mask=row_ok)
                s = dot * qk_scale
                m_new = tl.maximum(m_i, s)
                l_i = l_i * tl.exp2(m_i - m_new) + tl.exp2(s - m_new)
                m_i = m_new
    n_tiles = tl.cdiv(B, BLOCK_N)
    start = pid_s * tiles_per_split
    end = tl.minimum(start + tiles_per_split, n_tiles)
    for nt in range(start, end):
        cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        s = _score_tile(Q, T, QD, TD, pid_m * BLOCK_M, nt * BLOCK_N, B, B, D, BLOCK_M, BLOCK_N, BLOCK_K,
                        INPUT_PRECISION, TMA) * qk_scale
        s = tl.where(cols[None, :] < B, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(M_OUT + pid_s * B + rows, m_i, mask=row_ok)
    tl.store(L_OUT + pid_s * B + rows, l_i, mask=row_ok)


@triton.jit
def _infonce_dscores_kernel(
    Q, T, LSE, DS, QD, TD,
    C, N, D, ds_stride, diag_offset, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """DS[i, j] = exp(q_i.t_j / tau - lse_i) - [i + diag_offset == j] for a (C, N) block.
    TMA: score tiles through QD, TD (`_score_tile`), else None."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _score_tile(Q, T, QD, TD, tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N, C, N, D, BLOCK_M, BLOCK_N,
                      BLOCK_K, INPUT_PRECISION, TMA)
    lse2 = tl.load(LSE + rows, mask=rows < C, other=0.0) * _LOG2E_JIT
    p = tl.exp2(acc * qk_scale - lse2[:, None])
    p = tl.where(rows[:, None] + diag_offset == cols[None, :], p - 1.0, p)
    mask = (rows[:, None] < C) & (cols[None, :] < N)
    tl.store(DS + rows[:, None] * ds_stride + cols[None, :], p.to(DS.dtype.element_ty), mask=mask)


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes: small in the interpreter (fast tests), GEMM-sized on a GPU; the same with TMA (`_descs`)."""
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if interpreter_enabled():
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, INPUT_PRECISION=precision)
    if dtype == torch.float32:  # exact FMA dots: wider tiles spill on sm_90 (bench/compile_gate.py, triton 3.6 too)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, INPUT_PRECISION=precision, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, INPUT_PRECISION=precision, num_warps=8, num_stages=3)


def _descs(q, t, cfg) -> tuple:
    """(QD, TD, TMA): TMA descriptors of the score GEMM's operands q (rows, D) and t (cols, D) in the tiles of
    cfg, where MOCA_TMA / recon_loss.SHIPPED_TMA want them and the layouts allow; else None, None, False."""
    if not _use_tma(q, t):
        return None, None, False
    return _desc(q, cfg["BLOCK_M"], cfg["BLOCK_K"]), _desc(t, cfg["BLOCK_N"], cfg["BLOCK_K"]), True


def _forward_triton(q, t, neg, temperature):
    """q, t: (B, D), neg: (B, r, D) or None -> lse (B,), pos_dot (B,), neg_dot (B, r) or None; fp32."""
    B, D = q.shape
    cfg = _config(q.dtype)
    row_tiles, key_tiles = triton.cdiv(B, cfg["BLOCK_M"]), triton.cdiv(B, cfg["BLOCK_N"])
    # Split the key range so that small batches fill the machine and the query tiles in flight stay in L2.
    tiles_per_split = _cols_per_split(row_tiles, key_tiles, 2 * _sm_count(q.device.index) if q.is_cuda else 4)
    n_split = triton.cdiv(key_tiles, tiles_per_split)
    r = 0 if neg is None else neg.shape[1]
    m_part = torch.empty(n_split, B, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    pos = torch.empty(B, device=q.device, dtype=torch.float32)
    neg_dot = torch.empty(B, r, device=q.device, dtype=torch.float32) if r else None
    qd, td, tma = _descs(q, t, cfg)
    _infonce_fwd_kernel[(n_split, row_tiles)](
        q, t, neg if r else q, m_part, l_part, pos, neg_dot if r else pos, qd, td,
        B, D, tiles_per_split, LOG2E / temperature,
        R=max(r, 1), HAS_NEG=r > 0, TMA=tma, **cfg,
    )
    m_max = m_part.max(dim=0).values
    lse = (m_max + torch.log2((l_part * torch.exp2(m_part - m_max)).sum(dim=0))) / LOG2E
    return lse, pos, neg_dot


def _forward_torch(q, t, neg, temperature):
    """Same outputs as `_forward_triton`, from fp32 (CHUNK x CHUNK) score blocks."""
    B = q.shape[0]
    lse = torch.full((B,), float("-inf"), device=q.device, dtype=torch.float32)
    pos = torch.empty(B, device=q.device, dtype=torch.float32)
    neg_dot = None if neg is None else torch.empty(B, neg.shape[1], device=q.device, dtype=torch.float32)
    for r0 in range(0, B, _CHUNK):
        rows = slice(r0, r0 + _CHUNK)
        qc = q[rows].float()
        for c0 in range(0, B, _CHUNK):
            s = qc @ t[c0 : c0 + _CHUNK].float().T / temperature  # (C, N)
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(s, dim=1))
        pos[rows] = (qc * t[rows].float()).sum(-1)
        if neg is not None:
            neg_dot[rows] = (neg[rows].float() @ qc[:, :, None]).squeeze(-1)  # (C, r)
    if neg is not None:
        lse = torch.logaddexp(lse, torch.logsumexp(neg_dot / temperature, dim=1))
    return lse, pos, neg_dot


def _dscores_triton(qc, tc, lse_c, diag_offset, temperature, out):
    """qc: (C, D), tc: (N, D), lse_c: (C,) -> out[:C, :N] = softmax block - onehot, input dtype."""
    C, D = qc.shape
    N = tc.shape[0]
    ds = out[:C, :N]
    cfg = _config(qc.dtype)
    grid = (triton.cdiv(C, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    qd, td, tma = _descs(qc, tc, cfg)
    _infonce_dscores_kernel[grid](
        qc, tc, lse_c, ds, qd, td, C, N, D, ds.stride(0), diag_offset, LOG2E / temperature, TMA=tma, **cfg
    )
    return ds


def _dscores_torch(qc, tc, lse_c, diag_offset, temperature, out):
    ds = torch.exp(qc.float() @ tc.float().T / temperature - lse_c[:, None])  # (C, N) fp32
    ds.diagonal(diag_offset).sub_(1.0)
    return ds


def _acc_mm(acc, a, b):
    """acc (fp32) += a @ b. Low-precision operands go through cuBLAS (fp32 accumulate), rounded once."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b.float())
    else:
        acc.add_(a @ b)


def _backward(q, t, neg, lse, neg_dot, grad, temperature, needs, dscores):
    """Gradients of mean_i(lse_i - q_i.t_i / tau) given the forward's lse and negative dots.

    dS = softmax - onehot is produced block by block by `dscores`; every gradient is
    accumulated in fp32 and scaled by grad / (B tau) once at the end.
    """
    need_q, need_t, need_n = needs
    B = q.shape[0]
    coef = grad.float() / (B * temperature)  # 0-d, stays on the device
    dq = torch.empty_like(q) if need_q else None
    dt = torch.zeros(t.shape, device=t.device, dtype=torch.float32) if need_t else None
    dn = torch.empty_like(neg) if (neg is not None and need_n) else None
    side = min(_CHUNK, B)
    buf = torch.empty(side, side, device=q.device, dtype=q.dtype) if dscores is _dscores_triton else None
    for r0 in range(0, B, _CHUNK):
        rows = slice(r0, r0 + _CHUNK)
        qc = q[rows]
        dq_c = torch.zeros(qc.shape, device=q.device, dtype=torch.float32) if need_q else None
        if need_q or need_t:
            for c0 in range(0, B, _CHUNK):
                cols = slice(c0, c0 + _CHUNK)
                ds = dscores(qc, t[cols], lse[rows], r0 - c0, temperature, buf)  # (C, N)
                if need_q:
                    _acc_mm(dq_c, ds, t[cols])
                if need_t:
                    _acc_mm(dt[cols], ds.T, qc)
        if neg is not None:
            p_neg = torch.exp(neg_dot[rows] / temperature - lse[rows, None])  # (C, r)
            if need_q:
                dq_c += (p_neg[:, None, :] @ neg[rows].float()).squeeze(1)
            if need_n:
                dn[rows] = (coef * p_neg[:, :, None] * qc[:, None, :].float()).to(neg.dtype)
        if need_q:
            dq[rows] = (dq_c * coef).to(q.dtype)
    if need_t:
        dt = _scaled_downcast(dt, coef, t.dtype)  # in dt's own storage: no second (B, D) buffer
    return dq, dt, dn


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, t, neg, temperature, backend):
        fwd = _forward_triton if backend == "triton" else _forward_torch
        lse, pos, neg_dot = fwd(q, t, neg, temperature)
        ctx.save_for_backward(q, t, neg, lse, neg_dot)
        ctx.temperature, ctx.backend = temperature, backend
        return (lse - pos / temperature).mean()

    @staticmethod
    @no_double_backward("infonce")
    @autocast_off
    def backward(ctx, grad):
        q, t, neg, lse, neg_dot = ctx.saved_tensors
        dscores = _dscores_triton if ctx.backend == "triton" else _dscores_torch
        dq, dt, dn = _backward(q, t, neg, lse, neg_dot, grad, ctx.temperature, ctx.needs_input_grad[:3], dscores)
        return dq, dt, dn, None, None


def infonce(q, t, negatives=None, temperature=0.03, backend=None):
    """Mean InfoNCE loss (fp32 scalar) with in-batch and per-query hard negatives (MOCA.md §3; tau 0.03).

    q: (B, D) queries; t: (B, D) positives, t_i for q_i and every other row an in-batch
    negative; negatives: (B, r, D) or None, q_i's own hard negatives; all one dtype
    (fp32, fp16 or bf16; accumulation is fp32). temperature: host float. Gradients flow to
    q, t and negatives. Memory beyond inputs and gradients: O(B) saved for backward, for
    16-bit inputs the fp32 (B, D) dt accumulator whose storage the returned dt keeps, and
    (CHUNK x CHUNK) + (CHUNK x r x D) blocks; never a (B x B) matrix. Raises ValueError for bad
    shapes or a temperature that is not > 0, TypeError for mismatched dtypes or devices. No double
    backward (create_graph=True): differentiating the gradients raises a RuntimeError.
    """
    def need(ok, msg, error=ValueError):
        if not ok:
            raise error(msg)

    need(q.dim() == 2 and t.shape == q.shape, f"q, t must both be (B, D); got {tuple(q.shape)}, {tuple(t.shape)}")
    need(q.shape[0] > 0, "empty batch")
    need(t.dtype == q.dtype and t.device == q.device, f"t: {t.dtype} on {t.device}, q: {q.dtype} on {q.device}", TypeError)
    need(q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"fp32, fp16 or bf16 inputs, got {q.dtype}", TypeError)
    need(math.isfinite(temperature) and temperature > 0, f"temperature must be a finite number > 0, got {temperature}")
    if negatives is not None:
        need(negatives.dim() == 3 and negatives.shape[0] == q.shape[0] and negatives.shape[2] == q.shape[1],
             f"negatives must be (B, r, D) = ({q.shape[0]}, r, {q.shape[1]}); got {tuple(negatives.shape)}")
        need(negatives.dtype == q.dtype and negatives.device == q.device,
             f"negatives: {negatives.dtype} on {negatives.device}, q: {q.dtype} on {q.device}", TypeError)
        negatives = negatives.contiguous() if negatives.shape[1] > 0 else None
    backend = resolve(backend, q)
    return _InfoNCE.apply(q.contiguous(), t.contiguous(), negatives, float(temperature), backend)


def gather_with_grad(x):
    """All ranks' x concatenated along dim 0 in rank order, with autograd.

    x: (n, ...) with the same n on every rank -> (world * n, ...). Backward returns this
    rank's slice of the gradients summed over ranks (a reduce-scatter). Identity when
    torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed._functional_collectives as fc

    # the autograd-aware gather: all_gather_single in newer torch (2.13 here), all_gather_tensor_autograd in
    # older releases (the GPU image's 2.11; deprecated in 2.13, hence not used where the new name exists)
    gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor_autograd
    return fc.wait_tensor(gather(x.contiguous(), 0, dist.group.WORLD))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gathered_infonce(q, t, negatives=None, temperature=0.03, backend=None):
    """InfoNCE over the batch gathered from every rank (each holds an equal-sized slice).

    Convention: the returned loss on every rank equals the single-process loss on the
    concatenated batch, and the gradients of this rank's q, t, negatives equal the
    full-batch gradients of those rows. (Every rank backpropagates the same loss, and
    the gather's backward sums over ranks, so the loss's gradient is scaled by 1/world.)
    DDP averages parameter gradients over ranks, so a trainer that wants the full-batch
    parameter gradient under DDP backpropagates `world_size * loss`.
    """
    world = dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1
    loss = infonce(
        gather_with_grad(q),
        gather_with_grad(t),
        None if negatives is None else gather_with_grad(negatives),
        temperature,
        backend,
    )
    return _ScaleGrad.apply(loss, 1.0 / world) if world > 1 else loss
