"""sm_90 compile gate: compile every Triton kernel for GPUTarget("cuda", 90, 32) on a CPU machine.

The Triton wheel carries ptxas and cuobjdump, so no GPU is needed. Each kernel is bound exactly as
the JIT binds a launch (Triton's own binder on CPU tensors of the right dtypes and realistic int
arguments, hence the same signature, constexprs and divisibility/==1 specializations) and compiled
with `triton.compile`; cuobjdump then reads the cubin's registers, STACK and LOCAL (spills).

Coverage. Attention (fwd, dk/dv, dq, preprocess): head dims 32 (tiny preset), 40 (odd: a 32 + 16
tail), 64, 72, 80 (vision), 96, 128 (text); fp16, bf16, fp32; GQA groups 1 (16/16 heads, vision),
2 (4/2, tiny), 7 (28/4, 7B) and 8 (16/2, 3B); seq bucket 8192 and each that a tuned.py rule names (they
pick different shipped configs); every config kernels/tuned.py ships for sm90, per-segment and packed
(PACKED, spec suffix "packed": several short segments per tile); in bf16, for head dims without a masked tail and groups
1 and 8, the TMA variant of each (config suffix "tma": streamed tiles through TMA descriptors);
dk/dv with the fused dq (suffix "fused_dq": dq added with atomics, MOCA_FUSED_DQ=1) at the tiles
tuned.py gives it, in bf16 (and fp16 once tuned.FUSED_DQ ships it), with and without TMA; the
warp-specialized forward and dq (suffix "ws", MOCA_WS=1) per segment in bf16 at the tiles tuned.py gives the
installed Triton, for head dims without a masked tail and groups 1 and 8 (where tuned.ws_available: the gate
also fails it when the compiler launches no more warps than the config's, i.e. did not specialize).
Specializations that bind identically (groups 2 and 7 do) are compiled once and listed together.
The preprocess kernel is compiled once per head dim and dtype (n_tokens = 1001). Losses: the
masked-LM forward, d_logits and d_hidden kernels and the patch kernel (loss only and loss +
gradient, 16-bit and fp32 targets) at every BLOCK_M their launcher picks (16..128), the
gradient-in-forward LM epilogue (lm_ce_grad) and its d_weight GEMM (mm_acc_dw: the d_hidden kernel
on a transposed operand), InfoNCE forward (with and without hard negatives) and d_scores, each in
fp16, bf16 and fp32, with the configs their launchers use on a GPU; in bf16 also the TMA variant of
each LM and patch GEMM (suffix "tma", BLOCK_K 64). A TMA variant counts as shipped only where the
shipped configs turn TMA on (tuned.py's tma flag, recon_loss.SHIPPED_TMA), a fused-dq one only where
tuned.FUSED_DQ is on, a warp-specialized one only where tuned.WARP_SPECIALIZE is; until then their spills are
reported, not asserted. Autotune candidates: every
one of `SPACES` x `STAGES`, for a representative subset only (bf16, group 8, head dim 128: the text
tower, the most register-hungry); the whole candidate cross product would take hours on two cores.
All in all 729 compiles: about 5 min wall cold on the 2-core dev box, ~10 s from Triton's cache.

Gate: no compile error anywhere; shipped configs with STACK = LOCAL = 0 and shared memory within
sm_90's 227 KiB; other candidates only have to compile (their spills are reported, not asserted).
Triton versions: CI runs the gate with the Triton installed here (3.9); the GPU image has 3.6, whose
ptxas allocates registers differently (it spilled three fp32 configs that 3.9 did not), so the table
for 3.6 is made too, from a venv of its own (below), and committed beside this one.

    python bench/compile_gate.py            # table to stdout and bench/results/sm90-compile-gate.{md,json}
    python bench/compile_gate.py --json X   # rows to X only (tests/test_compile_gate.py)
    python bench/compile_gate.py --json X --only infonce   # one kernel family
    python bench/compile_gate.py --arch 80  # an A100: bench/results/sm80-compile-gate.{md,json}
    /tmp/t36/bin/python bench/compile_gate.py --stem bench/results/sm90-compile-gate-triton3.6
        # the same gate under the GPU image's Triton (3.6, in a venv of its own: torch CPU + triton==3.6.0)

Other architectures (`--arch 80 | 86 | 89`: A100; A10, A6000, RTX 3090; L4, L40S, RTX 4090): the same kernels
with the configs kernels/tuned.py gives them (its untuned "default" rules for attention; the loss kernels' tiles
do not depend on the architecture), without the Hopper-only variants (TMA, the fused dq, the sm_90-sized autotune
candidates), shared memory checked against that architecture's limit: 451 compiles, ~4 min cold; tables in
bench/results/sm80-compile-gate.md, sm86-, sm89-. Not part of the CPU suite (its minutes go to sm_90).

Exit status 1 when the gate fails. Compiles land in Triton's cache, so a rerun only redoes what changed.
"""

