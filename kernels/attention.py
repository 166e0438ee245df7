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
  The table depends on the tile size, so it is built per launch for the launched config's tile.
* Packed tiles. Batches whose segments are all short (max_seqlen <= tuned.PACKED_MAX_SEQLEN, a host
  int) run the same kernels with PACKED: program i owns tokens [i * BLOCK, (i + 1) * BLOCK) whatever
  segments they belong to, its keys run from the start of its first row's segment to the end of its
  last row's, and a block-diagonal mask from per-token segment ids (one (T,) int32 table built on the
  device, in place of the slot table) keeps every row inside its segment. A 64-patch vision window or
  a 30-token CL text then shares a tile with its neighbours instead of owning a mostly empty one, and
  the grid is cdiv(T, BLOCK) x heads. dk/dv tiles loop over their keys' query range the same way, so
  the backward still needs no atomics. A tile boundary may cut a segment (each row still sees all of
  it): the threshold decides speed, never correctness. A batch with long segments too (MMEB: texts
  and images) runs both kernels on disjoint rows when its mean length says short ones are many
  (`path`): the packed kernel skips the tokens of long segments (segment id -1), the slot table
  gives short segments no tiles.
* Configs. Each (architecture, kernel, dtype, seq bucket) gets its config from kernels/tuned.py,
  so no first call pays for autotuning; MOCA_AUTOTUNE=1 autotunes over `candidates` instead (the
  tuning path: bench/tune_attention.py). bench/compile_gate.py compiles all of them for sm_90 on a CPU.
