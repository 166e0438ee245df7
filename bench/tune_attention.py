"""Attention tile tuning (#14): every candidate config of each attention kernel, timed on one H100/H200 on
the attention benchmark's shapes, in each variant the shipped table can choose (plain, TMA, fused dq).

This is the MOCA_AUTOTUNE=1 path made affordable. Triton's autotuner compiles its candidates one after
another on first use of a key (15-18 per kernel and tiling: minutes per shape), so a pool of processes
compiles them for sm_90 into Triton's cache first. Each launch is captured from the launchers themselves
(`capture`: the shape's token count, strides and tilings, on CPU tensors) and given each candidate's
tiles by `kernels.attention._launch_args`, so it is keyed as the autotuner's launch will be; the
autotuner then only times them (triton.testing.do_bench: median over 40 ms of runs). Compiles run
ahead, in the order of the shapes, while the GPU times the shapes already compiled; a shape that would
start past the budget is reported as not reached. The fused dq variant times dk/dv alone (its forward is
the plain one), and its times include the autotuner's restore of the fp32 dq buffer (a clone and a copy
per run, the same for every candidate): compare variants end to end in `bench/throughput.py attention`.

Writes every candidate's time with its registers, shared memory and spills (a candidate over sm_90's 227 KiB
of shared memory cannot launch: the autotuner times it as inf), and per (shape, variant, kernel, tiling)
the winner beside the shipped config, and per kernels/tuned.py rule the candidate fastest over all the
launches that rule decides (bench/tune_rules.py), to bench/results/<device>-<date>-tune-attention.{json,md}
(copied to $OUT when set): what kernels/tuned.py's sm90 rules are written from.

    python bench/tune_attention.py [--budget 240] [--jobs 12] [--shapes vision-window uniform-4096 ...]
        [--variants plain tma fused_dq]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_gate  # noqa: E402  (first: it sets TRITON_INTERPRET=0 before Triton is imported)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, TimeoutError  # noqa: E402

import torch  # noqa: E402
import triton.testing  # noqa: E402
from bench_attention import shapes  # noqa: E402
from common import environment, with_env, write_tables  # noqa: E402
import tune_rules  # noqa: E402

from kernels import attention, tuned  # noqa: E402

# Default order: the widest gaps first (vision windows 6x behind, then the D80 and mixed batches).
ORDER = ["vision-window", "uniform-4096", "mmeb-mixed-d80", "mmeb-mixed", "cl-texts", "vision-full"]
# variant -> (MOCA_TMA, MOCA_FUSED_DQ, kernels it tunes)
VARIANTS = {"plain": ("0", "0", ("fwd", "dkdv", "dq")), "tma": ("1", "0", ("fwd", "dkdv", "dq")),
            "fused_dq": ("0", "1", ("dkdv",))}
DTYPE = torch.bfloat16
_CAPTURED = {}  # (shape, variant) -> launches, per process


def _shape(name: str) -> dict:
    return next(s for s in shapes(quick=False) if s["name"] == name)


@contextlib.contextmanager
def _recording(launches: list):
    """The launchers record each kernel launch (name, ptrs, sched, rest, meta, cfg, streamed) instead of
    running it, and pick configs as on an sm_90 GPU; the backward's preprocess kernel does not run."""

    class Skip:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = attention._run, attention._arch, attention._attn_bwd_preprocess
    attention._run = lambda name, grid, *rest: launches.append((name, *rest))
    attention._arch = lambda index: compile_gate.ARCH
    attention._attn_bwd_preprocess = Skip()
    try:
        yield
    finally:
        attention._run, attention._arch, attention._attn_bwd_preprocess = saved


