"""Masked-reconstruction losses (kernels/recon_loss.py) against their peers, one run.

Masked-LM rows, one per provider x (M, H, V): ms and peak GiB of the training forward and of
forward + backward, TFLOP/s of forward + backward (6·M·V·H useful flops, our recompute not counted),
mem_x = (inputs + peak extra) / (inputs + gradients), the issue's target being <= 1.1, and x_floor =
fwd+bwd ms / floor ms, the floor being 6·M·V·H flops at the bf16 (CPU: fp32) GEMM rate that a
torch.matmul of 8192^3 (CPU: 512^3) reaches in the same run (its own "gemm" row).
Providers: ours (the default, grad_in_forward=False: logits recomputed in the backward, the memory-lean
path), ours-grad-in-forward (3 GEMMs, fp32 d_weight accumulator: opt-in until measured), each also as
"-tma" (GPU: MOCA_TMA=1, the Triton GEMMs' operands through TMA descriptors, BLOCK_K 64); torch naive
(bf16 logits + F.cross_entropy); on GPU also torch's own chunked
F.linear_cross_entropy where this torch has it, Liger's fused linear cross-entropy (as it ships, its
d_weight accumulated in the input dtype, and "liger-flce-fp32acc" with accum_dtype fp32, what ours does) and
cut-cross-entropy (its default, lossy gradient filter as "cce", exact as "cce-exact"); a peer not installed
is a row saying so. Rows tagged "@all" run what the reference release ran: the loss over ALL T = M / 0.4
positions with the unmasked 60% labelled -100 (with Liger when installed, else torch's chunked op,
else naive torch); the summary gives the saving of ours on the masked rows only.
Masked-patch rows: ours against naive torch (Linear + F.mse_loss).
"dw_gemm" rows (GPU): the d_weight GEMM of one gradient-in-forward row chunk, fp32 (V, H) += d_logits^T
(V, rows) @ hidden (rows, H), by our Triton kernel (shipped) and by cuBLAS with fp32 output
(torch.addmm out_dtype, where this torch has it), at the shipped row chunk and at 1024 / 2048 rows;
ms_all_chunks = ms x chunks at that M. Which GEMM to ship, and whether a longer chunk (more memory) pays,
is to be read off these rows.

On CPU only torch paths run (ours = its torch backend): Triton's interpreter is no speed.
"""

import math

import torch
import torch.nn.functional as F

from common import missing_peer, peak_gib, time_ms, with_env
import triton

from kernels import masked_lm_loss, masked_patch_loss
from kernels import recon_loss as _rl

MASK_RATE = 0.4
LM_SHAPES = {
    ("cuda", False): [(4096, 2048, 151936), (16384, 2048, 151936), (16384, 3584, 152064)],
    ("cuda", True): [(4096, 2048, 151936)],
    ("cpu", False): [(512, 256, 32000)],
    ("cpu", True): [(256, 128, 8192)],
}
PATCH_SHAPES = {
    ("cuda", False): [(4096, 2048), (16384, 3584)],
    ("cuda", True): [(4096, 2048)],
    ("cpu", False): [(1024, 256)],
    ("cpu", True): [(128, 128)],
}


def _lm_providers(device: str) -> dict:
    """name -> loss(hidden (M, H), weight (V, H), labels (M,)) with -100 = ignored."""
    out = {
        "ours": masked_lm_loss,
        "ours-tma": masked_lm_loss,  # run under PROVIDER_ENV
        "ours-grad-in-forward": lambda h, w, t: masked_lm_loss(h, w, t, grad_in_forward=True),
        "ours-grad-in-forward-tma": lambda h, w, t: masked_lm_loss(h, w, t, grad_in_forward=True),
        "torch-naive": lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t),
    }
    if device != "cuda":  # torch's chunked op takes seconds on even the quick CPU shape; no TMA on a CPU
        return {k: v for k, v in out.items() if not k.endswith("-tma")}
    if hasattr(F, "linear_cross_entropy"):
        opts = torch.nn.LinearCrossEntropyOptions()
        out["torch-lce"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, ignore_index=-100, options=opts)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()
        flce_fp32 = LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)
        out["liger-flce"] = lambda h, w, t: flce(w, h, t)
        out["liger-flce-fp32acc"] = lambda h, w, t: flce_fp32(w, h, t)
    except ImportError as e:
        out["liger-flce"] = missing_peer("liger-kernel", e)
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda h, w, t: linear_cross_entropy(h, w, t)
        out["cce-exact"] = lambda h, w, t: linear_cross_entropy(h, w, t, filter_eps=None)
    except ImportError as e:
        out["cce"] = missing_peer("cut-cross-entropy", e)
    return out