import os

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, whatever the caller's environment says
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default, stated to silence a warning

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import tuned  # noqa: E402

# the modules (kernels/__init__ re-exports functions under some of the same names)
attention, infonce, recon_loss = (importlib.import_module(f"kernels.{m}")
                                   for m in ("attention", "infonce", "recon_loss"))

# max dynamic shared memory per block: A100 (sm_80); A10, A6000, RTX 3090 (sm_86); L4, L40S, RTX 4090 (sm_89);
# H100, H200 (sm_90)
SHARED_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TARGET = GPUTarget("cuda", 90, 32)  # `set_arch` changes these three
ARCH = "sm90"
SHARED_LIMIT = SHARED_LIMITS[90]
SMS = 132  # H100/H200 SM count, for the launchers' split heuristics
HEAD_DIMS = (32, 40, 64, 72, 80, 96, 128)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GROUPS = {1: (16, 16), 2: (4, 2), 7: (28, 4), 8: (16, 2)}  # GQA group: (query heads, kv heads)
# seq buckets: the largest, and each that a max_seq condition of kernels/tuned.py names (they pick their rules)
SEQ_BUCKETS = tuple(sorted({8192, *(cond["max_seq"] for rules in tuned._RULES[ARCH].values() for cond, _ in rules
                                    if "max_seq" in cond)}))
CANDIDATE_SUBSET = dict(dtype="bf16", group=8, head_dims=(128,))
TMA_DTYPES = ("bf16",)  # TMA variants: bf16 (fp16 binds alike); attention for groups 1 and 8 (vision, 3B)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def set_arch(cap: int) -> None:
    """Compile for sm_{cap} (a key of SHARED_LIMITS) from now on, with the configs kernels/tuned.py gives it."""
    global TARGET, ARCH, SHARED_LIMIT
    TARGET, ARCH, SHARED_LIMIT = GPUTarget("cuda", cap, 32), f"sm{cap}", SHARED_LIMITS[cap]


def _hopper() -> bool:
    """TMA descriptors, the fused dq (sm_90 atomics) and the autotune candidates (sized for sm_90) are Hopper's."""
    return TARGET.arch >= 90


def _ptr(dtype: torch.dtype) -> torch.Tensor:
    """A 16-byte aligned CPU tensor: all the binder reads of a pointer argument is its dtype and alignment."""
    return torch.empty(16, dtype=dtype)


# ----------------------------------------------------------------------------- launches, as the launchers make them