def capture(shape: str, variant: str) -> list[tuple]:
    """The attention launches of one forward and backward of `shape` (a bench_attention shape name) in
    bf16 under `variant`, as the launchers make them (no GPU needed): [(kernel, ptrs, sched, rest, meta,
    cfg, streamed)], cfg the shipped one. Cached per process."""
    if (shape, variant) not in _CAPTURED:
        s = _shape(shape)
        lens, T = s["lens"], sum(s["lens"])
        q, o, do = (torch.empty(T, s["hq"], s["d"], dtype=DTYPE) for _ in range(3))
        k, v = (torch.empty(T, s["hkv"], s["d"], dtype=DTYPE) for _ in range(2))
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        tma, fused, _ = VARIANTS[variant]
        launches = []
        with with_env({"MOCA_AUTOTUNE": None, "MOCA_TMA": tma, "MOCA_FUSED_DQ": fused, "MOCA_WS": "0"}), \
                _recording(launches):
            _, lse = attention._attn_fwd_launch(q, k, v, cu, max(lens), s["d"] ** -0.5)
            attention._attn_bwd_launch(do, q, k, v, o, lse, cu, max(lens), s["d"] ** -0.5)
        # the launchers' outputs (an fp32 dq of up to 330 MB) are not kept: the binder reads a pointer's dtype
        # and 16-byte alignment only. The streamed inputs stay: their shape and strides make the descriptors.
        _CAPTURED[shape, variant] = [(name, _stand_in(ptrs), _stand_in((sched,))[0], *rest)
                                     for name, ptrs, sched, *rest in launches]
    return _CAPTURED[shape, variant]


def _stand_in(xs: tuple) -> tuple:
    """Each aligned tensor in xs replaced by a 16-element one of its dtype (same binding, no memory)."""
    return tuple(torch.empty(16, dtype=x.dtype) if isinstance(x, torch.Tensor) and x.data_ptr() % 16 == 0 else x
                 for x in xs)


def launch(shape: str, variant: str, index: int, cfg: tuple) -> tuple:
    """(jit fn, args, kwargs) of captured launch `index` with candidate cfg (BLOCK_M, BLOCK_N, warps, stages)."""
    name, ptrs, sched, rest, meta, shipped, streamed = capture(shape, variant)[index]
    bm, bn, w, s = cfg
    tile = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, TMA=shipped["TMA"])
    with with_env({"MOCA_TMA": VARIANTS[variant][0]}):
        args, kwargs = attention._launch_args(name, ptrs, sched, rest, meta, tile, streamed)
    return attention._KERNELS[name], args, kwargs


def _compile(job: tuple) -> dict:
    return compile_gate.compile_launch(*launch(*job))


def tiling(meta: dict) -> str:
    return "packed" if meta["PACKED"] else "per-segment"


def groups(shape_names: list[str], variants: list[str]) -> list[dict]:
    """Per (shape, variant): the launches it tunes, each with its candidates, its shipped config and the
    kernels/tuned.py rule that decides it (index and conditions in the kernel's sm90 list)."""
    out = []
    for shape in shape_names:
        bucket = attention.seq_bucket(max(_shape(shape)["lens"]))
        for variant in variants:
            tunes = VARIANTS[variant][2]
            items = []
            for i, (name, *_, meta, cfg, streamed) in enumerate(capture(shape, variant)):
                if name not in tunes or (variant == "tma" and streamed is None):  # TMA impossible: plain's
                    continue
                shipped = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
                index, conditions, _ = tuned.rule(compile_gate.ARCH, name, meta["HEAD_DIM"], DTYPE, bucket,
                                                  meta["PACKED"], meta.get("FUSED_DQ", False))
                items.append(dict(index=i, kernel=name, tiling=tiling(meta), shipped=shipped, meta=meta,
                                  candidates=attention.candidates(name), rule=index, conditions=conditions,
                                  seq_bucket=bucket, shipped_tma=cfg["TMA"], tma_possible=streamed is not None))
            if items:
                out.append(dict(shape=shape, variant=variant, items=items))
    return out


def _timing(kernel_call, quantiles):
    """The autotuner's timing of one candidate: median (and quantiles) over 40 ms of runs after 10 ms."""
    return triton.testing.do_bench(kernel_call, warmup=10, rep=40, quantiles=quantiles)


