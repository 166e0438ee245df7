"""Loss GEMM tile tuning (#15) on one H100/H200: the masked-LM, masked-patch and InfoNCE kernels timed per
candidate tile config at the benchmark's shapes, with and without TMA.

Their shipped tiles (kernels/recon_loss.py `_launch_cfg`, kernels/infonce.py `_config`) come from register
reasoning and the sm_90 compile gate, never from a timing. Each candidate replaces them for its runs (the
launchers look the config function up at call time). First, every candidate's launches are made as
warm-ups inside triton.AsyncCompileMode on a thread pool (Triton's compiler and ptxas release the GIL), so
all of them compile at once and the timing that follows finds them compiled; the JIT keys them itself,
on this device's tensors. Then per candidate: triton.testing.do_bench (median) of the training forward
and of forward + backward, and the loss and d_hidden against the shipped config's (a tile must not
change the result beyond fp32 summation order). Shapes go in order under a budget; what is not reached
is reported as such.

Writes every candidate's row, per (loss, shape, variant) the winner beside the shipped config, and per
shipped tile function the candidate (tiles and TMA) fastest over its shapes (`proposals`) to
bench/results/<device>-<date>-tune-losses.{json,md} (copied to $OUT when set): what `_launch_cfg`,
`_config` and recon_loss.SHIPPED_TMA are to be set from.

    python bench/tune_losses.py [--budget 120] [--threads 12] [--losses lm patch infonce]
"""

import argparse
import contextlib
import datetime
import importlib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import environment, time_ms, with_env, write_tables  # noqa: E402
import tune_rules  # noqa: E402

# the modules (kernels/__init__ re-exports functions under their names)
nce, rl = (importlib.import_module(f"kernels.{m}") for m in ("infonce", "recon_loss"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE = torch.bfloat16
# (loss, shape): LM (M masked rows, H, V), patch (N, H; D = 4 x 1176), InfoNCE (B, D); the shapes first
SHAPES = [("lm", (16384, 2048, 151936)), ("infonce", (32768, 2048)), ("patch", (16384, 3584)),
          ("lm", (16384, 3584, 152064))]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the shipped ones are added where missing
CANDIDATES = {
    "gemm": [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
             (128, 256, 32, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4)],
    "infonce": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (128, 128, 64, 4, 4), (64, 128, 64, 4, 4)],
}
# the function each loss's shipped tiles come from (what a proposal is for)
TABLES = {"lm": "recon_loss._launch_cfg", "patch": "recon_loss._launch_cfg", "infonce": "infonce._config"}
KERNELS = {rl: ("_lm_fwd_kernel", "_lm_dlogits_kernel", "_mm_acc_kernel", "_patch_kernel"),
           nce: ("_infonce_fwd_kernel", "_infonce_dscores_kernel")}


def shipped(loss: str, tma: bool) -> tuple:
    """The config the launchers take today at these shapes (16-bit, GPU)."""
    cfg = nce._config(DTYPE) if loss == "infonce" else rl._launch_cfg(DTYPE, 16384, 151936, True, tma)
    return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]


@contextlib.contextmanager
def tiles(loss: str, cand: tuple):
    """The launchers of `loss` take candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    bm, bn, bk, w, s = cand
    tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
    prec = lambda dtype: "ieee" if dtype == torch.float32 else "tf32"  # noqa: E731  (as the shipped configs)
    if loss == "infonce":
        saved, nce._config = nce._config, lambda dtype: dict(tile, INPUT_PRECISION=prec(dtype))
        try:
            yield
        finally:
            nce._config = saved
        return
    saved = rl._launch_cfg
    rl._launch_cfg = lambda dtype, rows, cols, gpu, tma=False: dict(tile, UPCAST=False, PREC=prec(dtype), TMA=tma)
    try:
        yield
    finally:
        rl._launch_cfg = saved


@contextlib.contextmanager
def warm_ups():
    """Launches of our loss kernels compile (into the active AsyncCompileMode) instead of running."""

    class Warm:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.fn.warmup(*args, grid=grid, **kwargs)

    saved = [(mod, name, getattr(mod, name)) for mod, names in KERNELS.items() for name in names]
    for mod, name, fn in saved:
        setattr(mod, name, Warm(fn))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def inputs(loss: str, shape: tuple, device: str = "cuda", dtype: torch.dtype = DTYPE) -> tuple:
    """(loss fn, leaves with grad, other args) of one shape, made as bench/bench_recon_loss.py and
    bench/bench_infonce.py make theirs."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=gen) * scale).to(dtype).requires_grad_()

    if loss == "lm":
        M, H, V = shape
        return rl.masked_lm_loss, (randn(M, H), randn(V, H, scale=1 / math.sqrt(H))), (
            torch.randint(0, V, (M,), device=device, generator=gen),)
    if loss == "patch":
        N, H = shape
        D = 4 * 1176
        leaves = (randn(N, H), randn(D, H, scale=1 / math.sqrt(H)), randn(D, scale=0.0))
        return rl.masked_patch_loss, leaves, (torch.randn(N, D, device=device, generator=gen).to(dtype),)
    B, D = shape
    return (lambda q, t: nce.infonce(q, t, temperature=0.05)), (randn(B, D, scale=1 / math.sqrt(D)),
                                                                randn(B, D, scale=1 / math.sqrt(D))), ()


