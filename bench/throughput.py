"""The benchmark entry point: `python bench/throughput.py [BENCH ...] [--device] [--quick] [--json] [--rules]`.

Each sub-benchmark is a module `bench/bench_<name>.py` with `run(device, quick) -> list[dict]`
(one row per provider and shape, ours and the peers side by side) and, optionally,
`summary(rows) -> dict`. With no BENCH every sub-benchmark that exists runs. `--rules STEM.json` runs them
with kernels/tuned.py's attention rules as an attention tuning proposes (bench/tune_attention.py's output;
bench/tune_rules.py), to measure a tuned table against the peers before it is written into tuned.py.
"""

import argparse
import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import environment, print_table, write_json  # noqa: E402
from tune_rules import apply, load_rules  # noqa: E402

from kernels import tuned  # noqa: E402

ORDER = ["embed", "serve", "attention", "recon_loss", "infonce", "cpt", "cl"]


def available() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    found = {f[len("bench_") : -3] for f in os.listdir(here) if f.startswith("bench_") and f.endswith(".py")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def main(argv=None) -> dict:
    names = available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", nargs="*", help=f"sub-benchmarks to run (default: all of {names})")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--json", default=None, help="write the rows and summary here (default bench/results/latest-<device>.json)")
    p.add_argument("--rules", default=None, help="an attention tuning's STEM.json: its chosen overrides of "
                                                 "kernels/tuned.py's rules hold for this run")
    args = p.parse_args(argv)
    unknown = [b for b in args.bench if b not in names]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; available: {names}")

    env = environment(args.device)
    if args.rules:
        try:
            arch, chosen = load_rules(args.rules)
            tuned._RULES[arch] = apply(tuned._RULES[arch], chosen)
        except (OSError, KeyError, ValueError) as e:
            p.error(f"--rules {args.rules}: {type(e).__name__}: {e}")
        env["rules"] = f"{os.path.basename(args.rules)} ({len(chosen)} overrides)"
    print("# " + ", ".join(f"{k}={v}" for k, v in env.items()))
    out = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"latest-{args.device}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    payload = {"environment": env, "quick": args.quick, "results": {}, "summary": {}}
    for name in args.bench or names:
        mod = importlib.import_module(f"bench_{name}")
        rows = mod.run(args.device, args.quick)
        print_table(name, rows)
        payload["results"][name] = rows
        if hasattr(mod, "summary"):
            payload["summary"].update(mod.summary(rows))
        write_json(out, payload)  # after each sub-benchmark: a later one that dies keeps the earlier rows
    if payload["summary"]:
        print_table("summary", [payload["summary"]])
    print(f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
