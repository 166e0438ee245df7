"""Packed variable-length bidirectional attention: `varlen_attention`.

q: (T, Hq, D); k, v: (T, Hkv, D) with Hq % Hkv == 0 (GQA); cu_seqlens: (B+1,) int32;
max_seqlen: host int. A token attends to every token of its own segment and nothing else.

Flash attention in Triton (after Triton's 06-fused-attention tutorial): online softmax with fp32
accumulators, exp2 with log2(e) folded into the scale, the per-row log-sum-exp (fp32, log2 units)
saved so that the backward recomputes P tile by tile; the (T x T) scores never exist.

Design decisions a reader must know:
* Schedule. Every kernel runs on a flat 1-D grid of (tile slot) x heads, heads fastest. A slot is
  one row tile of one segment; the slot -> (segment, tile) table is built on the device from
  cu_seqlens by a handful of torch ops (no host sync), longest segments first. Unlike the
  (cdiv(max_seqlen, BLOCK) x B x H) grid of flash-attn's varlen kernels, whose programs mostly
  exit at once when one 32k segment shares a batch with a thousand 16-token ones (256k empty
  programs per head), the table launches only real tiles plus at most B spare slots
  (cdiv(T, BLOCK) + B bounds the tile count, so the grid size needs only host ints). Longest
  first puts the long-running tiles at the front and lets the short ones fill the tail (LPT).
  Slot order keeps a segment's tiles, and a GQA group's heads, adjacent for L2 reuse of K/V.
  The table depends on the tile size, so it is (re)built by the autotune config's pre_hook.
* Head dims. Tiles cover D as a power-of-two part plus a power-of-two tail (80 = 64 + 16,
  96 = 64 + 32, 128 = 128 + 0): no FLOPs are spent on padding for the vision tower's 80, and
  callers never pad. Odd sizes get a masked tail.
* Backward. A dk/dv program owns one key tile of one kv head and loops over every query tile
  of its group of query heads, so GQA needs no atomics; dq is a second kernel over query tiles.
* Interpreter. Triton's CPU interpreter gets bf16/fp16 arithmetic wrong: there (UPCAST) every
  tile is cast to fp32 after loading, while P and dS are still rounded through the input dtype
  so that the interpreter reproduces the GPU's rounding.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._backend import interpreter_enabled, resolve

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Reference: one SDPA call per segment (the CPU backend and the test oracle)."""
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q_s, k_s, v_s = (x[start:end].transpose(0, 1) for x in (q, k, v))  # (H, L, D)
        o = F.scaled_dot_product_attention(q_s, k_s, v_s, scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _load_tile(base, rows, row_ok, stride, cols, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), len(cols)) tile of a row-major (rows, HEAD_DIM) slab; rows/cols outside read as 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    if MASK_D:
        x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(base, rows, row_ok, stride, cols, x, HEAD_DIM: tl.constexpr, MASK_D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride + cols[None, :]
    x = x.to(base.dtype.element_ty)
    if MASK_D:
        tl.store(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM))
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _as_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """Round an fp32 tile to the input dtype for a tensor-core dot (kept in fp32 under the interpreter)."""
    x = x.to(DTYPE)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _segment(CU, SCHED, slot):
    """(segment start token, segment length, tile index) of a slot; length 0 for a spare slot."""
    seg = tl.load(SCHED + 2 * slot)
    tile = tl.load(SCHED + 2 * slot + 1)
    start = tl.load(CU + seg)
    seqlen = tl.load(CU + seg + 1) - start
    return start.to(tl.int64), seqlen, tile