def precompile(groups: list[dict], threads: int) -> None:
    """Every candidate of every group compiled at once: the launches become warm-ups in AsyncCompileMode."""
    with ThreadPoolExecutor(threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True), warm_ups():
        for g in groups:
            fn, leaves, rest = inputs(g["loss"], g["shape"])
            for cand in g["candidates"]:
                with with_env({"MOCA_TMA": "1" if g["tma"] else "0"}), tiles(g["loss"], cand):
                    torch.autograd.grad(fn(*leaves, *rest), leaves)
            del leaves


def time_group(g: dict, device: str = "cuda", dtype: torch.dtype = DTYPE, timer=time_ms) -> list[dict]:
    """Each candidate: ms of the forward and of forward + backward (timer(fn, device)), and its loss and the
    gradient of its first input (d_hidden; dq for InfoNCE) against the shipped config's, relative to that
    gradient's largest magnitude."""
    fn, leaves, rest = inputs(g["loss"], g["shape"], device, dtype)
    rows, ref = [], None
    for cand in [g["shipped"], *(c for c in g["candidates"] if c != g["shipped"])]:
        row = dict(loss=g["loss"], shape="x".join(map(str, g["shape"])), tma=g["tma"],
                   config="{}x{}x{} w{} s{}".format(*cand), shipped=cand == g["shipped"])
        try:
            with with_env({"MOCA_TMA": "1" if g["tma"] else "0"}), tiles(g["loss"], cand):
                value = fn(*leaves, *rest)
                grad = torch.autograd.grad(value, leaves[0])[0].float()
                row.update(ms_fwd=timer(lambda: fn(*leaves, *rest), device),
                           ms_fwd_bwd=timer(lambda: torch.autograd.grad(fn(*leaves, *rest), leaves), device))
        except Exception as e:  # noqa: BLE001 - a config that cannot launch (shared memory) is a row, not the end
            row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(row)
            continue
        if ref is None:
            ref = value.item(), grad
        row.update(loss_value=value.item(), loss_diff=abs(value.item() - ref[0]),
                   d_hidden_rel_diff=((grad - ref[1]).abs().max() / ref[1].abs().max()).item())
        rows.append(row)
    return rows


def winners(rows: list[dict]) -> list[dict]:
    out = {}
    for r in rows:
        key = (r["loss"], r["shape"], r["tma"])
        out.setdefault(key, {"shipped": None, "best": None})
        if "ms_fwd_bwd" not in r:
            continue
        if r["shipped"]:
            out[key]["shipped"] = r
        if out[key]["best"] is None or r["ms_fwd_bwd"] < out[key]["best"]["ms_fwd_bwd"]:
            out[key]["best"] = r
    return [dict(loss=k[0], shape=k[1], tma=k[2], best=v["best"]["config"], best_ms_fwd=v["best"]["ms_fwd"],
                 best_ms_fwd_bwd=v["best"]["ms_fwd_bwd"], best_d_hidden_rel_diff=v["best"]["d_hidden_rel_diff"],
                 shipped=v["shipped"]["config"], shipped_ms_fwd_bwd=v["shipped"]["ms_fwd_bwd"],
                 speedup=v["shipped"]["ms_fwd_bwd"] / v["best"]["ms_fwd_bwd"])
            for k, v in out.items() if v["best"] and v["shipped"]]