def _attention(kernel: str, head_dim: int, dtype: str, group: int, cfg: tuple, n_tokens: int = 4096,
               packed: bool = False, tma: bool = False, fused_dq: bool = False, ws: bool = False):
    """(jit fn, args, kwargs) of one attention launch, arguments in the launcher's order; tma: the streamed
    tiles through TMA descriptors (built as the launcher builds them, on a CPU tensor: only their dtype,
    block shape and alignment reach the compiler); fused_dq: dk/dv also adds dq into its fp32 buffer;
    ws: the warp-specialized forward or dq (q, and dq's do, through descriptors too; with tma)."""
    dt = DTYPES[dtype]
    H, H_kv = GROUPS[group]
    D = head_dim
    d0, d1 = tuned.split_head_dim(D)
    meta = dict(GROUP=group, HEAD_DIM=D, D0=d0, D1=d1, DTYPE=attention._TL_DTYPES[dt],
                DOT_PREC="ieee" if dt == torch.float32 else "tf32")
    if kernel == "preprocess":
        args = (_ptr(dt), _ptr(dt), _ptr(torch.float32), H * D, D, H * D, D, n_tokens)
        return attention._attn_bwd_preprocess, args, dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
                                                          BLOCK_T=64)
    bm, bn, warps, stages = cfg
    x, f32, i32 = _ptr(dt), _ptr(torch.float32), _ptr(torch.int32)
    q_st, kv_st = (H * D, D), (H_kv * D, D)
    launch = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, PACKED=packed, TMA=tma, **meta)
    heads = H_kv if kernel in ("fwd", "dq") else H  # the streamed pair: k, v (fwd, dq) or q, do (dk/dv)
    streamed = (torch.empty(n_tokens, heads, D, dtype=dt),) * 2 if tma else None
    descs = attention._descriptors(streamed, bn if kernel in ("fwd", "dq") else bm, d0, d1)
    scalars = (n_tokens, 0.125, 2048)
    ws_descs = (None,) * attention._N_WS_DESCS[kernel]
    if ws:  # the launch's (q, k, v, do) as CPU tensors of their shapes, for the descriptors
        qs, kvs = torch.empty(n_tokens, H, D, dtype=dt), torch.empty(n_tokens, H_kv, D, dtype=dt)
        ws_descs = attention._ws_descriptors(kernel, (qs, kvs, kvs, qs), dict(BLOCK_M=bm), dict(D0=d0, D1=d1))
    if kernel == "fwd":
        return attention._attn_fwd_kernel, (x, x, x, x, f32, i32, i32, *descs, *ws_descs, *q_st, *kv_st, *kv_st, *q_st,
                                            *scalars), dict(H=H, WS=ws, **launch)
    grads = (n_tokens, 0.125, 0.09, 2048)
    if kernel == "dkdv":
        dq = f32 if fused_dq else None
        return attention._attn_bwd_dkdv_kernel, (x, x, x, x, f32, f32, x, x, dq, i32, i32, *descs, *q_st, *kv_st,
                                                 *kv_st, *q_st, *kv_st, *kv_st, *q_st, *grads), dict(
            H_KV=H_kv, FUSED_DQ=fused_dq, **launch)
    return attention._attn_bwd_dq_kernel, (x, x, x, x, f32, f32, x, i32, i32, *descs, *ws_descs, *q_st, *kv_st,
                                           *kv_st, *q_st, *q_st, *grads), dict(H=H, WS=ws, **launch)


def _loss(kernel: str, dtype: str, rows: int, extra: str = "", tma: bool = False):
    """(jit fn, args, kwargs) of one loss-kernel launch with its launcher's GPU config for `rows` rows;
    tma: the GEMM operands through TMA descriptors (built on a CPU tensor, as for attention)."""
    dt = DTYPES[dtype]
    x, f32, i64 = _ptr(dt), _ptr(torch.float32), _ptr(torch.int64)

    def desc(shape, block):  # a row-major (rows, cols) operand in blocks of `block`
        return TensorDescriptor(x, list(shape), [shape[1], 1], list(block)) if tma else None

    if kernel.startswith("infonce"):
        cfg = infonce._config(dt)
        B, D = rows, 2048
        qt = (desc((B, D), (cfg["BLOCK_M"], cfg["BLOCK_K"])), desc((B, D), (cfg["BLOCK_N"], cfg["BLOCK_K"])))
        if kernel == "infonce_fwd":
            r = 2 if extra == "neg" else 1
            row_tiles = key_tiles = triton.cdiv(B, cfg["BLOCK_M"])
            per_split = recon_loss._cols_per_split(row_tiles, key_tiles, 2 * SMS)
            return infonce._infonce_fwd_kernel, (x, x, x, f32, f32, f32, f32, *qt, B, D, per_split, 0.1), dict(
                R=r, HAS_NEG=r > 1, TMA=tma, **cfg)
        return infonce._infonce_dscores_kernel, (x, x, f32, x, *qt, B, B, D, B, 0, 0.1), dict(TMA=tma, **cfg)
    M, H, V, P = rows, 2048, 151936, 4 * 1176
    if kernel.startswith("patch"):
        cfg = recon_loss._launch_cfg(dt, M, P, True, tma)
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        t = _ptr(torch.float32 if extra == "fp32-targets" else dt)
        grad = kernel == "patch_loss_grad"
        return recon_loss._patch_kernel, (x, x, x, t, f32, x if grad else f32, desc((M, H), (bm, bk)),
                                          desc((P, H), (bn, bk)), 1e-8, M, P, H), dict(WRITE_GRAD=grad, **cfg)
    if kernel == "lm_ce_grad":
        return recon_loss._lm_ce_grad_kernel, (x, i64, f32, f32, 1.0 / M, V), dict(BLOCK_V=4096, num_warps=8)
    if kernel == "mm_acc_dw":  # gradient-in-forward: d_weight (V, H) fp32 += d_logits^T (V, rows) @ hidden
        n = recon_loss._row_chunk(M, V, H)
        cfg = recon_loss._acc_cfg(dt, V, H, n, True, tma)
        bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
        return recon_loss._mm_acc_kernel, (f32, x, x, desc((n, V), (bk, bm)), desc((n, H), (bk, bn)), V, H, n, 1, V,
                                           H, 1), dict(cfg, A_T=True)
    cfg = recon_loss._launch_cfg(dt, M, V, True, tma)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    hw = (desc((M, H), (bm, bk)), desc((V, H), (bn, bk)))
    v_tiles = triton.cdiv(V, cfg["BLOCK_N"])
    if kernel == "lm_fwd":
        m_tiles = triton.cdiv(M, cfg["BLOCK_M"])
        per_split = recon_loss._cols_per_split(m_tiles, v_tiles, 2 * SMS)
        return recon_loss._lm_fwd_kernel, (x, x, i64, f32, f32, *hw, M, V, H, per_split), cfg
    vc = recon_loss._vocab_chunk(M, V, H, cfg["BLOCK_N"])
    if kernel == "lm_dlogits":
        return recon_loss._lm_dlogits_kernel, (x, x, i64, f32, f32, x, *hw, M, H, vc, vc), cfg
    ab = (desc((M, vc), (bm, bk)), desc((vc, H), (bk, bn)))
    return recon_loss._mm_acc_kernel, (f32, x, x, *ab, M, H, vc, vc, 1, H, 1), dict(cfg, A_T=False)


