"""Masked reconstruction losses of MoCa's continual pre-training (MOCA.md §2).

masked_lm_loss(hidden (M, H), lm_weight (V, H), targets (M,) int64) -> mean cross-entropy of the
LM head over the M masked rows; the (M, V) logits never exist. masked_patch_loss(hidden (N, H),
proj_weight (4704, H), proj_bias (4704,), targets (N, 4704)) -> mean squared error of the MAE
projection over all N * 4704 numbers (the output layout d*4 + p is the caller's business: the
loss is blind to it).

Design decisions a reader must know:
* LM, training with `grad_in_forward=True` (opt-in until a GPU run decides; see the next items for the
  default). The
  floor is 3 GEMMs of 2 M V H (logits, d_hidden, d_weight); a backward that recomputes the logits
  adds a fourth. So, as Liger does, the forward walks chunks of rows: cuBLAS logits (rows, V) in the
  input dtype (what an unfused bf16 model computes), a fused Triton epilogue per row (online lse,
  target logit, then d_logits = softmax - onehot written over the logits in place), then
  d_hidden[chunk] = d_logits @ W in ONE cuBLAS GEMM over the whole vocabulary and
  d_weight += d_logits^T @ h[chunk] by a Triton GEMM into an fp32 (V, H) accumulator. The backward
  only scales the saved gradients by grad_output / M, downcasting d_weight in place (rounded once).
  The 1/M waits for the backward (and fp16 d_logits are written times 2^8, `_grad_scale`): applied in
  the forward, before a loss scaler's factor, it flushed most fp16 softmax terms to zero.
  Memory: the chunk is sized to 10% of inputs + gradients, but the fp32 accumulator is 2x the 16-bit
  d_weight it ends up holding: peak ~1.55 x (inputs + gradients) at the 3B shapes. fp32 accumulation
  over row chunks, 3 GEMMs and 1.1x memory cannot all hold: a single-rounding d_weight needs either
  its fp32 accumulator (this path) or all M rows per vocabulary chunk, i.e. a recompute (below).
  One backward per forward (LossBackwardError otherwise).
* LM forward without gradients (evaluation) and `grad_in_forward=False`, the default: it keeps peak
  memory within 1.1 x (inputs + gradients) and rounds the fp32 d_weight once. One Triton kernel multiplies
  a row tile of hidden by vocabulary tiles and folds the fp32 logits into an online log-sum-exp,
  picking up the target's logit on the way; only (S, M) partials survive, S being the number of
  vocabulary splits (`_cols_per_split`: enough to fill the GPU and to keep the row tiles in flight in L2,
  each being re-read for every vocabulary tile). The forward keeps the (M,) lse.
* LM backward of `grad_in_forward=False`, the memory-lean path (4 GEMMs). d_hidden needs every
  vocabulary row and d_weight every hidden row, and H (2048..3584) is far too wide to keep either
  fp32 accumulator in registers, so a fully fused backward has to read-modify-write (BM + BV) x H
  fp32 in global memory per tile pair (~50 flop/byte: memory bound, which is why cut-cross-entropy
  needs its lossy gradient filter). Here V is walked in chunks of Vc columns: a Triton kernel
  recomputes the logit tiles in fp32 and writes d_logits = (softmax - onehot) * g / M for the chunk
  in the input dtype (as bf16 autograd would), then d_weight[chunk] = d_logits^T @ hidden is ONE
  cuBLAS GEMM over all M rows (fp32 accumulation, rounded once) and d_hidden += d_logits @
  weight[chunk] is a Triton GEMM that accumulates into an fp32 (M, H) buffer (torch's bf16 ->
  fp32-output addmm is CUDA-only and its dtype rules differ between versions). No atomics,
  deterministic. Beyond the two gradients the only extra memory is that fp32 (M, H), 2.6% of inputs
  + gradients at the 3B shapes (issue #12 allows 10%): the (M, Vc) d_logits chunk is carved out of
  d_hidden's output buffer, which takes its final value after the last chunk (or, for few rows, is a
  separate buffer of <= 1/64 of the weight).
* Patch loss, gradient in the forward. The projection is 2 * N * 4704 * H flops against N * 4704
  elementwise ones, so the fusion has to spare the (N, 4704) prediction round trip, its rounding and
  the recompute: one kernel adds bias, subtracts the target and, per tile in fp32, sums squares and
  (when a gradient is needed) writes the residual gradient 2 r / (N 4704) in the input dtype (the
  size of the targets the caller already holds); the backward is two cuBLAS GEMMs (d_hidden,
  d_weight, fp32 accumulation over N inside one GEMM) and a reduction d_bias, scaled by grad_output.
* Torch references (`_lm_*_torch`, `_patch_*_torch`) do the same maths plainly, the LM one in
  chunks of rows so that (M, V) never exists either; they are the CPU backend and the oracle.
* TMA (Hopper, opt-in until a GPU run decides: SHIPPED_TMA, MOCA_TMA=1). The Triton GEMMs (logits
  tiles, d_logits, d_hidden / d_weight accumulation, patch projection) can take their operand tiles
  through host-built TMA descriptors instead of pointer loads: reads past an operand's edge (rows,
  columns, the K tail) come back as zeros, so no wrapped indices or K masks, and no pointer tiles in
  registers, which leaves room for BLOCK_K = 64 (the compile gate: no spills). An operand whose rows
  are not 16-byte multiples (an odd vocabulary's d_logits) keeps pointer loads.
* Interpreter (UPCAST): Triton's CPU interpreter gets 16-bit arithmetic wrong, so there every tile
  is cast to fp32 right after loading; on the GPU 16-bit tiles go to the tensor cores as they are.
"""

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._backend import autocast_off, no_double_backward, resolve, switch, tma_aligned

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REF_CHUNK = 1 << 22  # logits per row chunk of the torch reference (16 MiB in fp32)
_DOWNCAST_SLAB = 1 << 24  # elements per step of the in-place d_weight downcast (a 64 MiB fp32 temporary)


