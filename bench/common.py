"""Shared benchmark plumbing: timing, peak memory, environment stamp, table and JSON output.

GPU code is timed with `triton.testing.do_bench` (CUDA events, warm-up, median of many
repeats); CPU code with wall-clock over several repeats, median reported.
"""

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import time

import torch


@contextlib.contextmanager
def with_env(values: dict):
    """Environment variables set for the block (None: unset), restored after: a provider's knobs
    (MOCA_TMA, ...) must hold over its backward too, which launches kernels outside its forward."""
    saved = {k: os.environ.get(k) for k in values}

    def put(items):
        for k, v in items:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    put(values.items())
    try:
        yield
    finally:
        put(saved.items())


def missing_peer(name: str, err: ImportError):
    """Stand-in provider for a peer this machine lacks: calling it raises, so the table carries a row that says
    the peer was not installed rather than no row (a missing peer must not read as one we beat)."""

    def fail(*args, **kwargs):
        raise ImportError(f"{name} not installed ({err})")

    fail.missing = True
    return fail


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall time of `fn()` in milliseconds. CUDA: one untimed call first (a first call compiles
    Triton kernels, which must not decide how the provider is timed), then a probe: under half a second,
    `do_bench` (CUDA events, L2 flushed, at least 5 timed runs: its default 100 ms would give a 50 ms
    kernel one); longer (a whole training step), `repeats` synchronised wall-clock runs instead."""
    if device == "cuda":
        import triton.testing

        fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        probe_ms = (time.perf_counter() - t0) * 1e3
        if probe_ms < 500:
            return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, 5 * probe_ms), return_mode="median"))
        warmup = max(0, warmup - 2)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn, device: str) -> float | None:
    """Peak device memory of one `fn()` call above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": commit or "unknown",
        "threads": torch.get_num_threads(),
    }


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def write_tables(stem: str, payload: dict, table: str) -> None:
    """STEM.json (payload) and STEM.md (table), copied to $OUT when set (the device machine's way back)."""
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    if os.environ.get("OUT"):
        for path in (stem + ".json", stem + ".md"):
            shutil.copy(path, os.environ["OUT"])
