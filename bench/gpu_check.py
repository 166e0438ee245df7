"""`make gpu-check`: everything only a GPU shows, in one command, on one H100/H200 in at most ~9 minutes.

1. setup: the wheels carried in .whl/ (`bench/gpu_wheels.sh` fetches them on a machine with a package
   index) are installed to /tmp/moca-site and put on PYTHONPATH; moca._C is built in place.
2. at once, since none of them times anything: the GPU tests (`pytest -m gpu`, in parallel processes), the
   embedded pipeline on CUDA (CPT, then CL with its before/after precision@1 table, then `python -m moca.embed`)
   and, niced on the spare cores, the sm_90 compile gate (bench/compile_gate.py) under this machine's Triton and
   ptxas. The gate binds and keys each kernel as a launch does, and every step runs with the same
   Triton cache settings, so the benchmarks' first launches load what it compiled instead of compiling
   within their caps.
3. every sub-benchmark of bench/throughput.py at full shapes, one at a time, each under its own cap, in
   PRIORITY order (the kernels of the open issues first; the deadline cuts the tail), and among them
   the tile tunings: "tune" (bench/tune_attention.py, every attention tile candidate timed on the
   benchmark's shapes: its winners are what kernels/tuned.py's sm90 rules are written from),
   "attention_tuned" (the attention benchmark again, under the rules that tuning chose: the tuned table
   against the peers in the same run) and "tune_losses" (bench/tune_losses.py: the loss GEMMs' tiles).
   `make gpu-tune` runs these three alone (--only-bench: no setup, tests, pipeline or gate).
Every step runs under a cap and a global deadline, so the command always ends with a report: a step out of
time is reported as such, never hangs the rest. Writes bench/results/<device>-<date>.json and .md, and the
gate's rows as <device>-<date>-compile-gate.json (all also copied, with the full log, to $OUT when set: the
device tool brings back what is there) and prints a short summary last.

    python3 bench/gpu_check.py [--deadline 540] [--skip-tests | --only-bench] [--bench NAME ...]
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "/tmp/moca-site"
# seconds; what each step may take at most (measured cost on an H200 is well below each)
CAPS = {"setup": 90, "tests": 240, "pipeline": 240, "gate": 240, "attention": 130, "recon_loss": 140, "infonce": 90,
        "tune": 210, "attention_tuned": 130, "tune_losses": 150, "embed": 90, "cpt": 45, "cl": 90, "serve": 75}
# Benchmarks in this order, so that the deadline cuts the least wanted: the open kernel issues' first.
PRIORITY = ["attention", "recon_loss", "infonce", "tune", "attention_tuned", "tune_losses", "embed", "cl", "cpt",
            "serve"]
# the tuning steps: name -> (script, suffix of its output files' stem); `tune` gives its --budget and --stem
TUNERS = {"tune": ("bench/tune_attention.py", "tune-attention"), "tune_losses": ("bench/tune_losses.py", "tune-losses")}
LOG_LOCK = threading.Lock()


class Run:
    """The log and the deadline shared by every step."""

    def __init__(self, deadline_s: float, log_path: str):
        self.t0, self.deadline = time.monotonic(), time.monotonic() + deadline_s
        self.log = open(log_path, "w")
        # TRITON_DEFAULT_FP_FUSION is in Triton's cache key when set: set alike for every step (the gate sets
        # it), so that a kernel compiled by one step is a cache hit for the others. Its value is the default.
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")

    def say(self, msg: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.t0:6.1f}s] {msg}"
        with LOG_LOCK:
            print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def sh(self, name: str, cmd: list[str], cap: float) -> dict:
        """Run cmd under min(cap, time left); its output goes to the log -> {status, seconds, tail}."""
        left = self.deadline - time.monotonic()
        limit = min(cap, left)
        if left < min(cap, 10):
            self.say(f"{name}: skipped, out of time")
            return {"status": "skipped (out of time)", "seconds": 0.0, "tail": ""}
        self.say(f"{name}: {' '.join(cmd)} (cap {limit:.0f} s)")
        t = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=limit)
            out, status = p.stdout, "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"timed out after {limit:.0f} s"
        secs = time.monotonic() - t
        with LOG_LOCK:
            self.log.write(f"----- {name} output -----\n{out}\n----- end {name} ({status}, {secs:.1f} s) -----\n")
            self.log.flush()
        self.say(f"{name}: {status} in {secs:.1f} s")
        return {"status": status, "seconds": round(secs, 1), "tail": out[-3000:]}


def setup(run: Run) -> dict:
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels:
        res = run.sh("wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                "--no-cache-dir", "--upgrade", "--target", SITE, *wheels], CAPS["setup"])
        if res["status"] != "ok":
            return res
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE, run.env.get("PYTHONPATH")]))
    run.env["MOCA_SKIP_CUDA"] = "1"  # the C++ host ops only: csrc/ has no CUDA sources yet
    return run.sh("build", [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                  CAPS["setup"])


def pipeline(run: Run, result: dict) -> None:
    """The embedded default on CUDA: CPT, then CL from it (its eval table), then the embed CLI."""
    for stage in ("cpt", "cl"):
        shutil.rmtree(os.path.join(ROOT, "runs", f"{stage}-tiny"), ignore_errors=True)
    t = time.monotonic()
    steps = {}
    for name, cmd in (("cpt", [sys.executable, "-m", "engine.train", "cpt", "--no-progress"]),
                      ("cl", [sys.executable, "-m", "engine.train", "cl", "--no-progress"]),
                      ("embed_cli", [sys.executable, "-m", "moca.embed"])):
        steps[name] = run.sh(f"pipeline {name}", cmd, CAPS["pipeline"] - (time.monotonic() - t))
        if steps[name]["status"] != "ok":
            break
    eval_path = os.path.join(ROOT, "runs", "cl-tiny", "eval.json")
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            steps["eval"] = json.load(f)
    result.update(steps)


def tests(run: Run, result: dict) -> None:
    res = run.sh("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-n", "4", "--timeout", "200",
                           "-p", "no:cacheprovider", "tests"], CAPS["tests"])
    m = re.findall(r"(\d+) (passed|failed|skipped|error|errors)", res["tail"].splitlines()[-1] if res["tail"] else "")
    res["counts"] = {k: int(n) for n, k in m}
    result.update(res)


def gate(run: Run, result: dict, path: str, stop: threading.Event) -> None:
    """The sm_90 compile gate on this machine, niced on the cores the tests leave, its rows to path. It stops
    when `stop` is set (the tests and the pipeline are over: the benchmarks must have the CPU to themselves);
    what it compiled by then stays in Triton's cache."""
    jobs = max(2, (os.cpu_count() or 8) - 6)
    cmd = ["nice", "-n", "10", sys.executable, "bench/compile_gate.py", "--jobs", str(jobs), "--json", path]
    run.say(f"gate: {' '.join(cmd)} (until the tests end, cap {CAPS['gate']} s)")
    t = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run.env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # its own process group: the compile workers stop with it
        while proc.poll() is None and not stop.wait(1.0) and time.monotonic() - t < CAPS["gate"]:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            status = "stopped when the tests ended (what it compiled is cached)"
        else:
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        out.seek(0)
        text = "\n".join(line for line in out.read().splitlines() if not line.startswith("|"))  # rows: in path
    secs = time.monotonic() - t
    with LOG_LOCK:
        run.log.write(f"----- gate output (table rows left out) -----\n{text}\n----- end gate ({status}) -----\n")
    run.say(f"gate: {status} in {secs:.1f} s")
    m = re.search(r"(\d+) compiles, (\d+) failures", text)
    result.update(status=status, seconds=round(secs, 1), compiles=int(m[1]) if m else None,
                  failures=int(m[2]) if m else None, tail=text[-3000:])