@triton.jit
def _tile_matmul(acc, a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 + a[rows, :K] @ b[:K, cols] for strided a and b.

    rows and cols must be in bounds (callers wrap them with %, Triton's matmul-tutorial way, and
    mask the results): only K is masked, which keeps the loop free of spills on the GPU.
    """
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=ks[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _tile_matmul_tma(acc, a_desc, b_desc, off_m, off_n, K, BLOCK_K: tl.constexpr, A_T: tl.constexpr,
                     B_T: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 + a[off_m:, :K] @ b[:K, off_n:] through TMA descriptors: a_desc over a
    (M, K), or over a^T's storage (K, M) when A_T; b_desc over b (K, N), or over b^T's (N, K) when B_T.
    Rows, columns and K past the descriptors' shapes read 0: no masks, no wrapped indices."""
    for k0 in range(0, K, BLOCK_K):
        if A_T:
            a = tl.trans(a_desc.load([k0, off_m]))
        else:
            a = a_desc.load([off_m, k0])
        if B_T:
            b = tl.trans(b_desc.load([off_n, k0]))
        else:
            b = b_desc.load([k0, off_n])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _lm_fwd_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, tgt_logit_ptr, h_desc, w_desc, M, V, H, tiles_per_split,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """One vocabulary split (program_id 0, fastest: `_cols_per_split`) x one row tile: online lse and target
    logit over the split's columns.

    h: (M, H); w: (V, H); tgt: (M,) int64; lse, tgt_logit: (S, M) fp32 partials.
    TMA: h and w tiles through h_desc (blocks BLOCK_M x BLOCK_K) and w_desc (BLOCK_N x BLOCK_K), else None.
    """
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    t_i = tl.zeros((BLOCK_M,), tl.float32)
    v_lo = pid_s * tiles_per_split * BLOCK_N
    v_hi = tl.minimum(V, v_lo + tiles_per_split * BLOCK_N)
    for v0 in range(v_lo, v_hi, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        if TMA:
            z = _tile_matmul_tma(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), h_desc, w_desc, pid_m * BLOCK_M, v0, H,
                                 BLOCK_K, False, True, UPCAST, PREC)
        else:
            z = _tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), h_ptr, w_ptr, rows % M, cols % V, H, H, 1, 1,
                             H, BLOCK_K, UPCAST, PREC)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m_i = m_new
        t_i += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    out = pid_s * M + rows
    tl.store(lse_ptr + out, m_i + tl.log(l_i), mask=row_ok)
    tl.store(tgt_logit_ptr + out, t_i, mask=row_ok)