def _launch(job: dict):
    return _attention(**job["args"]) if job["family"] == "attention" else _loss(**job["args"])


# ----------------------------------------------------------------------------- binding and compiling


def bind(fn, args, kwargs):
    """(fn, signature, constexprs, attrs, options): what the JIT would compile for fn[grid](*args, **kwargs)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, signature, constexprs, attrs, options


def launch_key(fn, args, kwargs) -> str:
    """What tells two launches apart in Triton's cache (equal keys: one compile serves both)."""
    fn, signature, constexprs, attrs, options = bind(fn, args, kwargs)
    return repr((fn.__name__, signature, sorted(map(repr, constexprs.items())), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


def _key(job: dict) -> str:
    return launch_key(*_launch(job))


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[1]))
    return {k.lower(): int(v) for k, v in usage.items()}


def compile_launch(fn, args, kwargs) -> dict:
    """Compile fn[grid](*args, **kwargs) for TARGET into Triton's cache -> {regs, shared (bytes, dynamic +
    static), stack, local, warps (launched: more than num_warps where warp specialization added groups),
    error}; a failure is reported in error, not raised."""
    row = dict(regs=None, shared=None, stack=None, local=None, warps=None, error=None)
    try:
        fn, signature, constexprs, attrs, options = bind(fn, args, kwargs)
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
        usage = _resources(kernel.asm["cubin"])
        row.update(regs=usage["reg"], stack=usage["stack"], local=usage["local"],
                   shared=kernel.metadata.shared + usage["shared"], warps=kernel.metadata.num_warps)
    except Exception as e:  # noqa: BLE001 - every failure is a row of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return row


def compile_job(job: dict) -> dict:
    """Row of the table: job fields plus regs, shared, stack, local, error (`compile_launch`)."""
    try:
        launch = _launch(job)
    except Exception as e:  # noqa: BLE001
        return dict(job, regs=None, shared=None, stack=None, local=None, error=f"{type(e).__name__}: {e}"[:300])
    return dict(job, **compile_launch(*launch))


# ----------------------------------------------------------------------------- the job list


def _attention_kernels(dtype: str):
    """(kernel, packed, fused_dq) to compile in `dtype`: every kernel per segment and packed, and dk/dv with
    the fused dq (MOCA_FUSED_DQ=1; 16-bit only) in both 16-bit dtypes where tuned.py ships it, else in the
    TMA dtypes (bf16)."""
    for name in tuned.KERNELS:
        for packed in (False, True):
            yield name, packed, False
            if name == "dkdv" and dtype != "fp32" and _hopper() and (tuned.FUSED_DQ[ARCH] or dtype in TMA_DTYPES):
                yield name, packed, True