def time_group(group: dict) -> list[dict]:
    """Run the shape forward and backward on the GPU under MOCA_AUTOTUNE=1 (the variant's kernels only),
    then read each autotuner's timings -> rows {kernel, tiling, config, ms}."""
    s = _shape(group["shape"])
    lens = s["lens"]
    T = sum(lens)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(T, h, s["d"], generator=gen).to("cuda", DTYPE).requires_grad_()
               for h in (s["hq"], s["hkv"], s["hkv"]))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    tma, fused, tunes = VARIANTS[group["variant"]]
    attention._autotuner.cache_clear()
    tuners = {}
    for item in group["items"]:
        tiles = "packed" if item["tiling"] == "packed" else ("long" if attention.path(max(lens), T, len(lens)) ==
                                                             "mixed" else "segments")
        # the same (cached) autotuner the launch will use, with a shorter timing than Triton's default
        # (25 ms of warm-up, 100 ms of runs): some 50 candidates a shape
        tuners[item["kernel"], item["tiling"]] = tuner = attention._autotuner(
            item["kernel"], tiles, item["meta"].get("FUSED_DQ", False))
        tuner._do_bench = _timing
    with with_env({"MOCA_TMA": tma, "MOCA_FUSED_DQ": fused, "MOCA_AUTOTUNE": "1" if "fwd" in tunes else None}):
        o = attention.varlen_attention(q, k, v, cu, max(lens), backend="triton")
    with with_env({"MOCA_TMA": tma, "MOCA_FUSED_DQ": fused, "MOCA_AUTOTUNE": "1"}):
        torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    torch.cuda.synchronize()
    rows = []
    for (kernel, tiling), tuner in tuners.items():
        for config, times in getattr(tuner, "configs_timings", {}).items():
            cfg = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
            rows.append(dict(kernel=kernel, tiling=tiling, config=tune_rules.label(cfg),
                             ms=float(times[0] if isinstance(times, (list, tuple)) else times)))
    attention._autotuner.cache_clear()
    return rows


def winners(rows: list[dict], plan: list[dict]) -> list[dict]:
    """Per (shape, variant, kernel, tiling): the fastest candidate beside the shipped config."""
    out = []
    for group in plan:
        for item in group["items"]:
            mine = [r for r in rows if (r["shape"], r["variant"], r["kernel"], r["tiling"]) ==
                    (group["shape"], group["variant"], item["kernel"], item["tiling"]) and r.get("ms") is not None]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["ms"])
            shipped = next((r for r in mine if r["config"] == tune_rules.label(item["shipped"])), None)
            out.append(dict(shape=group["shape"], variant=group["variant"], kernel=item["kernel"],
                            tiling=item["tiling"], head_dim=item["meta"]["HEAD_DIM"], group=item["meta"]["GROUP"],
                            best=best["config"], best_ms=best["ms"], best_local=best.get("local"),
                            shipped=tune_rules.label(item["shipped"]), shipped_ms=shipped["ms"] if shipped else None,
                            speedup=shipped["ms"] / best["ms"] if shipped else None))
    return out