@triton.jit
def _lm_dlogits_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, scale_ptr, dz_ptr, h_desc, w_desc, M, H, v0, n_cols,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """d_logits for vocabulary columns v0 .. v0 + n_cols: (softmax - onehot) * scale.

    h: (M, H); w: (V, H); tgt, lse: (M,); scale: (1,) fp32 = upstream grad / M; dz: (M, n_cols).
    TMA: as `_lm_fwd_kernel` (columns past the chunk read real w rows: computed, never stored).
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = local < n_cols
    cols = v0 + local
    if TMA:
        z = _tile_matmul_tma(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), h_desc, w_desc, pid_m * BLOCK_M,
                             v0 + pid_n * BLOCK_N, H, BLOCK_K, False, True, UPCAST, PREC)
    else:
        z = _tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), h_ptr, w_ptr, rows % M, v0 + local % n_cols, H,
                         H, 1, 1, H, BLOCK_K, UPCAST, PREC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # rows past M: p = 0, no overflow
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    dz = (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)) * tl.load(scale_ptr)
    ptrs = dz_ptr + rows.to(tl.int64)[:, None] * n_cols + local[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _mm_acc_kernel(c_ptr, a_ptr, b_ptr, a_desc, b_desc, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, A_T: tl.constexpr):
    """c (M, N) fp32 row-major += a (M, K) @ b (K, N), a and b strided: d_hidden += d_logits @ weight[chunk]
    (recompute path), d_weight += d_logits^T @ hidden[chunk] (gradient-in-forward path).
    TMA: a and b tiles through a_desc (over a, or over a^T's storage when A_T) and b_desc (over b)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    if TMA:
        acc = _tile_matmul_tma(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), a_desc, b_desc, pid_m * BLOCK_M,
                               pid_n * BLOCK_N, K, BLOCK_K, A_T, False, UPCAST, PREC)
    else:
        acc = _tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), a_ptr, b_ptr, rows % M, cols % N, K,
                           stride_am, stride_ak, stride_bk, stride_bn, BLOCK_K, UPCAST, PREC)
    # c is read after the loop: loading it first would keep a second tile of pointers alive (spills)
    ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + acc, mask=ok)