def _release_provider(providers: dict) -> str:
    """The provider that stands for the reference release's loss over all positions: Liger as it ran there,
    else torch's chunked op, else naive torch (whichever is installed first)."""
    return next(p for p in ("liger-flce", "torch-lce", "torch-naive")
                if p in providers and not getattr(providers[p], "missing", False))


# Environment a provider runs under, forward and backward (None unsets): ours as shipped, or with the
# GEMM operands forced through TMA descriptors.
PROVIDER_ENV = {name: {"MOCA_TMA": "1" if name.endswith("-tma") else None}
                for name in ("ours", "ours-tma", "ours-grad-in-forward", "ours-grad-in-forward-tma")}


def _measure(loss_fn, params, rest, device, repeats):
    """ms and peak GiB of the forward and of forward + backward of loss_fn(*params, *rest)."""
    fwd = lambda: loss_fn(*params, *rest)  # noqa: E731
    fwd_bwd = lambda: torch.autograd.grad(loss_fn(*params, *rest), params)  # noqa: E731
    return {
        "ms_fwd": time_ms(fwd, device, warmup=1, repeats=repeats),
        "ms_fwd_bwd": time_ms(fwd_bwd, device, warmup=1, repeats=repeats),
        "peak_gib_fwd": peak_gib(fwd, device),
        "peak_gib_fwd_bwd": peak_gib(fwd_bwd, device),
    }


def _gemm_tflops(device: str, dtype: torch.dtype) -> float:
    """TFLOP/s of one square torch.matmul in `dtype`: the rate the floor is read at."""
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / time_ms(lambda: a @ b, device) / 1e9