def tune(run: Run, name: str, stem: str) -> dict:
    """Tuning step `name` (TUNERS) within its cap (its budget a little under, so that it writes what it timed);
    its winners become the step's rows."""
    budget = min(CAPS[name], run.deadline - time.monotonic()) - 15
    res = run.sh(name, [sys.executable, TUNERS[name][0], "--budget", f"{budget:.0f}", "--stem", stem], CAPS[name])
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            payload = json.load(f)
        res["rows"], res["summary"] = payload["winners"], {"notes": " ".join(payload["notes"])}
        if "overrides" in payload:  # the attention tuning's chosen rules, which attention_tuned runs under
            res["summary"]["rule overrides"] = len(payload["overrides"])
    return res


def benchmarks(run: Run, names: list[str], tmp: str, stem: str) -> dict:
    """Each step of `names`: a tuning (TUNERS), `attention_tuned` (the attention benchmark under the rules the
    attention tuning of this run chose) or a sub-benchmark of bench/throughput.py."""
    out = {}
    for name in names:
        if name in TUNERS:
            out[name] = tune(run, name, f"{stem}-{TUNERS[name][1]}")
            continue
        path = os.path.join(tmp, f"bench-{name}.json")
        bench, extra = name, []
        if name == "attention_tuned":
            rules = f"{stem}-{TUNERS['tune'][1]}.json"
            if not os.path.exists(rules):
                out[name] = {"status": "skipped (no attention tuning in this run)", "seconds": 0.0, "tail": ""}
                continue
            bench, extra = "attention", ["--rules", rules]
        res = run.sh(f"bench {name}", [sys.executable, "bench/throughput.py", bench, "--json", path, *extra],
                     CAPS.get(name, 60))
        if os.path.exists(path):
            with open(path) as f:
                payload = json.load(f)
            res["rows"], res["summary"] = payload["results"].get(bench, []), payload.get("summary", {})
        out[name] = res
    return out


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# gpu-check on {env.get('device')}, {report['date']}, commit {env.get('commit')}", "",
             ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    t = report["tests"]
    if t:
        lines += [f"GPU tests: {t.get('status')}, {t.get('counts')} in {t.get('seconds')} s", ""]
    g = report["gate"]
    if g:
        lines += [f"sm_90 compile gate here: {g.get('status')}, {g.get('compiles')} compiles, {g.get('failures')} "
                  f"failures in {g.get('seconds')} s (rows: {os.path.basename(report['gate_rows'])})", ""]
    p = report["pipeline"]
    if p:
        lines += ["Embedded pipeline on CUDA: " + ", ".join(f"{k} {p[k]['status']} ({p[k]['seconds']} s)"
                                                         for k in ("cpt", "cl", "embed_cli") if k in p), ""]
    if "eval" in p:
        tasks = list(p["eval"]["after"]["tasks"])
        lines += ["| precision@1 | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
        for when, e in p["eval"].items():
            lines.append(f"| {when} | " + " | ".join(f"{e['tasks'][k]:.2f}" for k in tasks)
                         + f" | {e['mean_precision@1']:.3f} |")
        lines.append("")
    for name, b in report["benchmarks"].items():
        lines += [f"## {name}: {b['status']} ({b['seconds']} s)", ""]
        rows = b.get("rows") or []
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
            lines.append("")
        if b.get("summary"):
            lines += ["summary: " + ", ".join(f"{k}={_fmt(v)}" for k, v in b["summary"].items()), ""]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=540, help="seconds for the whole check")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--only-bench", action="store_true",
                    help="the benchmark steps alone: no wheels, build, tests, pipeline or gate")
    ap.add_argument("--bench", nargs="*", default=None, help="sub-benchmarks (default: all)")
    args = ap.parse_args(argv)

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch
    from common import environment
    from throughput import available

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "-").lower()
    date = datetime.date.today().isoformat()
    results_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(results_dir, exist_ok=True)
    stem = os.path.join(results_dir, f"{device}-{date}")
    run = Run(args.deadline, stem + ".log")
    report = {"date": date, "environment": environment("cuda"), "tests": {}, "pipeline": {}, "gate": {},
              "gate_rows": stem + "-compile-gate.json", "benchmarks": {}}
    report["setup"] = {"status": "ok"} if args.only_bench else setup(run)
    if report["setup"]["status"] == "ok" and not args.only_bench:
        workers = [threading.Thread(target=pipeline, args=(run, report["pipeline"]))]
        if not args.skip_tests:
            workers.append(threading.Thread(target=tests, args=(run, report["tests"])))
        stop_gate = threading.Event()
        gate_worker = threading.Thread(target=gate, args=(run, report["gate"], report["gate_rows"], stop_gate))
        for w in (*workers, gate_worker):
            w.start()
        for w in workers:
            w.join()
        stop_gate.set()
        gate_worker.join()
    if report["setup"]["status"] == "ok":
        names = args.bench or sorted([*available(), *TUNERS, "attention_tuned"],
                                     key=lambda n: PRIORITY.index(n) if n in PRIORITY else len(PRIORITY))
        report["benchmarks"] = benchmarks(run, names, os.path.dirname(stem), stem)
    for b in report["benchmarks"].values():
        if b["status"] == "ok":  # the rows say it all; the log keeps the output
            del b["tail"]
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    run.log.close()
    if os.environ.get("OUT"):
        for path in (stem + ".json", stem + ".md", stem + ".log", report["gate_rows"]):
            if os.path.exists(path):
                shutil.copy(path, os.environ["OUT"])

    print("\n===== gpu-check summary =====")
    t = report["tests"]
    print(f"tests: {t.get('status', 'not run')} {t.get('counts', '')}")
    g = report["gate"]
    print(f"compile gate: {g.get('status', 'not run')} {g.get('compiles')} compiles, {g.get('failures')} failures")
    p = report["pipeline"]
    if "eval" in p:
        print(f"embedded CL mean precision@1: before {p['eval']['before']['mean_precision@1']:.3f}, "
              f"after {p['eval']['after']['mean_precision@1']:.3f}")
    for k in ("cpt", "cl", "embed_cli"):
        if k in p:
            print(f"pipeline {k}: {p[k]['status']} ({p[k]['seconds']} s)")
    for name, b in report["benchmarks"].items():
        print(f"bench {name}: {b['status']} ({b['seconds']} s) {b.get('summary', '')}")
    print(f"wrote {stem}.json, .md, .log")
    ok = t.get("status", "ok") == "ok" and (args.only_bench or all(p.get(k, {}).get("status") == "ok"
                                                                   for k in ("cpt", "cl", "embed_cli")))
    return 0 if ok and all(b["status"] == "ok" for b in report["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