def proposals(rows: list[dict], max_rel_diff: float = 0.02) -> list[dict]:
    """Per shipped tile function (TABLES: the LM and patch GEMMs share one): the candidate, tiles and TMA, with the
    least geometric mean over its shapes of fwd+bwd time / the shape's fastest (bench/tune_rules.py `rank`),
    beside the shipped tiles under recon_loss.SHIPPED_TMA. Candidates whose d_hidden is off the shipped tiles' by
    more than max_rel_diff (of its largest magnitude; fp32 summation order moves a bf16 gradient by ~1e-3) at
    any shape are not ranked: they compute something else."""
    by_table = {}
    for r in rows:
        if "ms_fwd_bwd" in r:
            site = by_table.setdefault(TABLES[r["loss"]], {}).setdefault(f"{r['loss']} {r['shape']}", {})
            if r["d_hidden_rel_diff"] <= max_rel_diff:
                site[r["config"], r["tma"]] = r["ms_fwd_bwd"]
    out = []
    for table, shapes in by_table.items():
        ranked = tune_rules.rank([dict(times=t) for t in shapes.values()])
        if not ranked:
            continue
        x, worst, (config, tma) = ranked[0]
        shipped = next(((r["config"], r["tma"]) for r in rows if r["shipped"] and r["tma"] == rl.SHIPPED_TMA
                        and TABLES[r["loss"]] == table), None)
        shipped_x = next((gx for gx, _, c in ranked if c == shipped), None)
        out.append(dict(table=table, shapes=", ".join(shapes), shipped=shipped and shipped[0] + " +tma" * shipped[1],
                        shipped_x=shipped_x, proposed=config + " +tma" * tma, proposed_x=x, proposed_worst=worst,
                        gain=shipped_x / x if shipped_x else None))
    return out


def save(stem: str, env: dict, notes: list[str], rows: list[dict]) -> str:
    best, proposed = winners(rows), proposals(rows)
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731

    def md(items, cols):
        return ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|",
                *("| " + " | ".join(fmt(b[c]) for c in cols) + " |" for b in items)]

    table = "\n".join([f"# Loss GEMM tile tuning on {env['device']}, commit {env['commit']}", "",
                       ", ".join(f"{k}={v}" for k, v in env.items()), "", *notes, "",
                       *md(best, ["loss", "shape", "tma", "best", "best_ms_fwd", "best_ms_fwd_bwd",
                                  "best_d_hidden_rel_diff", "shipped", "shipped_ms_fwd_bwd", "speedup"]), "",
                       "## Proposed tiles (x: geometric mean over the shapes of fwd+bwd time / the shape's fastest)",
                       "", *md(proposed, ["table", "shapes", "shipped", "shipped_x", "proposed", "proposed_x",
                                          "proposed_worst", "gain"])]) + "\n"
    write_tables(stem, dict(environment=env, notes=notes, winners=best, proposals=proposed, rows=rows), table)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120, help="seconds for the whole run")
    ap.add_argument("--threads", type=int, default=max(2, (os.cpu_count() or 4) - 4), help="compile threads")
    ap.add_argument("--losses", nargs="*", default=["lm", "patch", "infonce"], choices=["lm", "patch", "infonce"])
    ap.add_argument("--stem", default=None, help="output STEM.json and STEM.md (default bench/results/<device>-<date>"
                                                 "-tune-losses)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_losses times GPU kernels: it needs a CUDA device", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    env = environment("cuda")
    device = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = args.stem or os.path.join(ROOT, "bench", "results",
                                     f"{device}-{datetime.date.today().isoformat()}-tune-losses")
    groups = []
    for loss, shape in SHAPES:
        if loss in args.losses:
            for tma in (False, True):
                ship = shipped(loss, tma)
                cands = CANDIDATES["infonce" if loss == "infonce" else "gemm"]
                groups.append(dict(loss=loss, shape=shape, tma=tma, shipped=ship,
                                   candidates=[ship, *(c for c in cands if c != ship)]))
    t, notes = time.monotonic(), []
    try:
        precompile(groups, args.threads)
    except Exception as e:  # noqa: BLE001 - the timing still runs, compiling as it goes
        notes.append(f"- precompile failed ({type(e).__name__}: {str(e)[:200]}): candidates compiled when first timed")
    print(f"[tune-losses] compiled {sum(len(g['candidates']) for g in groups)} candidates' kernels in "
          f"{time.monotonic() - t:.1f} s", flush=True)
    rows, last = [], 0.0
    for g in groups:
        where = f"{g['loss']} {'x'.join(map(str, g['shape']))} tma={g['tma']}"
        if time.monotonic() + last > deadline:
            notes.append(f"- {where}: not reached (budget {args.budget:.0f} s)")
            continue
        t = time.monotonic()
        rows += time_group(g)
        torch.cuda.empty_cache()
        last = time.monotonic() - t
        print(f"[tune-losses] {where}: {len(g['candidates'])} candidates in {last:.1f} s", flush=True)
        save(stem, env, notes, rows)
    print(save(stem, env, notes, rows))
    print(f"wrote {stem}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