@triton.jit
def _lm_ce_grad_kernel(z_ptr, tgt_ptr, lse_ptr, tgt_logit_ptr, scale, V, BLOCK_V: tl.constexpr):
    """One row of a logits chunk: its lse and target logit, then d_logits = (softmax - onehot) * scale
    written over the logits, in their dtype (the gradient-in-forward epilogue).

    z: (rows, V) contiguous, overwritten; tgt: (rows,) int64; lse, tgt_logit: (rows,) fp32.
    """
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * V
    tgt = tl.load(tgt_ptr + row)
    m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), 0)
    l = tl.sum(tl.zeros((BLOCK_V,), tl.float32), 0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(l)
    tl.store(lse_ptr + row, lse)
    tl.store(tgt_logit_ptr + row, tl.load(z_row + tgt).to(tl.float32))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = tl.load(z_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        dz = (tl.exp(z - lse) - tl.where(cols == tgt, 1.0, 0.0)) * scale
        tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _patch_kernel(h_ptr, w_ptr, b_ptr, t_ptr, sum_ptr, grad_ptr, h_desc, w_desc, grad_scale, N, D, H,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  WRITE_GRAD: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """Residual r = h @ w^T + b - t of one (row, column) tile, in fp32, in one pass: its sum of squares
    to sum (row tiles, column tiles) fp32 and, WRITE_GRAD, grad (N, D) = grad_scale * r in the input dtype.

    h: (N, H); w: (D, H); b: (D,); t: (N, D). TMA: h and w tiles as in `_lm_fwd_kernel`.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    if TMA:
        pred = _tile_matmul_tma(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), h_desc, w_desc, pid_m * BLOCK_M,
                                pid_n * BLOCK_N, H, BLOCK_K, False, True, UPCAST, PREC)
    else:
        pred = _tile_matmul(tl.zeros((BLOCK_M, BLOCK_N), tl.float32), h_ptr, w_ptr, rows % N, cols % D, H, H, 1, 1,
                            H, BLOCK_K, UPCAST, PREC)
    pred += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    r = tl.where(ok, pred - tl.load(t_ptr + offs, mask=ok, other=0.0).to(tl.float32), 0.0)
    tl.store(sum_ptr + pid_m * tl.num_programs(0) + pid_n, tl.sum(tl.sum(r * r, 1), 0))
    if WRITE_GRAD:
        tl.store(grad_ptr + offs, (grad_scale * r).to(grad_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Row tiles in flight at once in the online-lse GEMMs (LM forward, InfoNCE forward): 16 row tiles of a
# 2048-wide bf16 input are 8 MiB, well inside the 50 MiB L2 of an H100/H200.
_L2_ROW_TILES = 16


def _cols_per_split(row_tiles: int, col_tiles: int, programs: int) -> int:
    """Column tiles per split of an online-lse GEMM whose program holds one row tile and streams its split's
    column tiles, the split index fastest in launch order. programs: about how many run at once (2 per SM).

    Each column tile re-reads the program's whole row tile (BLOCK_M x K: 512 KiB at K = 2048 in bf16), so
    the row tiles in flight must stay in L2: enough splits that the programs in flight share at most
    _L2_ROW_TILES of them (and fill the GPU when rows are few). With one or two splits, row tile fastest,
    every row tile of M = 16384 would be in flight at once (64 MiB) and each column tile would fetch its
    rows from HBM again (~80 GB per LM forward at 16384 x 2048 x 151936)."""
    splits = max(triton.cdiv(programs, row_tiles), triton.cdiv(programs, _L2_ROW_TILES))
    return triton.cdiv(col_tiles, min(col_tiles, splits))


def _launch_cfg(dtype: torch.dtype, rows: int, cols: int, gpu: bool, tma: bool = False) -> dict:
    """Tiles of a (rows x cols) output, BLOCK_M x BLOCK_N each, reducing BLOCK_K at a time; TMA: the
    operand tiles through TMA descriptors (`_use_tma`).

    GPU: tensor-core tiles, BLOCK_K = 32 keeping the pointer-load loops free of register spills on sm_90
    (fp32's exact FMA dots need 64 x 16 slices for that); TMA loads hold no pointer tiles in registers,
    which leaves room for BLOCK_K = 64 in 16-bit. Checked by bench/compile_gate.py. Interpreter: its
    cost is per tile op, not per flop, so few wide tiles (but >= 4 across cols, so that small tests
    still cross tile and split borders) and fp32 maths.
    """
    bm = max(16, min(128, triton.next_power_of_2(rows)))
    if gpu:
        fp32 = dtype == torch.float32
        return dict(BLOCK_M=bm, BLOCK_N=64 if fp32 else 128, BLOCK_K=16 if fp32 else (64 if tma else 32),
                    UPCAST=False, PREC="ieee" if fp32 else "tf32", TMA=tma,
                    num_warps=8 if bm >= 128 else 4, num_stages=3)  # 64 rows on 8 warps spilled on sm86/89
    return dict(BLOCK_M=bm, BLOCK_N=max(16, min(4096, triton.next_power_of_2(triton.cdiv(cols, 4)))),
                BLOCK_K=128, UPCAST=True, PREC="ieee", TMA=tma)


# The loss GEMMs' shipped TMA choice on a GPU (these and InfoNCE's score GEMMs): off until a GPU run shows
# the benches' ours-tma rows ahead (MOCA_TMA=1 / 0 overrides it, see kernels/_backend.py).
SHIPPED_TMA = False


def _use_tma(*xs) -> bool:
    """TMA for the loss GEMMs: wanted (MOCA_TMA, else SHIPPED_TMA) and legal for every 2-D operand."""
    return switch("MOCA_TMA", SHIPPED_TMA) and all(tma_aligned(x) for x in xs)


def _desc(x, rows: int, cols: int):
    """TMA descriptor over the 2-D tensor x in blocks of rows x cols; None when x is None."""
    return None if x is None else TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [rows, cols])


def _vocab_chunk(M: int, V: int, H: int, block: int) -> int:
    """Columns per backward chunk: the (M, Vc) d_logits hold max(M * H, V * H / 64) elements, so a
    chunk fits in d_hidden's own (M, H) buffer whenever M is large enough for that to matter, and is
    at most 1/64 of the weight otherwise. Vc is a multiple of the column tile once it exceeds one."""
    vc = min(V, max(16, max(M * H, V * H // 64) // M))
    return vc if vc < block else vc // block * block


def _lm_fwd_triton(h, w, tgt):
    """-> (lse, target logit), both (M,) fp32. h: (M, H); w: (V, H); tgt: (M,) int64."""
    M, H = h.shape
    V = w.shape[0]
    tma = _use_tma(h, w)
    cfg = _launch_cfg(h.dtype, M, V, h.is_cuda, tma)
    descs = (_desc(h, cfg["BLOCK_M"], cfg["BLOCK_K"]), _desc(w, cfg["BLOCK_N"], cfg["BLOCK_K"])) if tma else (None,) * 2
    m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
    v_tiles = triton.cdiv(V, cfg["BLOCK_N"])
    programs = 2 * _sm_count(h.device.index) if h.is_cuda else 4
    per_split = _cols_per_split(m_tiles, v_tiles, programs)
    splits = triton.cdiv(v_tiles, per_split)
    lse = torch.empty(splits, M, dtype=torch.float32, device=h.device)
    tgt_logit = torch.empty_like(lse)
    _lm_fwd_kernel[(splits, m_tiles)](h, w, tgt, lse, tgt_logit, *descs, M, V, H, per_split, **cfg)
    return torch.logsumexp(lse, 0), tgt_logit.sum(0)


def _lm_bwd_triton(h, w, tgt, lse, scale):
    """-> (d_hidden, d_weight) in the input dtype. scale: (1,) fp32 = upstream grad / M."""
    M, H = h.shape
    V = w.shape[0]
    cfg = _launch_cfg(h.dtype, M, V, h.is_cuda, _use_tma(h, w))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    descs = (_desc(h, bm, bk), _desc(w, bn, bk)) if cfg["TMA"] else (None,) * 2
    vc = _vocab_chunk(M, V, H, bn)

    def acc_cfg_for(tma: bool) -> dict:  # the d_hidden GEMM reduces over V: the interpreter's wide tile goes to K
        c = _launch_cfg(h.dtype, M, V, h.is_cuda, tma)
        return dict(c, BLOCK_N=c["BLOCK_K"], BLOCK_K=c["BLOCK_N"]) if c["UPCAST"] else c

    # Peak extra memory is the two gradients plus fp32 (M, H): the d_logits chunks live in the storage
    # of d_hidden's output (vc <= H), which receives its final value only after the last chunk.
    dh = torch.empty_like(h)
    dz_buf = dh.view(-1) if vc <= H else torch.empty(M * vc, dtype=h.dtype, device=h.device)
    dh32 = torch.zeros(M, H, dtype=torch.float32, device=h.device)
    dw = torch.empty_like(w)
    for v0 in range(0, V, vc):
        n = min(vc, V - v0)
        dz = dz_buf[: M * n].view(M, n)
        _lm_dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(M, bm))](h, w, tgt, lse, scale, dz, *descs, M, H, v0, n,
                                                                      **cfg)
        torch.mm(dz.t(), h, out=dw[v0 : v0 + n])
        w_chunk = w[v0 : v0 + n]
        tma = cfg["TMA"] and _use_tma(dz, w_chunk)  # a chunk's d_logits rows may not be 16-byte multiples
        acc = acc_cfg_for(tma)
        ab = (_desc(dz, bm, acc["BLOCK_K"]), _desc(w_chunk, acc["BLOCK_K"], acc["BLOCK_N"])) if tma else (None, None)
        grid = (triton.cdiv(H, acc["BLOCK_N"]), triton.cdiv(M, bm))
        _mm_acc_kernel[grid](dh32, dz, w_chunk, *ab, M, H, n, n, 1, H, 1, **acc, A_T=False)
    return dh.copy_(dh32), dw


def _row_chunk(M: int, V: int, H: int) -> int:
    """Rows per gradient-in-forward chunk: the (rows, V) logits chunk holds at most 0.2 (M + V) H
    elements, 10% of inputs + gradients (the issue's memory budget), in multiples of 64 rows."""
    return min(M, max(64, (M + V) * H // (5 * V) // 64 * 64))


def _acc_cfg(dtype: torch.dtype, rows: int, cols: int, K: int, gpu: bool, tma: bool = False) -> dict:
    """Tiles of `_mm_acc_kernel` for a (rows x cols) fp32 output reducing over K: the GEMM tiles of
    `_launch_cfg` on a GPU, under the interpreter few wide tiles (its cost is per tile op)."""
    if gpu:
        return _launch_cfg(dtype, rows, cols, True, tma)
    return dict(BLOCK_M=max(16, min(1024, triton.next_power_of_2(rows))),
                BLOCK_N=max(16, min(256, triton.next_power_of_2(cols))),
                BLOCK_K=max(16, min(128, triton.next_power_of_2(K))), UPCAST=True, PREC="ieee", TMA=tma)


def _lm_grads_in_forward(h, w, tgt, need_dh, need_dw):
    """Loss terms and the gradients of the SUMMED loss times `_grad_scale(dtype)` (the caller's backward
    multiplies by grad_output / (M * that)), in 3 GEMMs of 2 M V H.

    h: (M, H); w: (V, H); tgt: (M,) int64 -> lse, target logit: (M,) fp32; d_hidden (M, H) in the
    input dtype or None; d_weight (V, H) fp32 or None. Per chunk of rows: cuBLAS logits in the input
    dtype, the fused epilogue turns them into d_logits in place, then d_hidden[chunk] = d_logits @ w
    (cuBLAS, every vocabulary column in one GEMM) and d_weight += d_logits^T @ h[chunk] in fp32.
    """
    M, H = h.shape
    V = w.shape[0]
    rows = _row_chunk(M, V, H)
    z_buf = torch.empty(rows * V, dtype=h.dtype, device=h.device)
    lse = torch.empty(M, dtype=torch.float32, device=h.device)
    tgt_logit = torch.empty_like(lse)
    dh = torch.empty_like(h) if need_dh else None
    dw32 = torch.zeros(V, H, dtype=torch.float32, device=h.device) if need_dw else None
    ce_cfg = dict(BLOCK_V=4096, num_warps=8) if h.is_cuda else dict(BLOCK_V=max(16, triton.next_power_of_2(V // 4)))
    tma = need_dw and _use_tma(h, z_buf.view(rows, V))  # a chunk's rows start at multiples of V elements
    acc_cfg = _acc_cfg(h.dtype, V, H, rows, h.is_cuda, tma)
    acc_grid = (triton.cdiv(H, acc_cfg["BLOCK_N"]), triton.cdiv(V, acc_cfg["BLOCK_M"]))
    for r0 in range(0, M, rows):
        n = min(rows, M - r0)
        hc = h[r0 : r0 + n]
        z = z_buf[: n * V].view(n, V)
        torch.mm(hc, w.t(), out=z)
        _lm_ce_grad_kernel[(n,)](z, tgt[r0 : r0 + n], lse[r0 : r0 + n], tgt_logit[r0 : r0 + n], _grad_scale(h.dtype),
                                 V, **ce_cfg)
        if need_dh:
            torch.mm(z, w, out=dh[r0 : r0 + n])
        if need_dw:  # a = d_logits^T: (V, n) with strides (1, V); with TMA its descriptor is over z itself
            bm, bn, bk = acc_cfg["BLOCK_M"], acc_cfg["BLOCK_N"], acc_cfg["BLOCK_K"]
            ab = (_desc(z, bk, bm), _desc(hc, bk, bn)) if tma else (None, None)
            _mm_acc_kernel[acc_grid](dw32, z, hc, *ab, V, H, n, 1, V, H, 1, **acc_cfg, A_T=True)
    return lse, tgt_logit, dh, dw32


def _grad_scale(dtype: torch.dtype) -> float:
    """What the gradient-in-forward d_logits are written times: (softmax - onehot) is made in the forward,
    before the upstream (loss-scaled) gradient is known, and a softmax entry near 1/V = 7e-6 over 1/M
    flushes to zero in fp16 (subnormals end at 6e-8). fp16 therefore writes them unscaled times 2^8: each
    is at most 256 in magnitude, and d_hidden's row, a sum of them times a column of the head, stays
    within fp16's 65504 for head weights below 128. A power of two: exact to undo."""
    return 256.0 if dtype == torch.float16 else 1.0


def _scaled_downcast(x32, scale, dtype):
    """x32 * scale rounded once to `dtype`, written over x32's own storage (no second (V, H) buffer):
    slab by slab, 16-bit element i lands in bytes [2i, 2i + 2), which hold fp32 elements already read.
    x32: contiguous fp32; scale: 0-d fp32 tensor. Returns a view of x32's storage."""
    if dtype == torch.float32:
        return x32.mul_(scale)
    flat = x32.view(-1)
    out = flat.view(dtype)[: flat.numel()]
    for i in range(0, flat.numel(), _DOWNCAST_SLAB):
        out[i : i + _DOWNCAST_SLAB] = flat[i : i + _DOWNCAST_SLAB] * scale
    return out.view(x32.shape)


def _lm_fwd_torch(h, w, tgt):
    """Reference: -> (lse, target logit), both (M,) fp32, logits in row chunks in the input dtype."""
    M, V = h.shape[0], w.shape[0]
    step = max(1, _REF_CHUNK // V)
    lse = torch.empty(M, dtype=torch.float32, device=h.device)
    tgt_logit = torch.empty_like(lse)
    for i in range(0, M, step):
        z = (h[i : i + step] @ w.t()).float()
        lse[i : i + step] = torch.logsumexp(z, 1)
        tgt_logit[i : i + step] = z.gather(1, tgt[i : i + step, None])[:, 0]
    return lse, tgt_logit


def _lm_bwd_torch(h, w, tgt, lse, scale):
    """Reference: -> (d_hidden, d_weight), d_weight accumulated over row chunks in fp32."""
    M, V = h.shape[0], w.shape[0]
    step = max(1, _REF_CHUNK // V)
    dh = torch.empty_like(h)
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for i in range(0, M, step):
        hc, tc = h[i : i + step], tgt[i : i + step]
        p = torch.exp((hc @ w.t()).float() - lse[i : i + step, None])
        p[torch.arange(len(tc), device=p.device), tc] -= 1.0
        dz = (p * scale).to(h.dtype)
        dh[i : i + step] = dz @ w
        dw.addmm_(dz.t().float(), hc.float())
    return dh, dw.to(w.dtype)


def _patch_triton(h, w, b, t, need_grad):
    """-> (sum of squared residuals, fp32 scalar; residual gradient G = 2 r / (N D) of the mean loss,
    (N, D) in the input dtype, or None). h: (N, H); w: (D, H); b: (D,); t: (N, D).
    fp16: G = r unscaled instead, scaled in the backward together with the upstream gradient (loss
    scaling), since 2 r / (N D) falls below fp16's normal range (6e-5) for N D of about 1e7."""
    N, H = h.shape
    D = w.shape[0]
    cfg = _launch_cfg(h.dtype, N, D, h.is_cuda, _use_tma(h, w))
    descs = (_desc(h, cfg["BLOCK_M"], cfg["BLOCK_K"]), _desc(w, cfg["BLOCK_N"], cfg["BLOCK_K"])) if cfg["TMA"] else (
        None, None)
    grid = (triton.cdiv(D, cfg["BLOCK_N"]), triton.cdiv(N, cfg["BLOCK_M"]))
    partial = torch.empty(grid[1], grid[0], dtype=torch.float32, device=h.device)
    g = torch.empty(N, D, dtype=h.dtype, device=h.device) if need_grad else None
    grad_scale = 1.0 if h.dtype == torch.float16 else 2.0 / (N * D)
    _patch_kernel[grid](h, w, b, t, partial, partial if g is None else g, *descs, grad_scale, N, D, H,
                        WRITE_GRAD=need_grad, **cfg)
    return partial.sum(), g


def _patch_fwd_torch(h, w, b, t):
    """Reference: projection in the input dtype, squared error summed in fp32."""
    return (torch.addmm(b, h, w.t()).float() - t.float()).square().sum()


def _patch_bwd_torch(h, w, b, t, scale):
    g = (2.0 * scale * (torch.addmm(b, h, w.t()).float() - t.float())).to(h.dtype)
    return g @ w, g.t() @ h, g.sum(0, dtype=torch.float32).to(b.dtype)


class _MaskedLMLoss(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, targets, backend, grad_in_forward):
        ctx.backend = backend
        ctx.grads = None
        need = ctx.needs_input_grad[:2]
        if backend == "triton" and grad_in_forward and any(need):  # grad_in_forward: False without grad mode
            lse, tgt_logit, d_hidden, d_weight32 = _lm_grads_in_forward(hidden, weight, targets, *need)
            ctx.grads, ctx.dtype, ctx.rows = (d_hidden, d_weight32), weight.dtype, hidden.shape[0]
            return (lse - tgt_logit).mean()
        fwd = _lm_fwd_triton if backend == "triton" else _lm_fwd_torch
        lse, tgt_logit = fwd(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return (lse - tgt_logit).mean()

    @staticmethod
    @no_double_backward("masked_lm_loss")
    @autocast_off
    def backward(ctx, grad):
        if ctx.grads is not None:
            d_hidden, d_weight32 = ctx.grads
            if d_weight32 is None and d_hidden is None:
                raise LossBackwardError("masked_lm_loss computed its gradients in the forward and they were "
                                        "already used: backward through it once (no retain_graph reuse)")
            ctx.grads = (None, None)  # d_weight is downcast in place: a second backward would read garbage
            g = grad.float() / (ctx.rows * _grad_scale(ctx.dtype))
            return (None if d_hidden is None else d_hidden.mul_(g),
                    None if d_weight32 is None else _scaled_downcast(d_weight32, g, ctx.dtype), None, None, None)
        hidden, weight, targets, lse = ctx.saved_tensors
        bwd = _lm_bwd_triton if ctx.backend == "triton" else _lm_bwd_torch
        scale = (grad.float() / hidden.shape[0]).reshape(1)
        d_hidden, d_weight = bwd(hidden, weight, targets, lse, scale)
        return d_hidden, d_weight, None, None, None


class _MaskedPatchLoss(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, bias, targets, backend, grad_mode):
        ctx.backend = backend
        if backend == "triton":  # gradient in the forward: one pass of residuals, no recompute
            need = grad_mode and any(ctx.needs_input_grad[:3])  # needs_input_grad holds under no_grad too
            sq_sum, ctx.residual_grad = _patch_triton(hidden, weight, bias, targets, need)
        else:
            sq_sum = _patch_fwd_torch(hidden, weight, bias, targets)
        ctx.save_for_backward(hidden, weight, bias, targets)
        return sq_sum / targets.numel()

    @staticmethod
    @no_double_backward("masked_patch_loss")
    @autocast_off
    def backward(ctx, grad):
        hidden, weight, bias, targets = ctx.saved_tensors
        if ctx.backend == "torch":
            scale = (grad.float() / targets.numel()).reshape(1)
            return (*_patch_bwd_torch(hidden, weight, bias, targets, scale), None, None, None)
        G = ctx.residual_grad  # (N, D) = d loss / d prediction for upstream grad 1 (fp16: r, see _patch_triton)
        g = grad.float()
        if G.dtype == torch.float16:  # the upstream (loss-scaled) gradient first, in fp32, then fp16 GEMMs
            G, g = (G.float() * (2.0 * g / G.numel())).to(torch.float16), torch.ones_like(g)
        d_bias = (G.sum(0, dtype=torch.float32) * g).to(bias.dtype)
        return (G @ weight).mul_(g), (G.t() @ hidden).mul_(g), d_bias, None, None, None


class LossBackwardError(RuntimeError):
    """A second backward through a loss whose gradients were computed (and consumed) in its forward."""


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def masked_lm_loss(hidden, lm_weight, targets, backend=None, grad_in_forward=False):
    """Mean cross-entropy of `hidden @ lm_weight.T` against `targets`, without the logits (MOCA.md §2's MLM).

    hidden: (M, H) at the masked positions only, M >= 1; lm_weight: (V, H), same dtype (fp32, fp16 or bf16);
    targets: (M,) int64 in [0, V) (checked: ValueError on the host, a device-side assert on CUDA, no sync).
    Returns an fp32 scalar; gradients flow to hidden and lm_weight.
    grad_in_forward (Triton backend, when a gradient is needed): False (default) recomputes the logits
    in the backward (4 GEMMs, peak extra = gradients + fp32 (M, H)); True computes the gradients in the
    forward (3 GEMMs, an fp32 (V, H) d_weight accumulator, one backward only: LossBackwardError on a second;
    ignored without grad mode, under torch.no_grad).
    ValueError also for other shapes or dtypes, mismatched dtypes, M, V or H = 0 or more than 2^31 elements in
    an input. No double backward (create_graph=True): differentiating the gradients raises a RuntimeError.
    """
    _require(hidden.ndim == 2 and lm_weight.ndim == 2 and hidden.shape[1] == lm_weight.shape[1],
             f"hidden (M, H) and lm_weight (V, H) expected, got {tuple(hidden.shape)} and {tuple(lm_weight.shape)}")
    _require(hidden.dtype == lm_weight.dtype, f"dtype mismatch: {hidden.dtype} vs {lm_weight.dtype}")
    _require(hidden.dtype in _DTYPES, f"fp32, fp16 or bf16 inputs, got {hidden.dtype}")
    _require(hidden.shape[0] >= 1, "no masked rows")
    _require(lm_weight.shape[0] >= 1 and hidden.shape[1] >= 1, f"empty LM head: lm_weight {tuple(lm_weight.shape)}")
    _require(max(hidden.numel(), lm_weight.numel()) < 2**31, "more than 2^31 elements (the kernels use int32 offsets)")
    _require(targets.dtype == torch.int64 and tuple(targets.shape) == (hidden.shape[0],),
             f"targets must be ({hidden.shape[0]},) int64, got {tuple(targets.shape)} {targets.dtype}")
    V = lm_weight.shape[0]
    if targets.is_cuda:  # a device-side assert: no host sync (out-of-range targets would read out of bounds)
        torch._assert_async(((targets >= 0) & (targets < V)).all(), f"masked_lm_loss: targets outside [0, {V})")
    else:
        _require(bool((targets >= 0).all()) and bool((targets < V).all()), f"targets outside [0, {V})")
    backend = resolve(backend, hidden)
    return _MaskedLMLoss.apply(hidden.contiguous(), lm_weight.contiguous(), targets.contiguous(), backend,
                               grad_in_forward and torch.is_grad_enabled())


def masked_patch_loss(hidden, proj_weight, proj_bias, targets, backend=None):
    """Mean squared error of `hidden @ proj_weight.T + proj_bias` against `targets` (MOCA.md §2's MAE).

    hidden: (N, H) at the masked image tokens; proj_weight: (D, H), D = 4704 for MoCa; proj_bias: (D,);
    the three in one dtype; targets: (N, D); each fp32, fp16 or bf16. Returns an fp32 scalar; gradients flow
    to hidden, proj_weight and proj_bias (computed in the forward on the Triton backend, where grad mode is on).
    ValueError for other shapes or dtypes, mismatched dtypes, N, H or D = 0 or more than 2^31 elements in
    hidden or proj_weight. No double backward (create_graph=True): differentiating the gradients raises a
    RuntimeError.
    """
    _require(hidden.ndim == 2 and proj_weight.ndim == 2 and hidden.shape[1] == proj_weight.shape[1],
             f"hidden (N, H) and proj_weight (D, H) expected, got {tuple(hidden.shape)} and {tuple(proj_weight.shape)}")
    D = proj_weight.shape[0]
    _require(tuple(proj_bias.shape) == (D,) and tuple(targets.shape) == (hidden.shape[0], D),
             f"proj_bias ({D},) and targets ({hidden.shape[0]}, {D}) expected")
    _require(hidden.dtype == proj_weight.dtype == proj_bias.dtype, "hidden, proj_weight and proj_bias dtypes differ")
    _require(hidden.dtype in _DTYPES and targets.dtype in _DTYPES,
             f"fp32, fp16 or bf16 inputs and targets, got {hidden.dtype} and {targets.dtype}")
    _require(hidden.shape[0] >= 1, "no masked image tokens")
    _require(D >= 1 and hidden.shape[1] >= 1, f"empty projection: proj_weight {tuple(proj_weight.shape)}")
    _require(max(hidden.numel(), proj_weight.numel()) < 2**31,
             "more than 2^31 elements (the kernels use int32 offsets)")
    backend = resolve(backend, hidden)
    return _MaskedPatchLoss.apply(hidden.contiguous(), proj_weight.contiguous(), proj_bias.contiguous(),
                                  targets.contiguous(), backend, torch.is_grad_enabled())