def _dw_gemm_rows(M, H, V, dtype, device) -> list[dict]:
    """Ours (Triton) against cuBLAS fp32-output for the d_weight GEMM of one row chunk (GPU only), at the
    shipped chunk and at 1024 / 2048 rows: a short reduction re-reads the fp32 (V, H) once per chunk."""
    rows = []
    for n in sorted({_rl._row_chunk(M, V, H), *(k for k in (1024, 2048) if k <= M)}):
        z = torch.randn(n, V, device=device).to(dtype)
        h = torch.randn(n, H, device=device).to(dtype)
        acc = torch.zeros(V, H, device=device)
        cfg, tma = _rl._acc_cfg(dtype, V, H, n, True), _rl._acc_cfg(dtype, V, H, n, True, tma=True)
        grid = (triton.cdiv(H, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_M"]))
        descs = (_rl._desc(z, tma["BLOCK_K"], tma["BLOCK_M"]), _rl._desc(h, tma["BLOCK_K"], tma["BLOCK_N"]))
        impls = {
            "ours-triton": lambda: _rl._mm_acc_kernel[grid](acc, z, h, None, None, V, H, n, 1, V, H, 1, A_T=True,
                                                            **cfg),
            "ours-triton-tma": lambda: _rl._mm_acc_kernel[grid](acc, z, h, *descs, V, H, n, 1, V, H, 1, A_T=True,
                                                                **tma),
            "cublas-fp32-out": lambda: torch.addmm(acc, z.t(), h, out_dtype=torch.float32, out=acc),
        }
        for name, fn in impls.items():
            shipped = " (shipped chunk)" if n == _rl._row_chunk(M, V, H) else ""
            row = {"op": "dw_gemm", "provider": name + shipped, "shape": f"{V}x{H}x{n}"}
            try:
                ms = time_ms(fn, device)
                row.update(ms=ms, ms_all_chunks=ms * triton.cdiv(M, n), tflops=2 * V * H * n / ms / 1e9)
            except Exception as e:  # noqa: BLE001 - e.g. no out_dtype in this torch
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
        del z, h, acc
    return rows


def _row(op, provider, shape, loss_fn, params, rest, device, repeats, flops, gemm_tflops=None):
    row = {"op": op, "provider": provider, "shape": "x".join(map(str, shape))}
    try:
        with with_env(PROVIDER_ENV.get(provider, {})):
            row.update(_measure(loss_fn, params, rest, device, repeats))
    except Exception as e:  # noqa: BLE001 - OOM, a peer's limit, ours failing to compile: a row, not the end
        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
        if device == "cuda":
            torch.cuda.empty_cache()
        return row
    row["tflops"] = flops / row["ms_fwd_bwd"] / 1e9
    if gemm_tflops:
        row["x_floor"] = row["ms_fwd_bwd"] / (flops / gemm_tflops / 1e9)
    if row["peak_gib_fwd_bwd"] is not None:
        sizes = sum(p.numel() * p.element_size() for p in params) / 2**30
        row["mem_x"] = (sizes + row["peak_gib_fwd_bwd"]) / (2 * sizes)
    return row


def run(device: str, quick: bool) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    repeats = 3 if device == "cpu" else 5
    gemm = _gemm_tflops(device, dtype)
    rows = [{"op": "gemm", "provider": "torch.matmul", "shape": "8192^3" if device == "cuda" else "512^3",
             "tflops": gemm}]
    gen = torch.Generator(device=device).manual_seed(0)
    for M, H, V in LM_SHAPES[(device, quick)]:
        weight = (torch.randn(V, H, device=device, generator=gen) / math.sqrt(H)).to(dtype).requires_grad_()
        hidden = torch.randn(M, H, device=device, generator=gen).to(dtype).requires_grad_()
        targets = torch.randint(0, V, (M,), device=device, generator=gen)
        providers = _lm_providers(device)
        for name, fn in providers.items():
            rows.append(_row("lm", name, (M, H, V), fn, (hidden, weight), (targets,), device, repeats, 6 * M * V * H,
                             gemm))
        # the reference release: every position through the head, the unmasked ones ignored
        T = round(M / MASK_RATE)
        hidden_all = torch.randn(T, H, device=device, generator=gen).to(dtype).requires_grad_()
        labels = torch.full((T,), -100, device=device)
        labels[torch.randperm(T, device=device, generator=gen)[:M]] = targets
        release = _release_provider(providers)
        rows.append(_row("lm", f"{release}@all", (T, H, V), providers[release], (hidden_all, weight), (labels,),
                         device, repeats, 6 * M * V * H, gemm))
        del weight, hidden, hidden_all
        if device == "cuda":
            rows += _dw_gemm_rows(M, H, V, dtype, device)
    for N, H in PATCH_SHAPES[(device, quick)]:
        D = 4 * 1176
        params = (
            torch.randn(N, H, device=device, generator=gen).to(dtype).requires_grad_(),
            (torch.randn(D, H, device=device, generator=gen) / math.sqrt(H)).to(dtype).requires_grad_(),
            torch.zeros(D, device=device, dtype=dtype, requires_grad=True),
        )
        targets = torch.randn(N, D, device=device, generator=gen).to(dtype)
        naive = lambda h, w, b, t: F.mse_loss(F.linear(h, w, b).float(), t.float())  # noqa: E731
        patch = {"ours": masked_patch_loss, "ours-tma": masked_patch_loss, "torch-naive": naive}
        if device != "cuda":  # no TMA on a CPU
            del patch["ours-tma"]
        for name, fn in patch.items():
            rows.append(_row("patch", name, (N, H), fn, params, (targets,), device, repeats, 6 * N * D * H, gemm))
    return rows


def summary(rows: list[dict]) -> dict:
    """Per LM shape, for ours and each of its variants (-tma, -grad-in-forward): fwd+bwd speed against each
    peer (x > 1: ours faster), among them the saving against the release's all-positions computation
    ("@all", the issue wants >= 2), time over the floor (<= 1.3 wanted) and peak memory against inputs +
    gradients (<= 1.1 wanted); per patch shape, naive torch's time over ours (>= 1.5 wanted), forward and
    forward + backward. A provider that failed has an `error` row and no key."""
    out = {}
    by = {(r["op"], r["provider"], r["shape"]): r for r in rows if "ms_fwd_bwd" in r}
    ours = tuple(PROVIDER_ENV)
    for (op, prov, shape), r in by.items():
        if prov not in ours:
            continue
        if op == "patch":
            naive = by.get(("patch", "torch-naive", shape))
            if naive:  # forward (with its gradient, as a training step runs it) and forward + backward
                out[f"patch {shape} naive/{prov} fwd"] = naive["ms_fwd"] / r["ms_fwd"]
                out[f"patch {shape} naive/{prov}"] = naive["ms_fwd_bwd"] / r["ms_fwd_bwd"]
            continue
        M = int(shape.split("x")[0])
        for (op2, peer, shape2), p in by.items():
            same = shape2 == shape
            release = peer.endswith("@all") and shape2 == f"{round(M / MASK_RATE)}x{shape.split('x', 1)[1]}"
            if op2 == "lm" and peer not in ours and (same or release):
                out[f"{shape} {prov} vs {peer}"] = p["ms_fwd_bwd"] / r["ms_fwd_bwd"]
        for key in ("x_floor", "mem_x"):
            if r.get(key) is not None:
                out[f"{shape} {prov} {key}"] = r[key]
    return out