def jobs(only: str = "") -> list[dict]:
    """Every launch to compile (of the kernels whose name contains `only`), identical bindings merged
    (their specializations listed together)."""
    out = []

    def add(family, name, args, label, config, shipped):
        if only in name:
            out.append(dict(family=family, kernel=name, args=args, spec=label, config=config, shipped=shipped))

    for D in HEAD_DIMS:
        for dtype in DTYPES:
            add("attention", "attn_preprocess", dict(kernel="preprocess", head_dim=D, dtype=dtype, group=8, cfg=None),
                f"D={D} {dtype}", "64x D", True)
            unmasked = not tuned.masked(D)
            for name, packed, fused in _attention_kernels(dtype):
                # configs the launchers take (the fused dq's only count as shipped where tuned.py turns it on)
                shipped = {tuple(tuned.attention_config(ARCH, name, D, DTYPES[dtype], s, packed, fused).values())
                           for s in SEQ_BUCKETS}  # fmt: skip
                ships = fused == (name == "dkdv" and tuned.FUSED_DQ.get(ARCH, False))
                cands = {(*c, False) for c in attention.candidates(name)}
                if packed or not _hopper() or not (dtype == CANDIDATE_SUBSET["dtype"]
                                                   and D in CANDIDATE_SUBSET["head_dims"]):
                    cands = set()
                spec = f"D={D} {dtype} G={{}}" + (" packed" if packed else "")
                for group in GROUPS:
                    for cfg in sorted(shipped | (cands if group == CANDIDATE_SUBSET["group"] else set())):
                        bmbnws, tma = cfg[:4], cfg[4]
                        variants = [tma]
                        if not tma and _hopper() and dtype in TMA_DTYPES and group in (1, 8) and unmasked:
                            variants.append(True)  # the TMA variant (MOCA_TMA=1, or a rule's tma flag)
                        for tma in variants:
                            args = dict(kernel=name, head_dim=D, dtype=dtype, group=group, cfg=bmbnws, packed=packed,
                                        tma=tma, fused_dq=fused)
                            label = "{}x{} w{} s{}".format(*bmbnws) + " tma" * tma + " fused_dq" * fused
                            add("attention", f"attn_{name}", args, spec.format(group), label,
                                ships and (*bmbnws, tma) in shipped)
    # the warp-specialized forward and dq (MOCA_WS=1, tuned.WARP_SPECIALIZE), per segment with TMA, in the TMA
    # dtypes, for head dims without a masked tail and groups 1 and 8, at the tiles tuned.py gives this Triton
    version = attention._triton_version()
    for name in tuned.WS_KERNELS if tuned.ws_available(ARCH, version) else ():
        cfg = tuned.ws_config(ARCH, name, version)
        bmbnws = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
        for D in (d for d in HEAD_DIMS if not tuned.masked(d)):
            for dtype in TMA_DTYPES:
                for group in (1, 8):
                    add("attention", f"attn_{name}", dict(kernel=name, head_dim=D, dtype=dtype, group=group,
                                                          cfg=bmbnws, tma=True, ws=True),
                        f"D={D} {dtype} G={group}", "{}x{} w{} s{} tma ws".format(*bmbnws),
                        tuned.WARP_SPECIALIZE[ARCH][name])
    tma_dtypes = TMA_DTYPES if _hopper() else ()
    for dtype in DTYPES:
        for rows in (1, 29, 37, 4096):  # BLOCK_M 16 (M == 1), 32, 64, 128
            for name in ("lm_fwd", "lm_dlogits", "mm_acc", "patch_loss", "patch_loss_grad"):
                for extra in ("", "fp32-targets") if name.startswith("patch") and dtype != "fp32" else ("",):
                    for tma in (False, True) if dtype in tma_dtypes and rows != 29 else (False,):
                        cfg = recon_loss._launch_cfg(DTYPES[dtype], rows, 1, True, tma)
                        add("loss", name, dict(kernel=name, dtype=dtype, rows=rows, extra=extra, tma=tma),
                            f"{dtype} M={rows} {extra}".strip(), _cfg_label(cfg), tma == recon_loss.SHIPPED_TMA)
        # gradient-in-forward LM: the row epilogue (config independent of M) and the d_weight GEMM, whose
        # reduction length is the row chunk (M = 1: one row; 4096 and 16384: the 3B chunk sizes)
        add("loss", "lm_ce_grad", dict(kernel="lm_ce_grad", dtype=dtype, rows=4096), dtype, "4096 w8", True)
        for rows in (1, 4096, 16384):
            for tma in (False, True) if dtype in tma_dtypes else (False,):
                cfg = recon_loss._acc_cfg(DTYPES[dtype], 151936, 2048, recon_loss._row_chunk(rows, 151936, 2048),
                                          True, tma)
                add("loss", "mm_acc_dw", dict(kernel="mm_acc_dw", dtype=dtype, rows=rows, tma=tma), f"{dtype} M={rows}",
                    _cfg_label(cfg), tma == recon_loss.SHIPPED_TMA)
        for name, extra in (("infonce_fwd", ""), ("infonce_fwd", "neg"), ("infonce_dscores", "")):
            for tma in (False, True) if dtype in tma_dtypes else (False,):
                add("loss", name, dict(kernel=name, dtype=dtype, rows=4096, extra=extra, tma=tma),
                    f"{dtype} B=4096 {extra}".strip(), _cfg_label(dict(infonce._config(DTYPES[dtype]), TMA=tma)),
                    tma == recon_loss.SHIPPED_TMA)
    merged = {}
    for job in out:
        key = _key(job)
        if key in merged:
            merged[key]["spec"] += f" / {job['spec']}"
            merged[key]["shipped"] |= job["shipped"]
        else:
            merged[key] = job
    return list(merged.values())


