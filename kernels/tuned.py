"""Shipped launch configs of the attention kernels, per GPU architecture: no autotuning on first use.

A `triton.autotune`d kernel benchmarks every candidate config the first time it meets a new key, which
made `python -m moca.embed` spend 16 s on 6 inputs on an H200 (issue #12). The default path instead
reads (BLOCK_M, BLOCK_N, num_warps, num_stages) from the rules below; `MOCA_AUTOTUNE=1` brings the
autotuner back over the candidates (kernels/attention.py `candidates`), and bench/tune_attention.py
times them all on the attention benchmark's shapes (bench/results/<device>-<date>-tune-attention.md):
its winners are what belongs in this table, and its "Proposed sm90 rules" name, per rule below (by
index in its kernel's list), the candidate fastest over every benchmark launch the rule decides, and
the head-dim splits that pay (bench/tune_rules.py; `bench/throughput.py --rules` benchmarks them).

Rules: for an architecture and a kernel the first rule whose conditions all hold wins; a condition is
`dtype` (equal), `head_dim` (equal), `max_seq` (seq bucket <=), `masked` (`masked(head_dim)`: the split
covers more than head_dim),
`packed` (the packed-tile kernels, which batches of segments no longer than PACKED_MAX_SEQLEN run) or
`fused_dq` (dk/dv adding dq too, FUSED_DQ below), and the last rule has none.
The GQA group is no key: beyond GROUP == 1 it changes no kernel code, only the length of dk/dv's loop.
The warp-specialized forward and dq (WARP_SPECIALIZE) have rules of their own, keyed by the Triton version
that compiles them.
Architectures without an entry get "default": spill-free within the 99 KiB of shared memory of sm86/sm89
on A100, A10-class and L40S-class GPUs (sm80, sm86, sm89), as `bench/compile_gate.py --arch 80|86|89` checks
(tables in bench/results/sm80-compile-gate.md and the like); untimed.

Status: the sm90 rules come from the sm90 compile gate (bench/compile_gate.py, table in
bench/results/sm90-compile-gate.md: every shipped config compiles with zero spills within 227 KiB of
shared memory) and from the register reasoning in kernels/attention.py. They await timing on a GPU.
"""

import torch

KERNELS = ("fwd", "dkdv", "dq")
# Batches whose segments are all at most this long run the packed-tile kernels (several segments per
# tile, block-diagonal mask): a vision window or a CL text fills a fraction of a tile of its own.
# Awaiting GPU tuning, like the packed rules below.
PACKED_MAX_SEQLEN = 64
# A batch with longer segments too runs both kernels (its short segments packed, the rest per segment)
# when its mean segment length is at most this (host ints only: T / B), as in a CL batch of MMEB
# (many 16-64-token texts, some images); longer means run per-segment tiles alone.
MIXED_MAX_MEAN = 256

# The backward's dq for 16-bit inputs, per architecture (off everywhere until a GPU run times it;
# MOCA_FUSED_DQ=1 / 0 overrides). Off: the dq kernel recomputes the score and dP tiles, 7 GEMMs per
# (query tile, key tile) pair in all. On: each dk/dv program also forms dS K for the query tiles it visits
# and adds it into an fp32 (T, Hq, D) buffer with relaxed atomics, as flash-attn 2 and 3 do: 5 GEMMs and
# no second kernel, for atomics traffic and a dq whose fp32 sum order varies from run to run. fp32 inputs
# always take the dq kernel: theirs is the exact, deterministic path, and no fp32 dk/dv tile with the
# fused dq was free of spills under both Triton 3.6 and 3.9.
FUSED_DQ = {"sm90": False}