@triton.jit
def _fwd_tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt, start_n, seqlen, qk_scale,
              offs_n, d0, d1, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASK_N: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, DTYPE: tl.constexpr):
    """One (BLOCK_M x BLOCK_N) step of the online softmax; MASK_N only on a segment's last key tile."""
    cols = start_n + offs_n
    col_ok = cols < seqlen
    k0 = _load_tile(k_base, cols, col_ok, stride_kt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
    if D1 > 0:
        k1 = _load_tile(k_base, cols, col_ok, stride_kt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
    if MASK_N:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = _as_operand(p, DTYPE, UPCAST)
    v0 = _load_tile(v_base, cols, col_ok, stride_vt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
    if D1 > 0:
        v1 = _load_tile(v_base, cols, col_ok, stride_vt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
    return acc0, acc1, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    n_tokens, qk_scale, seq_bucket,
    H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    slot = pid // H
    head = pid % H
    start, seqlen, tile = _segment(CU, SCHED, slot)
    if seqlen <= tile * BLOCK_M:  # spare slot
        return
    kv_head = head // GROUP
    q_base = Q + start * stride_qt + head * stride_qh
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    o_base = O + start * stride_ot + head * stride_oh
    DTYPE: tl.constexpr = Q.dtype.element_ty

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    q0 = _load_tile(q_base, rows, row_ok, stride_qt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(q_base, rows, row_ok, stride_qt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # placeholders, never read
        d1 = d0
        q1 = q0
        acc1 = tl.zeros([1, 1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, l_i, m_i = _fwd_tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                         start_n, seqlen, qk_scale, offs_n, d0, d1, HEAD_DIM, D0, D1, False,
                                         UPCAST, DOT_PREC, DTYPE)  # fmt: skip
    if n_full < seqlen:
        acc0, acc1, l_i, m_i = _fwd_tile(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_kt, stride_vt,
                                         n_full, seqlen, qk_scale, offs_n, d0, d1, HEAD_DIM, D0, D1, True,
                                         UPCAST, DOT_PREC, DTYPE)  # fmt: skip

    inv_l = 1.0 / l_i
    _store_tile(o_base, rows, row_ok, stride_ot, d0, acc0 * inv_l[:, None], HEAD_DIM, D0 > HEAD_DIM)
    if D1 > 0:
        _store_tile(o_base, rows, row_ok, stride_ot, d1, acc1 * inv_l[:, None], HEAD_DIM, D0 + D1 > HEAD_DIM)
    tl.store(LSE + head * n_tokens + start + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, n_tokens,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] (fp32), the softmax-gradient row term."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tokens
    cols = tl.arange(0, BLOCK_D)
    o = _load_tile(O + head * stride_oh, rows, row_ok, stride_ot, cols, HEAD_DIM, BLOCK_D > HEAD_DIM, True)
    do = _load_tile(DO + head * stride_doh, rows, row_ok, stride_dot, cols, HEAD_DIM, BLOCK_D > HEAD_DIM, True)
    tl.store(DELTA + head * n_tokens + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    n_tokens, qk_scale, sm_scale, seq_bucket,
    H_KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile of one kv head, summed over every query tile of the GROUP query heads."""
    pid = tl.program_id(0)
    slot = pid // H_KV
    kv_head = pid % H_KV
    start, seqlen, tile = _segment(CU, SCHED, slot)
    if seqlen <= tile * BLOCK_N:
        return
    DTYPE: tl.constexpr = Q.dtype.element_ty
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seqlen
    d0 = tl.arange(0, D0)
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    k0 = _load_tile(k_base, cols, col_ok, stride_kt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    v0 = _load_tile(v_base, cols, col_ok, stride_vt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        k1 = _load_tile(k_base, cols, col_ok, stride_kt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        v1 = _load_tile(v_base, cols, col_ok, stride_vt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    else:  # placeholders, never read
        dk1 = tl.zeros([1, 1], dtype=tl.float32)
        dv1 = tl.zeros([1, 1], dtype=tl.float32)

    # Padded query rows read q = do = 0, lse = +inf, so their P^T column is exactly 0: no score mask.
    # Padded key rows only pollute their own (never stored) dk/dv rows.
    n_m = tl.cdiv(seqlen, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    for it in range(0, GROUP * n_m):  # one flat loop over (query head of the group, query tile)
        g = it // n_m
        head = kv_head * GROUP + g
        rows = (it - g * n_m) * BLOCK_M + offs_m
        row_ok = rows < seqlen
        q_base = Q + start * stride_qt + head * stride_qh
        do_base = DO + start * stride_dot + head * stride_doh
        q0 = _load_tile(q_base, rows, row_ok, stride_qt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
        do0 = _load_tile(do_base, rows, row_ok, stride_dot, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
        lse = tl.load(LSE + head * n_tokens + start + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + head * n_tokens + start + rows, mask=row_ok, other=0.0)
        qkT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if D1 > 0:
            q1 = _load_tile(q_base, rows, row_ok, stride_qt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
            do1 = _load_tile(do_base, rows, row_ok, stride_dot, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
            qkT = tl.dot(k1, tl.trans(q1), qkT, input_precision=DOT_PREC)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        pT_op = _as_operand(pT, DTYPE, UPCAST)
        dv0 = tl.dot(pT_op, do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if D1 > 0:
            dv1 = tl.dot(pT_op, do1, dv1, input_precision=DOT_PREC)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
        dsT = _as_operand(pT * (dpT - delta[None, :]), DTYPE, UPCAST)
        dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
        if D1 > 0:
            dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)

    dk_base = DK + start * stride_dkt + kv_head * stride_dkh
    dv_base = DV + start * stride_dvt + kv_head * stride_dvh
    _store_tile(dk_base, cols, col_ok, stride_dkt, d0, dk0 * sm_scale, HEAD_DIM, D0 > HEAD_DIM)
    _store_tile(dv_base, cols, col_ok, stride_dvt, d0, dv0, HEAD_DIM, D0 > HEAD_DIM)
    if D1 > 0:
        _store_tile(dk_base, cols, col_ok, stride_dkt, d1, dk1 * sm_scale, HEAD_DIM, D0 + D1 > HEAD_DIM)
        _store_tile(dv_base, cols, col_ok, stride_dvt, d1, dv1, HEAD_DIM, D0 + D1 > HEAD_DIM)


@triton.jit
def _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, seqlen, qk_scale,
             offs_n, d0, d1, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASK_N: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, DTYPE: tl.constexpr):
    cols = start_n + offs_n
    col_ok = cols < seqlen
    k0 = _load_tile(k_base, cols, col_ok, stride_kt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    v0 = _load_tile(v_base, cols, col_ok, stride_vt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
    dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
    if D1 > 0:
        k1 = _load_tile(k_base, cols, col_ok, stride_kt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        v1 = _load_tile(v_base, cols, col_ok, stride_vt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
        dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
    p = tl.exp2(qk * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where(col_ok[None, :], p, 0.0)
    ds = _as_operand(p * (dp - delta[:, None]), DTYPE, UPCAST)
    dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
    if D1 > 0:
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    n_tokens, qk_scale, sm_scale, seq_bucket,
    H: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq of one query tile of one query head, looping over the segment's key tiles."""
    pid = tl.program_id(0)
    slot = pid // H
    head = pid % H
    start, seqlen, tile = _segment(CU, SCHED, slot)
    if seqlen <= tile * BLOCK_M:
        return
    kv_head = head // GROUP
    DTYPE: tl.constexpr = Q.dtype.element_ty
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    q_base = Q + start * stride_qt + head * stride_qh
    do_base = DO + start * stride_dot + head * stride_doh
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    q0 = _load_tile(q_base, rows, row_ok, stride_qt, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    do0 = _load_tile(do_base, rows, row_ok, stride_dot, d0, HEAD_DIM, D0 > HEAD_DIM, UPCAST)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = _load_tile(q_base, rows, row_ok, stride_qt, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        do1 = _load_tile(do_base, rows, row_ok, stride_dot, d1, HEAD_DIM, D0 + D1 > HEAD_DIM, UPCAST)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # placeholders, never read
        d1 = d0
        q1 = q0
        do1 = do0
        dq1 = tl.zeros([1, 1], dtype=tl.float32)
    # Padded query rows read q = do = 0 and lse = delta = 0: finite, and never stored.
    lse = tl.load(LSE + head * n_tokens + start + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + head * n_tokens + start + rows, mask=row_ok, other=0.0)

    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n,
                            seqlen, qk_scale, offs_n, d0, d1, HEAD_DIM, D0, D1, False, UPCAST, DOT_PREC, DTYPE)
    if n_full < seqlen:
        dq0, dq1 = _dq_tile(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_kt, stride_vt, n_full,
                            seqlen, qk_scale, offs_n, d0, d1, HEAD_DIM, D0, D1, True, UPCAST, DOT_PREC, DTYPE)

    dq_base = DQ + start * stride_dqt + head * stride_dqh
    _store_tile(dq_base, rows, row_ok, stride_dqt, d0, dq0 * sm_scale, HEAD_DIM, D0 > HEAD_DIM)
    if D1 > 0:
        _store_tile(dq_base, rows, row_ok, stride_dqt, d1, dq1 * sm_scale, HEAD_DIM, D0 + D1 > HEAD_DIM)


# ----------------------------------------------------------------------------- schedule and configs


def _n_slots(n_tokens: int, n_segments: int, block: int) -> int:
    """Upper bound on sum_i cdiv(len_i, block) from host ints only: cdiv(T, block) + B."""
    return triton.cdiv(n_tokens, block) + n_segments


def _fill_schedule(sched, cu_seqlens, n_tokens: int, block: int) -> None:
    """sched[s] = (segment, tile) for the s-th tile slot, longest segments first; spare slots get a
    tile past their segment's end. sched: (>= n_slots, 2) int32. Device ops only: no host sync."""
    n_seg = cu_seqlens.numel() - 1
    n = _n_slots(n_tokens, n_seg, block)
    tiles = (cu_seqlens[1:] - cu_seqlens[:-1] + block - 1).div(block, rounding_mode="floor").long()  # (B,)
    order = torch.argsort(tiles, descending=True, stable=True)
    tiles = tiles[order]
    ends = tiles.cumsum(0)
    slot = torch.arange(n, device=sched.device)
    rank = torch.searchsorted(ends, slot, right=True).clamp_(max=n_seg - 1)
    tile = slot - ends[rank] + tiles[rank]  # >= tiles[rank] (so skipped) for spare slots
    sched[:n].copy_(torch.stack((order[rank], tile), 1))


def _schedule_hook(block_key: str):
    """Autotune pre_hook: the slot table depends on the tile size of the config being launched."""

    def hook(nargs):
        _fill_schedule(nargs["SCHED"], nargs["CU"], nargs["n_tokens"], nargs[block_key])

    return hook


def _configs(space, block_key: str, interp: tuple):
    """Autotune configs; under the interpreter one small fixed config (speed there is irrelevant)."""
    hook = _schedule_hook(block_key)
    if interpreter_enabled():
        (bm, bn) = interp
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1, pre_hook=hook)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook)
        for bm, bn, w in space
        for s in (2, 3, 4)
    ]


# H100 candidates (BLOCK_M, BLOCK_N, warps): 8 warps only where a tile has 128 rows to share.
_FWD_SPACE = [(128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 4)]
_DKDV_SPACE = [(32, 128, 4), (64, 128, 8), (64, 64, 4), (32, 64, 4)]  # BLOCK_N: key tile (scheduled)
_DQ_SPACE = [(128, 32, 4), (128, 64, 8), (64, 64, 4), (64, 32, 4)]  # BLOCK_M: query tile (scheduled)
_KEY = ["HEAD_DIM", "GROUP", "seq_bucket"]

_attn_fwd = triton.autotune(_configs(_FWD_SPACE, "BLOCK_M", (64, 64)), key=_KEY)(_attn_fwd_kernel)
_attn_bwd_dkdv = triton.autotune(_configs(_DKDV_SPACE, "BLOCK_N", (32, 64)), key=_KEY)(_attn_bwd_dkdv_kernel)
_attn_bwd_dq = triton.autotune(_configs(_DQ_SPACE, "BLOCK_M", (64, 32)), key=_KEY)(_attn_bwd_dq_kernel)
_MIN_SCHED_BLOCK = 16  # the smallest scheduled tile of any config: sizes the slot-table buffer


# ----------------------------------------------------------------------------- host launchers


def _split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): a power-of-two chunk plus a power-of-two tail (0 if none), each >= 16, covering d."""
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    return (d, 0) if d0 == d else (d0, max(16, triton.next_power_of_2(d - d0)))


def _meta(q, k, max_seqlen):
    """Launch constants shared by the three kernels."""
    upcast = interpreter_enabled() and q.dtype != torch.float32
    d0, d1 = _split_head_dim(q.shape[2])
    return dict(
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=q.shape[2],
        D0=d0,
        D1=d1,
        UPCAST=upcast,
        DOT_PREC="ieee" if (q.dtype == torch.float32 or upcast) else "tf32",
    ), min(triton.next_power_of_2(max(int(max_seqlen), 64)), 8192)


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v, cu_seqlens):
    assert q.dim() == 3 and k.dim() == 3 and k.shape == v.shape, "q: (T, Hq, D), k/v: (T, Hkv, D)"
    assert k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2], f"q {tuple(q.shape)} vs k {tuple(k.shape)}"
    assert q.shape[1] % k.shape[1] == 0, "Hq must be a multiple of Hkv"
    assert q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v: one of fp16/bf16/fp32"
    assert q.shape[2] <= 256, "head_dim <= 256"
    assert cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device


def _attn_fwd_launch(q, k, v, cu_seqlens, max_seqlen, scale):
    """q: (T, Hq, D), k/v: (T, Hkv, D), cu_seqlens: (B+1,) int32 -> o: (T, Hq, D), lse: (Hq, T) fp32 in log2 units."""
    _check(q, k, v, cu_seqlens)
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    T, H, _ = q.shape
    n_seg = cu_seqlens.numel() - 1
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    if T == 0 or n_seg == 0:
        return o.zero_(), lse
    meta, bucket = _meta(q, k, max_seqlen)
    sched = torch.empty((_n_slots(T, n_seg, _MIN_SCHED_BLOCK), 2), device=q.device, dtype=torch.int32)
    grid = lambda META: (_n_slots(T, n_seg, META["BLOCK_M"]) * H,)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, o, lse, cu_seqlens, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        T, scale * LOG2E, bucket, H=H, **meta,
    )  # fmt: skip
    return o, lse


def _attn_bwd_launch(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    """do/q/o: (T, Hq, D), k/v: (T, Hkv, D), lse: (Hq, T) -> dq (T, Hq, D), dk, dv (T, Hkv, D)."""
    q, k, v, do = _rowmajor(q), _rowmajor(k), _rowmajor(v), _rowmajor(do)
    T, H, D = q.shape
    H_kv = k.shape[1]
    n_seg = cu_seqlens.numel() - 1
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if T == 0 or n_seg == 0:
        return dq, dk, dv
    meta, bucket = _meta(q, k, max_seqlen)
    delta = torch.empty((H, T), device=q.device, dtype=torch.float32)
    block_t = 64
    _attn_bwd_preprocess[(triton.cdiv(T, block_t), H)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t,
    )  # fmt: skip
    sched = torch.empty((_n_slots(T, n_seg, _MIN_SCHED_BLOCK), 2), device=q.device, dtype=torch.int32)
    common = (T, scale * LOG2E, scale, bucket)
    _attn_bwd_dkdv[lambda META: (_n_slots(T, n_seg, META["BLOCK_N"]) * H_kv,)](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *common, H_KV=H_kv, **meta,
    )  # fmt: skip
    # The dq launch's pre_hook refills `sched` on the same stream, so after dkdv has read it.
    _attn_bwd_dq[lambda META: (_n_slots(T, n_seg, META["BLOCK_M"]) * H,)](
        q, k, v, do, lse, delta, dq, cu_seqlens, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), *common, H=H, **meta,
    )  # fmt: skip
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        o, lse = _attn_fwd_launch(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attn_bwd_launch(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, backend=None):
    """q: (T, Hq, D), k/v: (T, Hkv, D), cu_seqlens: (B+1,) int32, max_seqlen: int -> (T, Hq, D)."""
    if resolve(backend, q) == "torch":
        return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale)