def _cfg_label(cfg: dict) -> str:
    tma = " tma" if cfg.get("TMA") else ""
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}{tma}"


def failures(rows: list[dict]) -> list[str]:
    """What breaks the gate: compile errors anywhere, spills or too much shared memory in a shipped config, a
    warp-specialized variant that the compiler left unspecialized (no more warps than its num_warps)."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} [{r['spec']}] {r['config']}"
        if r["error"]:
            bad.append(f"{where}: {r['error']}")
        elif r["shipped"] and (r["stack"] or r["local"]):
            bad.append(f"{where}: spills (STACK {r['stack']}, LOCAL {r['local']})")
        elif r["shipped"] and r["shared"] > SHARED_LIMIT:
            bad.append(f"{where}: shared memory {r['shared']} > {SHARED_LIMIT}")
        elif r["config"].endswith(" ws") and r["warps"] <= int(re.search(r" w(\d+) ", r["config"])[1]):
            bad.append(f"{where}: not warp-specialized ({r['warps']} warps launched)")
    return bad


def markdown(rows: list[dict]) -> str:
    cap = TARGET.arch
    lines = [f"# sm_{cap} compile gate (triton {triton.__version__}, target cuda:{cap})", "",
             f"Written by `python bench/compile_gate.py{'' if cap == 90 else f' --arch {cap}'}`. shipped: a config "
             f"the launchers use by default (zero spills and shared <= {SHARED_LIMIT // 1024} KiB asserted); "
             + ("other rows are MOCA_AUTOTUNE candidates or opt-in variants (compile asserted, spills reported)."
                if _hopper() else "every row is one (no Hopper-only variant or sm_90 autotune candidate)."), "",
             "| kernel | specialization | config | shipped | regs | shared (B) | stack | local | warps | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['spec']} | {r['config']} | {'yes' if r['shipped'] else ''} | {r['regs']} "
                     f"| {r['shared']} | {r['stack']} | {r['local']} | {r['warps']} "
                     f"| {(r['error'] or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_LIMITS), default=90,
                        help="compute capability to compile for (default 90: H100/H200)")
    parser.add_argument("--json", help="write the rows here only (default: bench/results/smARCH-compile-gate.{md,json})")
    parser.add_argument("--stem", default=None,
                        help="write STEM.md and STEM.json (without --json); e.g. a table for another Triton "
                             "(default: bench/results/smARCH-compile-gate)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this (e.g. infonce)")
    args = parser.parse_args()
    set_arch(args.arch)
    stem = args.stem or str(ROOT / "bench" / "results" / f"sm{args.arch}-compile-gate")
    todo = jobs(args.only)
    with ProcessPoolExecutor(args.jobs, initializer=set_arch, initargs=(args.arch,)) as pool:
        rows = list(pool.map(compile_job, todo, chunksize=1))
    for r in rows:
        del r["args"], r["family"]
    table = markdown(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    else:
        Path(stem + ".json").write_text(json.dumps(rows, indent=1))
        Path(stem + ".md").write_text(table)
    print(table)
    bad = failures(rows)
    for b in bad:
        print("GATE FAILURE:", b, file=sys.stderr)
    print(f"{len(rows)} compiles, {len(bad)} failures", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