# The warp-specialized attention forward and dq (Hopper; kernels/attention.py WS): Triton's automatic warp
# specialization (`tl.range(..., warp_specialize=True)`) splits their per-segment key loops into a TMA
# producer and wgmma consumer warp groups, moving registers to the consumers (setmaxnreg), the structure of
# flash-attention 3. Per architecture and kernel: whether it ships (off everywhere until a GPU run times it
# against the plain kernels: bench_attention's ours_ws row, whose fwd pass shows the forward's and bwd pass the
# dq's; MOCA_WS=1 / 0 overrides both), and each kernel's tiles (below: num_warps is a group's, the launch has
# 12 warps), for 16-bit inputs and head dims without a masked tail.
WARP_SPECIALIZE = {"sm90": {"fwd": False, "dq": False}}
# Triton versions whose compiler warp-specializes the kernels, every WS config below compiled for sm_90 under
# each: 3.6 (the GPU image's) to 3.9 (bench/compile_gate.py: this machine's 3.9 and the committed 3.6 table;
# 3.7 and 3.8 by hand). Newer releases are not assumed to: they keep the plain kernels until checked. Tiles
# differ: from 3.7 on the partitioner splits a 128-row q tile between consumer groups but not its TMA
# descriptor ("descriptor block and tensor must have the same number of elements"); dq's 128-row tiles fail
# under 3.6 and 3.9 alike. These are the largest tiles that compile, spill-free, under each. dk/dv always
# keeps the plain kernel (see kernels/attention.py).
WS_TRITON = ((3, 6), (3, 9))  # first and last version, inclusive
_WS_RULES = {
    "sm90": {
        "fwd": [
            (dict(triton=(3, 6)), (128, 128, 4, 2)),  # 181 KiB of shared memory at head dim 128
            (dict(), (64, 128, 4, 2)),  # 165 KiB
        ],
        "dq": [(dict(), (64, 64, 4, 2))],  # 115 KiB
    },
}

# (conditions, (BLOCK_M, BLOCK_N, num_warps, num_stages[, tma])); the scheduled tile is BLOCK_M for fwd/dq, BLOCK_N
# for dkdv. tma (default False): the streamed tiles (k, v in fwd and dq; q, do in dk/dv) load through TMA
# descriptors where the tensors allow (kernels/attention.py `_tma_ok`); MOCA_TMA=1 / 0 overrides.
_RULES = {
    "sm90": {
        # 16-bit: 128-row query tiles on 8 warps keep the fp32 accumulators in registers up to head dim
        # 128 (segments of up to PACKED_MAX_SEQLEN tokens, e.g. 64-token vision windows, share packed tiles;
        # a per-segment launch always has longer ones, so no rule conditions on max_seq yet). Head dims whose
        # split has a masked tail (72, 112: `masked`) need masked, unvectorised loads, which spill the wider tiles.
        # fp32 inputs take exact FMA dots (no tensor cores): only tiny tiles stay free of spills, with
        # both the Triton here and the GPU image's 3.6 (whose ptxas spilled the 16x32 dk/dv tile and the
        # pipelined 32x16 dq one: bench/results/sm90-compile-gate-triton3.6.json).
        # Packed tiles (awaiting GPU tuning): the long-segment configs, as a packed tile is as full as a
        # long segment's (zero spills in the gate with the packed kernels' block-diagonal mask).
        "fwd": [
            (dict(packed=True, dtype=torch.float32), (32, 16, 8, 2)),
            (dict(packed=True, masked=True), (128, 32, 8, 3)),
            (dict(packed=True), (128, 64, 8, 3)),
            (dict(dtype=torch.float32), (32, 16, 8, 2)),
            (dict(masked=True), (128, 32, 8, 3)),
            (dict(), (128, 64, 8, 3)),
        ],
        # dk/dv with the fused dq (FUSED_DQ): the dq tile and its atomics cost registers, so smaller tiles than
        # without (32x128 w8 spills with it at head dims 72 and 128, under Triton 3.6 or 3.9): spill-free in the gate.
        "dkdv": [
            (dict(fused_dq=True, masked=True), (16, 16, 8, 2)),
            (dict(fused_dq=True), (32, 64, 8, 2)),
            (dict(packed=True, dtype=torch.float32), (16, 16, 8, 2)),
            (dict(packed=True, masked=True), (32, 64, 8, 3)),
            (dict(packed=True), (32, 128, 8, 3)),
            (dict(dtype=torch.float32), (16, 16, 8, 2)),
            (dict(), (32, 128, 8, 3)),
        ],
        "dq": [
            (dict(packed=True, dtype=torch.float32), (32, 16, 8, 1)),
            (dict(packed=True, masked=True), (128, 16, 8, 3)),
            (dict(packed=True), (128, 32, 8, 3)),
            (dict(dtype=torch.float32), (32, 16, 8, 1)),
            (dict(masked=True), (128, 16, 8, 3)),
            (dict(), (128, 32, 8, 3)),
        ],
    },
    # Pre-Hopper (A100 sm80; A10, A6000, RTX 3090 sm86; L4, L40S, RTX 4090 sm89): mma.sync keeps every operand
    # tile in registers, so tiles that fit sm_90's wgmma spill here (64x64 on 4 warps: up to 680 bytes at head dim
    # 128). These are the largest of the swept tiles with zero spills on all three at every head dim 32..128,
    # per segment and packed, within 99 KiB of shared memory (bench/compile_gate.py --arch 80/86/89). Untimed.
    "default": {
        "fwd": [
            (dict(dtype=torch.float32), (16, 16, 8, 2)),
            (dict(masked=True), (64, 32, 8, 2)),
            (dict(), (128, 32, 8, 2)),
        ],
        "dkdv": [  # fp32's exact FMA dots: the one spill-free tile differs with the head dim
            (dict(dtype=torch.float32, head_dim=32), (16, 16, 4, 2)),
            (dict(dtype=torch.float32, head_dim=80), (16, 16, 8, 2)),
            (dict(dtype=torch.float32), (16, 16, 8, 1)),
            (dict(masked=True), (16, 32, 8, 2)),
            (dict(), (32, 64, 8, 2)),
        ],
        "dq": [
            (dict(dtype=torch.float32), (16, 16, 4, 2)),
            (dict(masked=True), (32, 32, 8, 2)),
            (dict(), (128, 32, 8, 2)),
        ],
    },
}