def markdown(env: dict, best: list[dict], notes: list[str]) -> str:
    lines = [f"# Attention tile tuning on {env['device']}, commit {env['commit']}", "",
             ", ".join(f"{k}={v}" for k, v in env.items()), "", *notes, "",
             "| shape | variant | kernel | tiling | D | G | best | ms | spills (local B) | shipped | ms "
             "| shipped / best |",
             "|---" * 12 + "|"]
    for b in best:
        fmt = lambda x: "" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))  # noqa: E731
        lines.append("| " + " | ".join(fmt(b[k]) for k in ("shape", "variant", "kernel", "tiling", "head_dim", "group",
                                                             "best", "best_ms", "best_local", "shipped", "shipped_ms",
                                                             "speedup")) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=240, help="seconds for the whole run")
    ap.add_argument("--jobs", type=int, default=max(2, (os.cpu_count() or 4) - 4), help="compile processes")
    ap.add_argument("--shapes", nargs="*", default=ORDER, choices=ORDER)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--stem", default=None, help="output STEM.json and STEM.md (default bench/results/<device>-<date>"
                                                 "-tune-attention)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("tune_attention times sm_90 kernels: it needs an H100/H200", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    env = environment("cuda")
    device = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    stem = args.stem or os.path.join(compile_gate.ROOT, "bench", "results",
                                     f"{device}-{datetime.date.today().isoformat()}-tune-attention")
    plan = groups(args.shapes, args.variants)
    rows, notes, last = [], [], 0.0
    # spawned, not forked (this process holds a CUDA context), and niced: the workers only compile, and the
    # timing of the shortest kernels must not wait for a CPU
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=os.nice, initargs=(10,)) as pool:
        # every compile submitted now, in plan order (once per cache key: shapes share kernels), so the pool
        # runs ahead of the timing below
        submitted = {}

        def submit(job):
            key = compile_gate.launch_key(*launch(*job))
            if key not in submitted:
                submitted[key] = pool.submit(_compile, job)
            return submitted[key]

        futures = [[(item, cfg, submit((g["shape"], g["variant"], item["index"], cfg)))
                    for item in g["items"] for cfg in item["candidates"]] for g in plan]
        print(f"[tune] {len(submitted)} compiles for {sum(map(len, futures))} candidates", flush=True)
        for group, jobs in zip(plan, futures):
            where = f"{group['shape']} {group['variant']}"
            if time.monotonic() + last > deadline:  # the last shape's timing as the estimate of this one's
                notes.append(f"- {where}: not reached (budget {args.budget:.0f} s)")
                continue
            try:
                compiled = {(item["index"], tune_rules.label(cfg)):
                            fut.result(timeout=max(1.0, deadline - time.monotonic())) for item, cfg, fut in jobs}
            except TimeoutError:
                notes.append(f"- {where}: its compiles did not finish within the budget")
                continue
            t = time.monotonic()
            try:
                timed = time_group(group)
            except Exception as e:  # noqa: BLE001 - one shape's failure is a note; the others still run
                notes.append(f"- {where}: failed, {type(e).__name__}: {str(e)[:200]}")
                continue
            by_kernel = {(it["kernel"], it["tiling"]): it["index"] for it in group["items"]}
            for r in timed:
                res = compiled.get((by_kernel.get((r["kernel"], r["tiling"])), r["config"]), {})
                rows.append(dict(shape=group["shape"], variant=group["variant"], **r, regs=res.get("regs"),
                                 shared=res.get("shared"), local=res.get("local"), stack=res.get("stack"),
                                 error=res.get("error")))
            last = time.monotonic() - t
            print(f"[tune] {where}: {len(timed)} candidates timed in {last:.1f} s", flush=True)
            save(stem, env, notes, rows, plan)  # after each shape: a run stopped from outside keeps what it timed
        for fut in (f for jobs in futures for *_, f in jobs):
            fut.cancel()
    print(save(stem, env, notes, rows, plan))
    print(f"wrote {stem}.json, .md")
    return 0


def save(stem: str, env: dict, notes: list[str], rows: list[dict], plan: list[dict]) -> str:
    """Write STEM.json (every timed candidate, the winners, the proposed rules and the overrides chosen from
    them, which `bench/throughput.py --rules STEM.json` applies) and STEM.md (all but the candidates), also to
    $OUT when set -> the markdown."""
    best = winners(rows, plan)
    proposals = tune_rules.propose(tune_rules.sites(rows, plan))
    chosen = tune_rules.overrides(proposals)
    table = markdown(env, best, notes) + "\n" + "\n".join(tune_rules.markdown(proposals, chosen)) + "\n"
    write_tables(stem, dict(environment=env, notes=notes, arch=compile_gate.ARCH, winners=best, proposals=proposals,
                            overrides=chosen, rows=rows), table)
    return table


if __name__ == "__main__":
    sys.exit(main())