* TMA (Hopper). With the config's TMA flag (kernels/tuned.py) or MOCA_TMA=1, the operands a kernel
  streams through its inner loop (k, v in fwd and dq; q, do in dk/dv) load through host-built TMA
  descriptors over their 2-D (T, heads * D) views instead of masked pointer loads: one bulk copy per
  tile, no address arithmetic in registers. The copy ignores segments, so a tile running past its
  segment's end brings in the next segment's tokens (only past T does it read zeros); the masks that
  already exist make them weigh nothing (-inf scores, P = 0, or an lse of +inf for dk/dv's query rows),
  and tests/test_attention.py checks that no segment leaks. Views need heads adjacent in a token,
  16-byte alignment and no masked head-dim tail (`_tma_ok`); others keep pointer loads.
* Warp specialization (Hopper; kernels/tuned.py WARP_SPECIALIZE, MOCA_WS=1). The per-segment forward and
  dq kernels of 16-bit inputs can hand their key loops to Triton's automatic warp specialization
  (`tl.range(..., warp_specialize=True)`): a producer warp group issues the TMA loads of k and v while
  consumer warp groups run the wgmma dots and the softmax, with registers moved from producer to consumers
  (setmaxnreg), as flash-attention 3 does by hand. The compiler partitions only loops of one shape, so this
  form (WS) loads the tiles a program keeps (q; q and do for dq) through TMA descriptors too (a
  pointer-loaded tile trips its partitioner), has no early exit (a spare slot runs zero key tiles and stores
  nothing) and runs one loop over every key tile, masking the segment's end in each instead of peeling the
  last. Its tiles are its own (4 warps per group, 12 launched), only some Triton versions compile it
  (tuned.ws_available), and packed tiles keep the plain kernels. dk/dv stays plain: its loop also reads lse
  and delta rows, which TMA cannot fetch from any token (a box starts on a 16-byte boundary), and with them
  staged through a 16-byte-row copy the partitioner still failed at head dim 80 under 3.6 and at most tiles
  under 3.9.
* Head dims. Tiles cover D as a power-of-two part plus a power-of-two tail (80 = 64 + 16,
  96 = 64 + 32, 128 = 128 + 0): no FLOPs are spent on padding for the vision tower's 80, and
  callers never pad. Odd sizes get a masked tail.
* Backward. A dk/dv program owns one key tile of one kv head and loops over every query tile
  of its group of query heads, so GQA needs no atomics; dq is a second kernel over query tiles, which
  recomputes the score and dP tiles (7 GEMMs per tile pair in all). With the fused dq (16-bit inputs;
  kernels/tuned.py FUSED_DQ, MOCA_FUSED_DQ=1) the dk/dv program also adds dS K for each query tile it
  visits into an fp32 (T, Hq, D) buffer with relaxed atomics, as flash-attn 2/3 do (5 GEMMs, no dq
  kernel; the fp32 sum order then varies run to run). Every tile must then run exactly once: the slot
  table's spare slots exit at once, as do tiles of segments left to the other tiling.
* Interpreter. Triton's CPU interpreter gets bf16 arithmetic wrong (triton-lang/triton#11584):
  there the launchers hand the kernels fp32 copies, and the kernels still round P and dS through
  the input dtype (the DTYPE constexpr), so the interpreter reproduces the GPU's rounding.
"""

import functools
import math
import operator
import os
import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels import tuned
from kernels._backend import interpreter_enabled, resolve, switch, tma_aligned

LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen=None, scale=None):
    """Reference: SDPA per run of consecutive equal-length segments (the CPU backend, and the
    tests' same-dtype yardstick). Runs batch the vision tower's equal windows into one call;
    4-D inputs let CPU SDPA take its flash kernel."""
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    outs = []
    i, n = 0, len(bounds) - 1
    while i < n:
        length = bounds[i + 1] - bounds[i]
        j = i + 1
        while j < n and bounds[j + 1] - bounds[j] == length:
            j += 1
        if length:
            start, end = bounds[i], bounds[j]
            q_s, k_s, v_s = (x[start:end].unflatten(0, (j - i, length)).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(q_s, k_s, v_s, scale=scale, enable_gqa=gqa)  # (S, H, L, D)
            outs.append(o.transpose(1, 2).flatten(0, 1))
        i = j
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


# ----------------------------------------------------------------------------- Triton kernels
# Every head-dim quantity comes in two column chunks: `*0` over d0 = [0, D0) and `*1` over
# d1 = D0 + [0, D1) (absent when D1 == 0, where placeholders stand in and are never read).
# dm0/dm1 are the (1, D) column masks (d < HEAD_DIM). Segment-relative offsets are int32; the
# segment start is int64 (the host checks max_seqlen * row stride < 2**31).


@triton.jit
def _slot(CU, SCHED, slot, n_tokens, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """(start, row0, n_rows, n_keys) of a slot: its tile is rows [row0, row0 + BLOCK) & [0, n_rows)
    of the token range that starts at token `start` (int64), and its keys are [0, n_keys) of that range.
    Per segment, SCHED[slot] = (segment, tile) and the range is the segment (n_keys = n_rows = its
    length). PACKED, SCHED is the per-token segment id (-1 for a segment left to the per-segment
    kernel), the tile is tokens slot * BLOCK + [0, BLOCK), and the range runs from the start of its
    first packed row's segment to the end of its last one's (a tile with none is a spare slot)."""
    if PACKED:
        first = slot * BLOCK
        rows = first + tl.arange(0, BLOCK)
        mine = tl.load(SCHED + rows, mask=rows < n_tokens, other=-1) >= 0
        r_lo = tl.min(tl.where(mine, rows, n_tokens), 0)
        r_hi = tl.max(tl.where(mine, rows, -1), 0)
        lo = tl.load(CU + tl.load(SCHED + r_lo, mask=r_hi >= 0, other=0))
        hi = tl.load(CU + tl.load(SCHED + r_hi, mask=r_hi >= 0, other=0) + 1)
        start = lo.to(tl.int64)
        row0 = first - lo  # < 0 when the tile opens with unpacked rows: they are real tokens, never stored
        n_rows = tl.where(r_hi >= 0, n_tokens - lo, row0)  # row0: spare
        n_keys = hi - lo
    else:
        seg = tl.load(SCHED + 2 * slot)
        row0 = tl.load(SCHED + 2 * slot + 1) * BLOCK
        seg_start = tl.load(CU + seg)
        n_rows = tl.load(CU + seg + 1) - seg_start
        start = seg_start.to(tl.int64)
        n_keys = n_rows
    return start, row0, n_rows, n_keys


@triton.jit
def _tile_tokens(SCHED, start, first, n, BLOCK: tl.constexpr, PACKED: tl.constexpr):
    """(tokens first + [0, BLOCK) of the range at `start`, their segment ids (per segment: the tokens
    themselves, never compared), which of them this program owns: those in [0, n) and, PACKED, those of
    a packed segment (the rest belong to the per-segment kernel)."""
    idx = first + tl.arange(0, BLOCK)
    own = idx < n
    seg = idx
    if PACKED:
        seg = tl.load(SCHED + start + idx, mask=own, other=-1)
        own = own & (seg >= 0)
    return idx, seg, own


@triton.jit
def _same_segment(SEG, seg_q, offs, n, PAD_Q: tl.constexpr):
    """(len(seg_q), len(offs)) mask: query row and key offs (< n, in the range at SEG) share a segment.
    PAD_Q: rows that are not stored (seg_q < 0) see every key, so their scores stay finite."""
    seg_k = tl.load(SEG + offs, mask=offs < n, other=-2)
    keep = seg_q[:, None] == seg_k[None, :]
    if PAD_Q:
        keep = keep | (seg_q < 0)[:, None]
    return keep


@triton.jit
def _load_rows(ptrs, desc, row, col, mask, TMA: tl.constexpr):
    """A tile of a streamed operand (k, v in fwd and dq; q, do in dk/dv). TMA: from `desc` at (row, col)
    of its 2-D (T, heads * D) view: rows past the segment come in too (their scores are masked or their
    lse is +inf, so they weigh 0), rows past T read 0. Else a pointer load, 0 outside `mask`."""
    if TMA:
        x = desc.load([row, col])
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, dm0, dm1,
               stride_kt, stride_vt, lo, hi, seqlen, qk_scale, offs_n, SEG, seg_q,
               KD0, KD1, VD0, VD1, row, col,
               D0: tl.constexpr, D1: tl.constexpr, MASK_N: tl.constexpr, DTYPE: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr, TMA: tl.constexpr,
               WS: tl.constexpr = False):  # fmt: skip
    """Online-softmax steps over the key tiles starting in [lo, hi); MASK_N for a segment's partial last tile.
    PACKED: keys [0, seqlen) hold several segments, seg_q/SEG their ids (block-diagonal mask).
    TMA: k, v tiles through descriptors KD*/VD*, key 0 being row `row`, head dim 0 column `col` of their views.
    WS: the loop is handed to Triton's warp specialization (a TMA producer, wgmma consumers)."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        mask0 = dm0
        mask1 = dm1
        if MASK_N:
            col_ok = (start_n + offs_n) < seqlen
            mask0 = col_ok[:, None] & dm0
            mask1 = col_ok[:, None] & dm1
        k0 = _load_rows(k_ptrs0 + start_n * stride_kt, KD0, row + start_n, col, mask0, TMA)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        if D1 > 0:
            k1 = _load_rows(k_ptrs1 + start_n * stride_kt, KD1, row + start_n, col + D0, mask1, TMA)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
        if PACKED:
            qk = tl.where(_same_segment(SEG, seg_q, start_n + offs_n, seqlen, True), qk, float("-inf"))
        elif MASK_N:
            qk = tl.where(col_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(DTYPE).to(q0.dtype)  # P rounded to the input dtype, as the tensor cores take it
        v0 = _load_rows(v_ptrs0 + start_n * stride_vt, VD0, row + start_n, col, mask0, TMA)
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if D1 > 0:
            v1 = _load_rows(v_ptrs1 + start_n * stride_vt, VD1, row + start_n, col + D0, mask1, TMA)
            acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit(do_not_specialize=["n_tokens"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU, SCHED, KD0, KD1, VD0, VD1, QD0, QD1,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    n_tokens, qk_scale, seq_bucket,
    H, GROUP, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr = False,
):  # fmt: skip
    """o, lse of one query tile of one head; lse = log2(sum exp2(scores * qk_scale)), fp32.
    TMA: k and v tiles through the descriptors KD0/KD1, VD0/VD1 (head-dim chunks 0 and 1), else None.
    WS (per segment, with TMA): the warp-specialized form: q through QD0/QD1 too, no early exit, and one
    masked loop over the key tiles, which is what Triton's Hopper warp specialization can partition."""
    tl.static_assert(not WS or (TMA and not PACKED), "the warp-specialized forward is per segment, with TMA")
    pid = tl.program_id(0)
    slot = pid // H
    head = pid % H
    start, row0, seqlen, n_keys = _slot(CU, SCHED, slot, n_tokens, BLOCK_M, PACKED)
    if WS:
        n_keys = tl.where(row0 < seqlen, n_keys, 0)  # a spare slot runs no key tile and stores nothing
    else:
        if seqlen <= row0:  # spare slot
            return
    kv_head = head // GROUP
    q_base = Q + start * stride_qt + head * stride_qh
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    o_base = O + start * stride_ot + head * stride_oh

    rows, seg_q, row_in = _tile_tokens(SCHED, start, row0, seqlen, BLOCK_M, PACKED)
    row_ok = row_in[:, None]
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    dm0 = (d0 < HEAD_DIM)[None, :]
    row, col = start.to(tl.int32), kv_head * HEAD_DIM  # the keys' origin in the descriptors' views
    if WS:  # rows past the segment come in too: they are never stored
        q0 = QD0.load([row + row0, head * HEAD_DIM])
    else:
        q0 = tl.load(q_base + rows[:, None] * stride_qt + d0[None, :], mask=row_ok & dm0, other=0.0)
    k_ptrs0 = k_base + offs_n[:, None] * stride_kt + d0[None, :]
    v_ptrs0 = v_base + offs_n[:, None] * stride_vt + d0[None, :]
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        dm1 = (d1 < HEAD_DIM)[None, :]
        if WS:
            q1 = QD1.load([row + row0, head * HEAD_DIM + D0])
        else:
            q1 = tl.load(q_base + rows[:, None] * stride_qt + d1[None, :], mask=row_ok & dm1, other=0.0)
        k_ptrs1 = k_base + offs_n[:, None] * stride_kt + d1[None, :]
        v_ptrs1 = v_base + offs_n[:, None] * stride_vt + d1[None, :]
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        dm1, q1, k_ptrs1, v_ptrs1 = dm0, q0, k_ptrs0, v_ptrs0
        acc1 = tl.zeros([1, 1], dtype=tl.float32)
    # Finite, so that a packed key tile holding none of a row's segment leaves the row at p = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = 0 if PACKED or WS else (n_keys // BLOCK_N) * BLOCK_N  # packed tiles and WS mask every key tile
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, dm0, dm1,
                                      stride_kt, stride_vt, 0, n_full, n_keys, qk_scale, offs_n, SCHED + start,
                                      seg_q, KD0, KD1, VD0, VD1, row, col,
                                      D0, D1, False, DTYPE, DOT_PREC, BLOCK_N, False, TMA)  # fmt: skip
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, dm0, dm1,
                                      stride_kt, stride_vt, n_full, n_keys, n_keys, qk_scale, offs_n, SCHED + start,
                                      seg_q, KD0, KD1, VD0, VD1, row, col,
                                      D0, D1, True, DTYPE, DOT_PREC, BLOCK_N, PACKED, TMA, WS)  # fmt: skip

    inv_l = 1.0 / l_i
    o_ty = O.dtype.element_ty
    tl.store(o_base + rows[:, None] * stride_ot + d0[None, :], (acc0 * inv_l[:, None]).to(o_ty), mask=row_ok & dm0)
    if D1 > 0:
        tl.store(o_base + rows[:, None] * stride_ot + d1[None, :], (acc1 * inv_l[:, None]).to(o_ty), mask=row_ok & dm1)
    tl.store(LSE + head * n_tokens + start + rows, m_i + tl.log2(l_i), mask=row_in)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, n_tokens,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
    """delta[h, t] = sum_d o[t, h, d] * do[t, h, d] in fp32: the row term of the softmax gradient."""
    head = tl.program_id(1)
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_tokens) & (cols[None, :] < HEAD_DIM)
    o = tl.load(O + head * stride_oh + rows[:, None] * stride_ot + cols[None, :], mask=mask, other=0.0)
    do = tl.load(DO + head * stride_doh + rows[:, None] * stride_dot + cols[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * n_tokens + rows, delta, mask=rows < n_tokens)


@triton.jit(do_not_specialize=["n_tokens"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU, SCHED, QD0, QD1, DOD0, DOD1,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    n_tokens, qk_scale, sm_scale, seq_bucket,
    H_KV, GROUP, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, TMA: tl.constexpr, FUSED_DQ: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile of one kv head, summed over every query tile of its GROUP query heads.
    TMA: q and do tiles through the descriptors QD0/QD1, DOD0/DOD1 (head-dim chunks 0 and 1), else None.
    FUSED_DQ: also this key tile's share of dq, dS K * sm_scale per query tile visited, added with relaxed
    atomics into DQ, an fp32 (T, Hq, D) buffer zeroed by the launcher (no dq kernel then); else DQ is None."""
    pid = tl.program_id(0)
    slot = pid // H_KV
    kv_head = pid % H_KV
    start, col0, seqlen, n_q = _slot(CU, SCHED, slot, n_tokens, BLOCK_N, PACKED)
    if seqlen <= col0:  # spare slot
        return
    cols, seg_k, col_in = _tile_tokens(SCHED, start, col0, seqlen, BLOCK_N, PACKED)
    col_ok = col_in[:, None]
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    dm0 = (d0 < HEAD_DIM)[None, :]
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    q_base = Q + start * stride_qt + kv_head * GROUP * stride_qh  # the group's first query head
    do_base = DO + start * stride_dot + kv_head * GROUP * stride_doh
    lse_ptrs = LSE + kv_head * GROUP * n_tokens + start + offs_m
    delta_ptrs = DELTA + kv_head * GROUP * n_tokens + start + offs_m
    k0 = tl.load(k_base + cols[:, None] * stride_kt + d0[None, :], mask=col_ok & dm0, other=0.0)
    v0 = tl.load(v_base + cols[:, None] * stride_vt + d0[None, :], mask=col_ok & dm0, other=0.0)
    q_ptrs0 = q_base + offs_m[:, None] * stride_qt + d0[None, :]
    do_ptrs0 = do_base + offs_m[:, None] * stride_dot + d0[None, :]
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        dm1 = (d1 < HEAD_DIM)[None, :]
        k1 = tl.load(k_base + cols[:, None] * stride_kt + d1[None, :], mask=col_ok & dm1, other=0.0)
        v1 = tl.load(v_base + cols[:, None] * stride_vt + d1[None, :], mask=col_ok & dm1, other=0.0)
        q_ptrs1 = q_base + offs_m[:, None] * stride_qt + d1[None, :]
        do_ptrs1 = do_base + offs_m[:, None] * stride_dot + d1[None, :]
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    else:
        dk1 = tl.zeros([1, 1], dtype=tl.float32)
        dv1 = tl.zeros([1, 1], dtype=tl.float32)

    # Padded query rows read q = do = 0 and lse = +inf, so their column of P^T is exactly 0 and no
    # score mask is needed; padded key rows only touch their own dk/dv rows, which are not stored.
    # Packed tiles mask P^T to the block diagonal on top.
    # With TMA the rows past the range are real tokens of other segments: their +inf lse zeroes them alike.
    n_m = tl.cdiv(n_q, BLOCK_M)
    row = start.to(tl.int32)
    for it in range(0, GROUP * n_m):  # one flat loop over (query head of the group, query tile)
        g = it // n_m
        row0 = (it - g * n_m) * BLOCK_M
        row_ok = (row0 + offs_m) < n_q
        q_off = g * stride_qh + row0 * stride_qt
        do_off = g * stride_doh + row0 * stride_dot
        col = (kv_head * GROUP + g) * HEAD_DIM
        q0 = _load_rows(q_ptrs0 + q_off, QD0, row + row0, col, row_ok[:, None] & dm0, TMA)
        do0 = _load_rows(do_ptrs0 + do_off, DOD0, row + row0, col, row_ok[:, None] & dm0, TMA)
        lse = tl.load(lse_ptrs + g * n_tokens + row0, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs + g * n_tokens + row0, mask=row_ok, other=0.0)
        qkT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        if D1 > 0:
            q1 = _load_rows(q_ptrs1 + q_off, QD1, row + row0, col + D0, row_ok[:, None] & dm1, TMA)
            do1 = _load_rows(do_ptrs1 + do_off, DOD1, row + row0, col + D0, row_ok[:, None] & dm1, TMA)
            qkT = tl.dot(k1, tl.trans(q1), qkT, input_precision=DOT_PREC)
        pT = tl.exp2(qkT * qk_scale - lse[None, :])
        if PACKED:
            pT = tl.where(_same_segment(SCHED + start, seg_k, row0 + offs_m, n_q, False), pT, 0.0)
        pT_op = pT.to(DTYPE).to(k0.dtype)
        dv0 = tl.dot(pT_op, do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if D1 > 0:
            dv1 = tl.dot(pT_op, do1, dv1, input_precision=DOT_PREC)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
        dsT = (pT * (dpT - delta[None, :])).to(DTYPE).to(k0.dtype)
        dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
        if D1 > 0:
            dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
        if FUSED_DQ:  # dS = 0 on rows of other segments (PACKED) and past the range (TMA; those not added)
            # dq^T = K^T dS^T: the head dim (>= 64) on the MMA's M side runs on wgmma, where dS (BLOCK_M rows,
            # 32 in the shipped tiles) on the left would take mma.sync
            dq_ptrs = (DQ + start * stride_dqt + (kv_head * GROUP + g) * stride_dqh
                       + (row0 + offs_m)[None, :] * stride_dqt)
            dq_mask = row_ok[None, :]
            tl.atomic_add(dq_ptrs + d0[:, None], tl.dot(tl.trans(k0), dsT, input_precision=DOT_PREC) * sm_scale,
                          mask=dq_mask & tl.trans(dm0), sem="relaxed")
            if D1 > 0:
                tl.atomic_add(dq_ptrs + d1[:, None], tl.dot(tl.trans(k1), dsT, input_precision=DOT_PREC) * sm_scale,
                              mask=dq_mask & tl.trans(dm1), sem="relaxed")

    dk_ptrs = DK + start * stride_dkt + kv_head * stride_dkh + cols[:, None] * stride_dkt
    dv_ptrs = DV + start * stride_dvt + kv_head * stride_dvh + cols[:, None] * stride_dvt
    tl.store(dk_ptrs + d0[None, :], (dk0 * sm_scale).to(DK.dtype.element_ty), mask=col_ok & dm0)
    tl.store(dv_ptrs + d0[None, :], dv0.to(DV.dtype.element_ty), mask=col_ok & dm0)
    if D1 > 0:
        tl.store(dk_ptrs + d1[None, :], (dk1 * sm_scale).to(DK.dtype.element_ty), mask=col_ok & dm1)
        tl.store(dv_ptrs + d1[None, :], dv1.to(DV.dtype.element_ty), mask=col_ok & dm1)


@triton.jit
def _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, dm0, dm1,
              stride_kt, stride_vt, lo, hi, seqlen, qk_scale, offs_n, SEG, seg_q,
              KD0, KD1, VD0, VD1, row, col,
              D0: tl.constexpr, D1: tl.constexpr, MASK_N: tl.constexpr, DTYPE: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, PACKED: tl.constexpr, TMA: tl.constexpr,
              WS: tl.constexpr = False):  # fmt: skip
    """dq accumulation over the key tiles starting in [lo, hi); MASK_N for a segment's partial last tile.
    PACKED: keys [0, seqlen) hold several segments, seg_q/SEG their ids (block-diagonal mask).
    TMA: k, v tiles through descriptors KD*/VD*, key 0 being row `row`, head dim 0 column `col` of their views.
    WS: the loop is handed to Triton's warp specialization, as the forward's."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        mask0 = dm0
        mask1 = dm1
        if MASK_N:
            col_ok = (start_n + offs_n) < seqlen
            mask0 = col_ok[:, None] & dm0
            mask1 = col_ok[:, None] & dm1
        k0 = _load_rows(k_ptrs0 + start_n * stride_kt, KD0, row + start_n, col, mask0, TMA)
        v0 = _load_rows(v_ptrs0 + start_n * stride_vt, VD0, row + start_n, col, mask0, TMA)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if D1 > 0:
            k1 = _load_rows(k_ptrs1 + start_n * stride_kt, KD1, row + start_n, col + D0, mask1, TMA)
            v1 = _load_rows(v_ptrs1 + start_n * stride_vt, VD1, row + start_n, col + D0, mask1, TMA)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if PACKED:
            p = tl.where(_same_segment(SEG, seg_q, start_n + offs_n, seqlen, False), p, 0.0)
        elif MASK_N:
            p = tl.where(col_ok[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(DTYPE).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit(do_not_specialize=["n_tokens"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU, SCHED, KD0, KD1, VD0, VD1, QD0, QD1, DOD0, DOD1,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    n_tokens, qk_scale, sm_scale, seq_bucket,
    H, GROUP, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr = False,
):  # fmt: skip
    """dq of one query tile of one query head, looping over its segment's key tiles.
    TMA: k and v tiles through the descriptors KD0/KD1, VD0/VD1 (head-dim chunks 0 and 1), else None.
    WS (per segment, with TMA): warp-specialized as the forward, q and do through QD0/QD1, DOD0/DOD1."""
    tl.static_assert(not WS or (TMA and not PACKED), "the warp-specialized dq is per segment, with TMA")
    pid = tl.program_id(0)
    slot = pid // H
    head = pid % H
    start, row0, seqlen, n_keys = _slot(CU, SCHED, slot, n_tokens, BLOCK_M, PACKED)
    if WS:
        n_keys = tl.where(row0 < seqlen, n_keys, 0)  # a spare slot runs no key tile and stores nothing
    else:
        if seqlen <= row0:  # spare slot
            return
    kv_head = head // GROUP
    q_base = Q + start * stride_qt + head * stride_qh
    do_base = DO + start * stride_dot + head * stride_doh
    k_base = K + start * stride_kt + kv_head * stride_kh
    v_base = V + start * stride_vt + kv_head * stride_vh
    dq_base = DQ + start * stride_dqt + head * stride_dqh

    rows, seg_q, row_in = _tile_tokens(SCHED, start, row0, seqlen, BLOCK_M, PACKED)
    row_ok = row_in[:, None]
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    dm0 = (d0 < HEAD_DIM)[None, :]
    row, col = start.to(tl.int32), kv_head * HEAD_DIM  # the keys' origin in the descriptors' views
    if WS:  # rows past the segment come in too: they are never stored
        q0 = QD0.load([row + row0, head * HEAD_DIM])
        do0 = DOD0.load([row + row0, head * HEAD_DIM])
    else:
        q0 = tl.load(q_base + rows[:, None] * stride_qt + d0[None, :], mask=row_ok & dm0, other=0.0)
        do0 = tl.load(do_base + rows[:, None] * stride_dot + d0[None, :], mask=row_ok & dm0, other=0.0)
    k_ptrs0 = k_base + offs_n[:, None] * stride_kt + d0[None, :]
    v_ptrs0 = v_base + offs_n[:, None] * stride_vt + d0[None, :]
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        dm1 = (d1 < HEAD_DIM)[None, :]
        if WS:
            q1 = QD1.load([row + row0, head * HEAD_DIM + D0])
            do1 = DOD1.load([row + row0, head * HEAD_DIM + D0])
        else:
            q1 = tl.load(q_base + rows[:, None] * stride_qt + d1[None, :], mask=row_ok & dm1, other=0.0)
            do1 = tl.load(do_base + rows[:, None] * stride_dot + d1[None, :], mask=row_ok & dm1, other=0.0)
        k_ptrs1 = k_base + offs_n[:, None] * stride_kt + d1[None, :]
        v_ptrs1 = v_base + offs_n[:, None] * stride_vt + d1[None, :]
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:
        dm1, q1, do1, k_ptrs1, v_ptrs1 = dm0, q0, do0, k_ptrs0, v_ptrs0
        dq1 = tl.zeros([1, 1], dtype=tl.float32)
    # Padded query rows read q = do = 0 and lse = delta = 0: finite, and never stored.
    lse = tl.load(LSE + head * n_tokens + start + rows, mask=rows < seqlen, other=0.0)
    delta = tl.load(DELTA + head * n_tokens + start + rows, mask=rows < seqlen, other=0.0)

    n_full = 0 if PACKED or WS else (n_keys // BLOCK_N) * BLOCK_N  # packed tiles and WS mask every key tile
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, dm0, dm1,
                         stride_kt, stride_vt, 0, n_full, n_keys, qk_scale, offs_n, SCHED + start, seg_q,
                         KD0, KD1, VD0, VD1, row, col, D0, D1, False, DTYPE, DOT_PREC, BLOCK_N, False, TMA)  # fmt: skip
    dq0, dq1 = _dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, dm0, dm1,
                         stride_kt, stride_vt, n_full, n_keys, n_keys, qk_scale, offs_n, SCHED + start, seg_q,
                         KD0, KD1, VD0, VD1, row, col, D0, D1, True, DTYPE, DOT_PREC, BLOCK_N, PACKED, TMA,
                         WS)  # fmt: skip

    dq_ty = DQ.dtype.element_ty
    tl.store(dq_base + rows[:, None] * stride_dqt + d0[None, :], (dq0 * sm_scale).to(dq_ty), mask=row_ok & dm0)
    if D1 > 0:
        tl.store(dq_base + rows[:, None] * stride_dqt + d1[None, :], (dq1 * sm_scale).to(dq_ty), mask=row_ok & dm1)


# ----------------------------------------------------------------------------- schedule and configs


def _n_slots(n_tokens: int, n_segments: int, block: int) -> int:
    """Upper bound on sum_i cdiv(len_i, block) from host ints only: cdiv(T, block) + B."""
    return triton.cdiv(n_tokens, block) + n_segments


def _fill_schedule(sched, cu_seqlens, n_tokens: int, block: int, skip_short: bool = False) -> None:
    """sched[s] = (segment, tile) for the s-th tile slot, longest segments first; spare slots get a
    tile past their segment's end. skip_short: no tiles for the segments the packed kernel takes.
    sched: (>= n_slots, 2) int32. Device ops only: no host sync."""
    n_seg = cu_seqlens.numel() - 1
    n = _n_slots(n_tokens, n_seg, block)
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    full = (lens + block - 1).div(block, rounding_mode="floor").long()  # (B,) tiles covering each segment
    tiles = full.masked_fill(lens <= tuned.PACKED_MAX_SEQLEN, 0) if skip_short else full  # tiles launched
    order = torch.argsort(tiles, descending=True, stable=True)
    ends = tiles[order].cumsum(0)
    slot = torch.arange(n, device=sched.device)
    rank = torch.searchsorted(ends, slot, right=True).clamp_(max=n_seg - 1)
    # Spare slots land on the last segment in order, at a tile >= its full count, so they exit at once
    # (also when that segment is a skipped short one: counting from its launched 0 tiles would run it).
    tile = slot - ends[rank] + full[order][rank]
    sched[:n].copy_(torch.stack((order[rank], tile), 1))


def _segment_ids(cu_seqlens, n_tokens: int):
    """(T,) int32, the packed tiles' table: seg[t] = b for cu_seqlens[b] <= t < cu_seqlens[b + 1], or -1
    where segment b is longer than tuned.PACKED_MAX_SEQLEN (left to the per-segment kernel).
    Device ops only (a mark at each segment end, then a running count): no host sync, O(T) memory."""
    marks = torch.zeros(n_tokens + 1, device=cu_seqlens.device, dtype=torch.int32)
    marks.index_add_(0, cu_seqlens[1:].long(), torch.ones_like(cu_seqlens[1:]))
    seg = marks[:n_tokens].cumsum(0, dtype=torch.int32)
    short = (cu_seqlens[1:] - cu_seqlens[:-1]) <= tuned.PACKED_MAX_SEQLEN
    return torch.where(short[seg.long()], seg, -1)


def path(max_seqlen: int, n_tokens: int, n_seg: int) -> str:
    """Which kernels a batch runs, from host ints: "packed" when every segment is at most
    tuned.PACKED_MAX_SEQLEN tokens; "mixed" (short segments packed, the others per segment: two
    launches) when longer ones come with a mean length of at most tuned.MIXED_MAX_MEAN, so that short
    segments are likely many; else "segments" (per-segment tiles only)."""
    if int(max_seqlen) <= tuned.PACKED_MAX_SEQLEN:
        return "packed"
    return "mixed" if n_tokens <= tuned.MIXED_MAX_MEAN * n_seg else "segments"


# Autotune candidates (BLOCK_M, BLOCK_N, warps) x stages 2-4 for MOCA_AUTOTUNE=1, and the space the
# 16-bit configs of kernels/tuned.py are chosen from (fp32 needs smaller tiles, see there). 8 warps
# where the fp32 accumulators are large: compiled for sm_90 with bf16 at head dim 128, fwd (128, 64, 8),
# dkdv (32, 128, 8) and dq (128, 32, 8) fit in registers, while a 128-row forward tile on 4 warps
# spills at head dims 80 and 128, so it is not a candidate; the narrower 8-warp tiles are for head
# dims that are not a multiple of 16. The scheduled tile is BLOCK_M for fwd/dq, BLOCK_N for dkdv.
SPACES = {
    "fwd": [(128, 64, 8), (128, 128, 8), (128, 32, 8), (64, 64, 8), (64, 64, 4), (64, 128, 4)],
    "dkdv": [(32, 128, 8), (64, 128, 8), (32, 64, 8), (32, 64, 4), (64, 64, 4)],
    "dq": [(128, 32, 8), (128, 64, 8), (128, 16, 8), (64, 32, 8), (64, 32, 4), (64, 64, 4)],
}
STAGES = (2, 3, 4)


def candidates(name: str) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) that MOCA_AUTOTUNE=1 times for kernel `name`: SPACES x STAGES."""
    return [(bm, bn, w, s) for bm, bn, w in SPACES[name] for s in STAGES]


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_TILE_KEY = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}
# The streamed operands (loaded in the inner loop, through TMA when on): their descriptor arguments,
# and the config key that gives a streamed tile's rows.
_STREAMED_ARGS = {"fwd": ("KD0", "KD1", "VD0", "VD1"), "dkdv": ("QD0", "QD1", "DOD0", "DOD1"),
                  "dq": ("KD0", "KD1", "VD0", "VD1")}
_STREAM_KEY = {"fwd": "BLOCK_N", "dkdv": "BLOCK_M", "dq": "BLOCK_N"}
# The warp-specialized kernels' other descriptor arguments (after the streamed ones; None when not WS): fwd's
# q (QD0, QD1); dq's q and do (QD0, QD1, DOD0, DOD1).
_N_WS_DESCS = {"fwd": 2, "dkdv": 0, "dq": 4}
# Under the interpreter one fixed config: big enough to be quick there, small enough that the test
# segments span several tiles (and, packed, that tiles hold several segments and cut some).
_INTERP = {"fwd": (128, 64), "dkdv": (64, 128), "dq": (128, 64)}
_INTERP_PACKED = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


def autotune_enabled() -> bool:
    """MOCA_AUTOTUNE=1: benchmark the candidates on first use of each key instead of the shipped table."""
    return os.environ.get("MOCA_AUTOTUNE", "0") == "1" and not interpreter_enabled()


def _tma_ok(xs, head_dim: int, d0: int, d1: int) -> bool:
    """Whether 2-D TMA descriptors can view each x (T, H, D) as (T, H * D): heads adjacent within a token,
    base and rows 16-byte aligned, and no masked head-dim tail (its tile would read the next head)."""
    return d0 + d1 == head_dim and all(
        x.stride(1) == head_dim and x.stride(0) >= x.shape[1] * head_dim and tma_aligned(x) for x in xs)


def _descriptors(streamed, rows: int, d0: int, d1: int) -> tuple:
    """(a0, a1, b0, b1): TMA descriptors of the streamed pair (a, b), each (T, H, D), over its 2-D
    (T, H * D) view in tiles of rows x d0 and rows x d1 (None when d1 == 0); four Nones when streamed is None."""
    if streamed is None:
        return (None,) * 4

    def desc(x, width):
        return TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [rows, width])

    return tuple(desc(x, w) if w else None for x in streamed for w in (d0, d1))


def _autotune_hook(name: str, tiles: str):
    """Autotune pre_hook: the slot table and the descriptors' tiles depend on the config being launched."""

    def hook(nargs):
        if tiles != "packed":
            _fill_schedule(nargs["SCHED"], nargs["CU"], nargs["n_tokens"], nargs[_TILE_KEY[name]], tiles == "long")
        for d in (nargs[arg] for arg in _STREAMED_ARGS[name]):
            if d is not None:
                d.block_shape = [nargs[_STREAM_KEY[name]], d.block_shape[1]]

    return hook


@functools.cache
def _autotuner(name: str, tiles: str, fused_dq: bool = False):
    """tiles: "packed", or "segments" / "long" (the slot table of every segment / of the unpacked ones).
    With the fused dq (dk/dv only), the dq buffer its launches add to is restored after every timing run;
    without, DQ is None and no restore is asked for (Triton 3.6's restore hook clones it unconditionally)."""
    hook = _autotune_hook(name, tiles)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook)
               for bm, bn, w, s in candidates(name)]
    restore = ["DQ"] if fused_dq else None
    return triton.autotune(configs, key=["HEAD_DIM", "GROUP", "seq_bucket"], restore_value=restore)(_KERNELS[name])


@functools.cache
def _arch(device_index: int) -> str:
    return tuned.arch_name(torch.cuda.get_device_capability(device_index))


def _fused_dq(device, dtype) -> bool:
    """Whether the backward accumulates dq in the dk/dv kernel: 16-bit inputs only, as kernels/tuned.py
    FUSED_DQ ships it or MOCA_FUSED_DQ forces it."""
    shipped = device.type == "cuda" and tuned.FUSED_DQ.get(_arch(device.index), False)
    return dtype != torch.float32 and switch("MOCA_FUSED_DQ", shipped)


def _launch(name: str, dtype, n_tokens: int, n_heads: int, n_seg: int, ptrs, rest, meta, bucket: int,
            mode: str, seg_ids, streamed) -> None:
    """Kernel `name` over the batch as `path` chose (mode): packed tiles, per-segment tiles, or both
    (on disjoint rows: the per-segment launch goes first, so a packed tile writing a long segment's
    rows would show in the tests). streamed: the pair of tensors the kernel streams when TMA descriptors
    can view them (`_tma_ok`), else None."""
    if mode != "packed":
        _launch_segments(name, dtype, n_tokens, n_heads, n_seg, ptrs, rest, meta, bucket, mode == "mixed", streamed)
    if mode != "segments":
        _launch_packed(name, dtype, n_tokens, n_heads, ptrs, rest, meta, bucket, seg_ids, streamed)


def _triton_version() -> tuple[int, int]:
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def ws_available(device: torch.device) -> bool:
    """Whether `device` and the installed Triton have the warp-specialized forward and dq (kernels/tuned.py
    ws_available: an H100/H200 and Triton 3.6 to 3.9)."""
    return (device.type == "cuda" and torch.cuda.is_available()
            and tuned.ws_available(_arch(device.index), _triton_version()))


def _ws(name: str, device, dtype) -> bool:
    """Whether per-segment kernel `name` (fwd or dq) runs warp-specialized (WS): 16-bit inputs, as
    kernels/tuned.py WARP_SPECIALIZE ships it or MOCA_WS forces it (both kernels), where `ws_available`
    (elsewhere MOCA_WS=1 is ignored). Under the interpreter MOCA_WS=1 runs the same kernel code for the tests.
    Never under MOCA_AUTOTUNE=1, whose candidates are the plain kernels'. The launchers also need TMA-fit
    tensors (`_tma_ok`)."""
    if dtype == torch.float32 or autotune_enabled():
        return False
    if interpreter_enabled():
        return switch("MOCA_WS", False)
    shipped = tuned.WARP_SPECIALIZE.get(_arch(device.index), {}).get(name, False)
    return ws_available(device) and switch("MOCA_WS", shipped)


def _config(name: str, dtype, device, meta, bucket: int, packed: bool) -> dict:
    """{BLOCK_M, BLOCK_N, num_warps, num_stages, TMA}: fixed under the interpreter, else kernels/tuned.py's
    (its WS tiles for a warp-specialized kernel, meta["WS"])."""
    ws = meta.get("WS", False)
    if interpreter_enabled():
        bm, bn = (_INTERP_PACKED if packed else _INTERP)[name]
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1, TMA=ws)
    if ws:
        return tuned.ws_config(_arch(device.index), name, _triton_version())
    return tuned.attention_config(_arch(device.index), name, meta["HEAD_DIM"], dtype, bucket, packed,
                                  meta.get("FUSED_DQ", False))


def _launch_args(name: str, ptrs, sched, rest, meta, cfg: dict, streamed) -> tuple[tuple, dict]:
    """(args, kwargs) of kernel `name` under cfg {BLOCK_M, BLOCK_N, num_warps, num_stages, TMA}: TMA where
    wanted (MOCA_TMA overrides the flag) and possible (streamed, from `_tma_ok`, is not None); the
    warp-specialized kernels (meta["WS"], only where the launcher found every tensor fit for TMA) always,
    with their other descriptors (`_ws_descriptors`)."""
    cfg = dict(cfg)
    ws, shipped_tma = meta.get("WS", False), cfg.pop("TMA")
    tma = (ws or switch("MOCA_TMA", shipped_tma)) and streamed is not None
    descs = _descriptors(streamed if tma else None, cfg[_STREAM_KEY[name]], meta["D0"], meta["D1"])
    descs += _ws_descriptors(name, ptrs, cfg, meta) if ws else (None,) * _N_WS_DESCS[name]
    return (*ptrs, sched, *descs, *rest), dict(meta, TMA=tma, **cfg)


def _ws_descriptors(name: str, ptrs, cfg: dict, meta) -> tuple:
    """The descriptors a warp-specialized kernel also loads through (`_N_WS_DESCS`): the row tiles each
    program keeps (q for fwd; q and do for dq), in BLOCK_M rows."""
    return _descriptors((ptrs[0],) if name == "fwd" else (ptrs[0], ptrs[3]), cfg["BLOCK_M"], meta["D0"], meta["D1"])


def _run(name: str, grid: int, ptrs, sched, rest, meta, cfg: dict, streamed) -> None:
    """kernel[grid](*ptrs, sched, *descriptors, *rest, **meta, **cfg), as `_launch_args` builds them."""
    args, kwargs = _launch_args(name, ptrs, sched, rest, meta, cfg, streamed)
    _KERNELS[name][(grid,)](*args, **kwargs)


def _autotuned(name: str, tiles: str, grid, ptrs, sched, rest, meta, streamed) -> None:
    """The MOCA_AUTOTUNE=1 launch: TMA as MOCA_TMA says (off when unset), tiles as the autotuner picks."""
    tma = streamed is not None and switch("MOCA_TMA", False)
    descs = _descriptors(streamed if tma else None, 16, meta["D0"], meta["D1"])  # the hook sets the rows
    descs += (None,) * _N_WS_DESCS[name]  # the warp-specialized kernels' only
    _autotuner(name, tiles, meta.get("FUSED_DQ", False))[grid](*ptrs, sched, *descs, *rest, **meta, TMA=tma)


def _launch_packed(name: str, dtype, n_tokens: int, n_heads: int, ptrs, rest, meta, bucket: int, seg_ids,
                   streamed) -> None:
    """Packed tiles: slot i is tokens [i * tile, (i + 1) * tile); seg_ids from `_segment_ids` stands in
    SCHED's place. ptrs ends with cu_seqlens. Config as `_launch_segments`."""
    key = _TILE_KEY[name]
    meta = dict(meta, PACKED=True, **({"WS": False} if "WS" in meta else {}))  # WS is per segment
    if autotune_enabled():
        grid = lambda META: (triton.cdiv(n_tokens, META[key]) * n_heads,)  # noqa: E731
        _autotuned(name, "packed", grid, ptrs, seg_ids, rest, meta, streamed)
        return
    cfg = _config(name, dtype, ptrs[-1].device, meta, bucket, True)
    _run(name, triton.cdiv(n_tokens, cfg[key]) * n_heads, ptrs, seg_ids, rest, meta, cfg, streamed)


def _launch_segments(name: str, dtype, n_tokens: int, n_heads: int, n_seg: int, ptrs, rest, meta, bucket: int,
                     skip_short: bool, streamed) -> None:
    """Kernel `name` on its (tile slot x heads) grid, with the slot table for its tile (no tiles for
    short segments when skip_short). ptrs ends with cu_seqlens.

    Config: fixed under the interpreter, the autotuner's under MOCA_AUTOTUNE=1, else kernels/tuned.py's."""
    cu_seqlens = ptrs[-1]
    key = _TILE_KEY[name]
    meta = dict(meta, PACKED=False)
    if autotune_enabled():
        tile = min((bm, bn)[key == "BLOCK_N"] for bm, bn, _ in SPACES[name])  # sizes the table for any candidate
        sched = torch.empty((_n_slots(n_tokens, n_seg, tile), 2), device=cu_seqlens.device, dtype=torch.int32)
        grid = lambda META: (_n_slots(n_tokens, n_seg, META[key]) * n_heads,)  # noqa: E731
        tiles = "long" if skip_short else "segments"
        _autotuned(name, tiles, grid, ptrs, sched, rest, meta, streamed)  # its pre-hook fills sched
        return
    cfg = _config(name, dtype, cu_seqlens.device, meta, bucket, False)
    n_slots = _n_slots(n_tokens, n_seg, cfg[key])
    sched = torch.empty((n_slots, 2), device=cu_seqlens.device, dtype=torch.int32)
    _fill_schedule(sched, cu_seqlens, n_tokens, cfg[key], skip_short)
    _run(name, n_slots * n_heads, ptrs, sched, rest, meta, cfg, streamed)


# ----------------------------------------------------------------------------- host launchers


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _tiles(*xs):
    """Kernel operands: last dim contiguous (other strides are passed through, so q/k/v may be
    views into a fused qkv projection). Under the interpreter fp32 copies instead, since its
    bf16 arithmetic is wrong; the kernels still round P and dS through the true dtype."""
    if interpreter_enabled():
        return [x.float().contiguous() for x in xs]
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _meta(dtype, operands, max_seqlen, mode):
    """Launch constants shared by the three kernels (operands: q, k, then the other (T, H, D) tensors the
    kernels index, from `_tiles`) and the seq bucket of max_seqlen (the config key). ValueError when a
    segment's in-segment offsets would not fit in int32."""
    q, k = operands[:2]
    T, _, D = q.shape
    span = max(int(max_seqlen), 1)  # rows a tile's offsets reach; a packed tile's: two short segments + a tile
    if mode != "segments":
        span = max(span, 2 * min(int(max_seqlen), tuned.PACKED_MAX_SEQLEN) + 256)
    if max(x.stride(0) for x in operands) * span >= 2**31:
        raise ValueError(f"a {span}-token span at row strides {[x.stride(0) for x in operands]} overflows the "
                         "kernels' int32 in-segment offsets: pass contiguous tensors or shorter segments")
    d0, d1 = tuned.split_head_dim(D)
    meta = dict(
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=D,
        D0=d0,
        D1=d1,
        DTYPE=_TL_DTYPES[dtype],
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs get exact fp32 dots
    )
    return meta, seq_bucket(max_seqlen)


def seq_bucket(max_seqlen: int) -> int:
    """The config key of a batch's longest segment (kernels/tuned.py `max_seq`): its power of two, 64 to 8192."""
    return min(triton.next_power_of_2(max(int(max_seqlen), 64)), 8192)


def _need(ok, msg):
    if not ok:
        raise (TypeError if "dtype" in msg else ValueError)(msg)


def _check_shapes(q, k, v, cu_seqlens):
    """What every backend requires (the public entry point checks it, so both fail alike)."""
    _need(q.dim() == 3 and k.dim() == 3 and k.shape == v.shape, "q: (T, Hq, D), k/v: (T, Hkv, D)")
    _need(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2], f"q {tuple(q.shape)} vs k {tuple(k.shape)}")
    _need(k.shape[1] >= 1 and q.shape[2] >= 1, f"Hkv and D must be >= 1, got k {tuple(k.shape)}")
    _need(q.shape[1] % k.shape[1] == 0, "Hq must be a multiple of Hkv")
    _need(cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.device == q.device,
          f"cu_seqlens: (B+1,) int32 on q's device, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype} on "
          f"{cu_seqlens.device}")


def _check(q, k, v, cu_seqlens):
    """What the Triton kernels require on top."""
    _check_shapes(q, k, v, cu_seqlens)
    _need(q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype,
          f"q, k, v dtype: one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    _need(q.shape[2] <= tuned.MAX_HEAD_DIM, f"head_dim <= {tuned.MAX_HEAD_DIM} on the Triton backend (its compiled "
          f"tiles' range; backend='torch' takes any), got {q.shape[2]}")


def _attn_fwd_launch(q, k, v, cu_seqlens, max_seqlen, scale):
    """q: (T, Hq, D), k/v: (T, Hkv, D), cu_seqlens: (B+1,) int32 from 0 to T
    -> o: (T, Hq, D) in q's dtype, lse: (Hq, T) fp32 in log2 units."""
    _check(q, k, v, cu_seqlens)
    dtype = q.dtype
    q, k, v = _tiles(q, k, v)
    T, H, _ = q.shape
    n_seg = cu_seqlens.numel() - 1
    o = torch.empty((T, H, q.shape[2]), device=q.device, dtype=q.dtype)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    if T == 0 or n_seg == 0:
        return o.to(dtype), lse
    mode = path(max_seqlen, T, n_seg)
    meta, bucket = _meta(dtype, (q, k, v, o), max_seqlen, mode)
    seg_ids = None if mode == "segments" else _segment_ids(cu_seqlens, T)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1))
    tma_ok = functools.partial(_tma_ok, head_dim=meta["HEAD_DIM"], d0=meta["D0"], d1=meta["D1"])
    streamed = (k, v) if tma_ok((k, v)) else None
    ws = streamed is not None and tma_ok((q,)) and _ws("fwd", q.device, dtype)
    _launch("fwd", dtype, T, H, n_seg, (q, k, v, o, lse, cu_seqlens), (*strides, T, scale * LOG2E, bucket),
            dict(H=H, WS=ws, **meta), bucket, mode, seg_ids, streamed)  # fmt: skip
    return o.to(dtype), lse


def _attn_bwd_launch(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    """do/q/o: (T, Hq, D), k/v: (T, Hkv, D), lse: (Hq, T) -> dq (T, Hq, D), dk, dv (T, Hkv, D).
    dq: by the dq kernel, or (`_fused_dq`) summed by the dk/dv kernel into an fp32 buffer, then rounded once."""
    dtype = q.dtype
    q, k, v, o, do = _tiles(q, k, v, o, do)
    T, H, D = q.shape
    H_kv = k.shape[1]
    n_seg = cu_seqlens.numel() - 1
    fused = _fused_dq(q.device, dtype)
    dq = torch.zeros((T, H, D), device=q.device, dtype=torch.float32) if fused else torch.empty_like(q)
    dk = torch.empty((T, H_kv, D), device=q.device, dtype=q.dtype)
    dv = torch.empty((T, H_kv, D), device=q.device, dtype=q.dtype)
    if T == 0 or n_seg == 0:
        return dq.to(dtype), dk.to(dtype), dv.to(dtype)
    mode = path(max_seqlen, T, n_seg)
    meta, bucket = _meta(dtype, (q, k, v, o, do, dq, dk), max_seqlen, mode)
    delta = torch.empty((H, T), device=q.device, dtype=torch.float32)
    block_t = 64
    _attn_bwd_preprocess[(triton.cdiv(T, block_t), H)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=block_t,
    )  # fmt: skip
    seg_ids = None if mode == "segments" else _segment_ids(cu_seqlens, T)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1))
    common = (T, scale * LOG2E, scale, bucket)
    tma_ok = functools.partial(_tma_ok, head_dim=D, d0=meta["D0"], d1=meta["D1"])
    dq_strides = (dq.stride(0), dq.stride(1))
    _launch("dkdv", dtype, T, H_kv, n_seg, (q, k, v, do, lse, delta, dk, dv, dq if fused else None, cu_seqlens),
            (*strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *dq_strides, *common),
            dict(H_KV=H_kv, FUSED_DQ=fused, **meta), bucket, mode, seg_ids, (q, do) if tma_ok((q, do)) else None)
    if not fused:
        ws = tma_ok((q, k, v, do)) and _ws("dq", q.device, dtype)  # k, v streamed, q and do once per program
        _launch("dq", dtype, T, H, n_seg, (q, k, v, do, lse, delta, dq, cu_seqlens), (*strides, *dq_strides, *common),
                dict(H=H, WS=ws, **meta), bucket, mode, seg_ids, (k, v) if tma_ok((k, v)) else None)  # fmt: skip
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        o, lse = _attn_fwd_launch(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = _attn_bwd_launch(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def _autocast_inputs(q, k, v):
    """Under autocast, attention runs in the autocast dtype, as SDPA does (rotary products promote
    q and k to fp32 there while v stays bf16); otherwise q, k and v must already agree."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype (or run under autocast), got {q.dtype}, {k.dtype}, {v.dtype}")
    return q, k, v


_checked_cu: dict[int, tuple] = {}  # id(cu_seqlens) -> (weakref to it, its _version, T, max_seqlen) once checked


@torch.compiler.disable  # host logic (a cache keyed on the tensor): run eagerly, outside any compiled graph
def _check_cu_seqlens(cu_seqlens, n_tokens: int, max_seqlen: int) -> None:
    """cu_seqlens must run from 0 to T, never decrease, and step by at most max_seqlen (else the kernels
    read and write out of bounds, or leave rows unwritten). A CPU tensor is checked on the host
    (ValueError); a CUDA one by a device-side assert (no host sync). Once per tensor and contents: every
    layer of a forward passes the same one."""
    # inference tensors (torch.inference_mode) keep no version counter: there the tensor alone is the key
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    seen = _checked_cu.get(id(cu_seqlens))
    if seen is not None and seen[0]() is cu_seqlens and seen[1:] == (version, n_tokens, max_seqlen):
        return
    if cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens: (B+1,) with B >= 0 segments, got an empty tensor")
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    if cu_seqlens.device.type == "cpu":
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        if first != 0 or last != n_tokens:
            raise ValueError(f"cu_seqlens must run from 0 to T = {n_tokens}, got {first} .. {last}")
        if lens.numel() and int(lens.min()) < 0:
            raise ValueError(f"cu_seqlens must not decrease (segment {int(lens.argmin())} has length {int(lens.min())})")
        if lens.numel() and int(lens.max()) > max_seqlen:
            raise ValueError(f"max_seqlen {max_seqlen} is below the longest segment's {int(lens.max())} tokens")
    else:
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n_tokens)
        if lens.numel():
            ok &= (lens.min() >= 0) & (lens.max() <= max_seqlen)
        torch._assert_async(ok, "cu_seqlens must run from 0 to T, never decrease, and step by at most max_seqlen")
    key = id(cu_seqlens)
    _checked_cu[key] = (weakref.ref(cu_seqlens, lambda _, key=key: _checked_cu.pop(key, None)), version, n_tokens,
                        max_seqlen)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None, backend=None):
    """q: (T, Hq, D), k/v: (T, Hkv, D), cu_seqlens: (B+1,) int32 from 0 to T, max_seqlen: int at least
    the longest segment -> (T, Hq, D). scale: softmax scale > 0, default D ** -0.5.

    Under torch.autocast the inputs are cast to the autocast dtype first. Raises TypeError for
    mismatched dtypes outside autocast, ValueError for bad shapes, a scale <= 0 and (CPU tensors; CUDA:
    a device-side assert) a cu_seqlens that does not run from 0 to T or steps by more than max_seqlen, on
    every backend; TypeError for a max_seqlen that is not an int. backend: "triton" | "torch" (per-segment
    SDPA) | None (kernels._backend.resolve: Triton on CUDA or under TRITON_INTERPRET=1, else torch; torch for
    head dims over tuned.MAX_HEAD_DIM); only Triton limits dtypes (fp16/bf16/fp32, TypeError) and head_dim
    (<= tuned.MAX_HEAD_DIM = 128, ValueError)."""
    if not isinstance(max_seqlen, torch.SymInt):
        try:
            max_seqlen = operator.index(max_seqlen)  # a Python or NumPy int
        except TypeError:
            raise TypeError(f"max_seqlen: an int at least the longest segment's tokens, got {max_seqlen!r}") from None
    q, k, v = _autocast_inputs(q, k, v)
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    cu_seqlens = cu_seqlens.contiguous()
    _check_shapes(q, k, v, cu_seqlens)
    _check_cu_seqlens(cu_seqlens, q.shape[0], int(max_seqlen))
    if backend is None and q.dim() == 3 and q.shape[2] > tuned.MAX_HEAD_DIM:
        backend = "torch"
    if resolve(backend, q) == "torch":
        return varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale)