def arch_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> "sm90"."""
    return f"sm{capability[0]}{capability[1]}"


MAX_HEAD_DIM = 128  # the largest head dim the rules are compiled for (bench/compile_gate.py HEAD_DIMS)


def split_head_dim(d: int) -> tuple[int, int]:
    """(D0, D1): how the kernels cover head dim d, a power-of-two chunk plus a power-of-two tail (0 if none),
    each >= 16 (64 + 16 for 80; 64 + 64 for 112, whose last 16 columns are masked)."""
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)
    return (d, 0) if d0 == d else (d0, max(16, 1 << (d - d0 - 1).bit_length()))


def masked(head_dim: int) -> bool:
    """Whether the kernels load head_dim's columns through a masked tail (split_head_dim covers more): 72,
    40 and 112, not 80 or 96."""
    return sum(split_head_dim(head_dim)) != head_dim


def _holds(cond: dict, head_dim: int, dtype: torch.dtype, seq_bucket: int, packed: bool, fused_dq: bool) -> bool:
    return (
        cond.get("packed", packed) == packed
        and cond.get("fused_dq", fused_dq) == fused_dq
        and cond.get("dtype", dtype) == dtype
        and cond.get("head_dim", head_dim) == head_dim
        and seq_bucket <= cond.get("max_seq", seq_bucket)
        and cond.get("masked", masked(head_dim)) == masked(head_dim)
    )


def rule(arch: str, kernel: str, head_dim: int, dtype: torch.dtype, seq_bucket: int, packed: bool = False,
         fused_dq: bool = False) -> tuple[int, dict, tuple]:
    """(index, conditions, config) of the rule that decides the launch: the first of `kernel`'s (one of KERNELS)
    rules for `arch` ("default"'s for an architecture without rules) whose conditions all hold."""
    rules = _RULES.get(arch, _RULES["default"])[kernel]
    return next((i, cond, cfg) for i, (cond, cfg) in enumerate(rules)
                if _holds(cond, head_dim, dtype, seq_bucket, packed, fused_dq))


WS_KERNELS = ("fwd", "dq")


def ws_available(arch: str, triton_version: tuple[int, int]) -> bool:
    """Whether the warp-specialized kernels compile for `arch` under Triton `triton_version` (major, minor)."""
    return arch in _WS_RULES and WS_TRITON[0] <= triton_version <= WS_TRITON[1]


def ws_config(arch: str, kernel: str, triton_version: tuple[int, int]) -> dict:
    """Launch config {BLOCK_M, BLOCK_N, num_warps, num_stages, TMA} of warp-specialized `kernel` (one of
    WS_KERNELS; `arch` and `triton_version` as ws_available accepts): the first of its rules whose Triton
    version matches."""
    bm, bn, warps, stages = next(cfg for cond, cfg in _WS_RULES[arch][kernel]
                                 if cond.get("triton", triton_version) == triton_version)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, TMA=True)


def attention_config(arch: str, kernel: str, head_dim: int, dtype: torch.dtype, seq_bucket: int,
                     packed: bool = False, fused_dq: bool = False) -> dict:
    """Launch config {BLOCK_M, BLOCK_N, num_warps, num_stages, TMA} of attention kernel `kernel` (one of
    KERNELS), of its packed-tile variant when `packed`, of dk/dv with the fused dq when `fused_dq`."""
    bm, bn, warps, stages, *tma = rule(arch, kernel, head_dim, dtype, seq_bucket, packed, fused_dq)[2]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, TMA=bool(tma and tma[0]))
