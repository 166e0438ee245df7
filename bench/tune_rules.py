"""From attention tuning times to kernels/tuned.py's sm90 rules (#14): which candidate each rule should ship.

A rule of kernels/tuned.py decides every launch whose conditions it is the first to hold, so its entry
has to serve all of them, and bench/tune_attention.py times candidates per site: one kernel over one
(shape, tiling) of the attention benchmark. `sites` gathers the tuner's rows per site with the rule that
decides it; `propose` ranks every candidate (tiles and TMA flag) of a rule by the geometric mean, over
the rule's sites, of its time over the site's fastest (1.0: fastest at every site), the worst site
beside it, and the same per head dim and per seq bucket where a rule decides several (a rule split off
by `head_dim` or `max_seq` pays where their winners differ). A TMA candidate at a site whose tensors TMA
cannot view takes the plain time (the launchers run it plain there); a candidate without a time at one
of the rule's sites (over shared memory, or its variant not timed) is not ranked. `overrides` keeps the
proposals worth shipping, and `apply` puts them into a rules table: `bench/throughput.py --rules` runs
the benchmarks under it, so one GPU call can tune and measure the tuned table against the peers, and
`python bench/tune_rules.py STEM.json` prints the table with them as Python for kernels/tuned.py. No GPU.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import tuned  # noqa: E402


def label(cfg, tma: bool = False) -> str:
    """(BLOCK_M, BLOCK_N, warps, stages) -> "128x64 w8 s3", with " +tma" when tma."""
    return "{}x{} w{} s{}".format(*cfg[:4]) + (" +tma" if tma else "")


def sites(rows: list[dict], plan: list[dict]) -> list[dict]:
    """Per (kernel, rule, shape, tiling) of the tuner's plan: {kernel, rule, conditions, shape, tiling, head_dim,
    seq_bucket, tma_possible, shipped: (config, tma), times: {(config, tma): ms}} with only finite times. plan
    items carry the rule that decides their launch (rule, conditions, shipped, shipped_tma), its seq bucket and
    whether TMA can view its tensors (tma_possible); rows are the tuner's {shape, variant, kernel, tiling,
    config, ms}."""
    out = {}
    for group in plan:
        tma = group["variant"] == "tma"
        for item in group["items"]:
            key = (item["kernel"], item["rule"], group["shape"], item["tiling"])
            site = out.setdefault(key, dict(kernel=item["kernel"], rule=item["rule"], conditions=item["conditions"],
                                            shape=group["shape"], tiling=item["tiling"],
                                            head_dim=item["meta"]["HEAD_DIM"], seq_bucket=item["seq_bucket"],
                                            tma_possible=item["tma_possible"],
                                            shipped=(label(item["shipped"]), item["shipped_tma"]), times={}))
            for r in rows:
                if ((r["shape"], r["variant"], r["kernel"], r["tiling"]) == (group["shape"], group["variant"],
                                                                              item["kernel"], item["tiling"])
                        and r.get("ms") is not None and math.isfinite(r["ms"])):
                    site["times"][r["config"], tma] = r["ms"]
    for site in out.values():
        if not site["tma_possible"]:
            for (config, tma), ms in list(site["times"].items()):
                site["times"].setdefault((config, True), ms)
    return [s for s in out.values() if s["times"]]


def rank(group: list[dict]) -> list[tuple[float, float, tuple]]:
    """[(geometric mean of ms / site's fastest, worst ratio, candidate)], best first, over the candidates timed
    at every site of `group` (sites: {times: {candidate: ms}})."""
    common = set.intersection(*(set(s["times"]) for s in group))
    ratios = {c: [s["times"][c] / min(s["times"].values()) for s in group] for c in common}
    return sorted((math.exp(sum(map(math.log, r)) / len(r)), max(r), c) for c, r in ratios.items())


def propose(site_list: list[dict]) -> list[dict]:
    """Per (kernel, rule), and per head dim and per seq bucket where the rule decides several: the
    best-ranked candidate beside the shipped one -> [{kernel, rule, conditions, split ("all", "head_dim=D" or
    "seq_bucket=S": what a rule split off before this one would decide), sites, shipped, shipped_x (its
    geometric mean; None when not timed everywhere), proposed, proposed_x, proposed_worst, gain (shipped_x /
    proposed_x), split_gain (a split's: the rule-wide proposal's geometric mean on its sites / proposed_x)}],
    in kernel then rule order."""
    by_rule = {}
    for s in site_list:
        by_rule.setdefault((s["kernel"], s["rule"]), []).append(s)
    out = []
    for (kernel, rule), group in sorted(by_rule.items()):
        subsets = [("all", group)]
        for key in ("head_dim", "seq_bucket"):
            values = sorted({s[key] for s in group})
            if len(values) > 1:
                subsets += [(f"{key}={v}", [s for s in group if s[key] == v]) for v in values]
        rule_wide = None
        for split, subset in subsets:
            ranked = rank(subset)
            if not ranked:
                continue
            x, worst, best = ranked[0]
            if split == "all":
                rule_wide = best
            shipped = subset[0]["shipped"]
            shipped_x = next((gx for gx, _, c in ranked if c == shipped), None)
            wide_x = next((gx for gx, _, c in ranked if c == rule_wide), None)
            out.append(dict(kernel=kernel, rule=rule, conditions=_conditions(subset[0]["conditions"]), split=split,
                            sites=", ".join(f"{s['shape']}/{s['tiling']}" for s in subset),
                            shipped=shipped[0] + (" +tma" if shipped[1] else ""), shipped_x=shipped_x,
                            proposed=best[0] + (" +tma" if best[1] else ""), proposed_x=x, proposed_worst=worst,
                            gain=shipped_x / x if shipped_x else None,
                            split_gain=wide_x / x if split != "all" and wide_x else None))
    return out


def overrides(proposals: list[dict], min_gain: float = 1.02) -> list[dict]:
    """The proposals worth shipping -> [{kernel, rule, head_dim (None: the rule's own entry), config (BLOCK_M,
    BLOCK_N, warps, stages, tma), shipped (the rule's entry they were timed against)}]: a rule's proposal where it
    is min_gain faster than the shipped entry (or the shipped entry was not timed everywhere), and a head-dim
    split where it is min_gain faster than the rule's proposal on that head dim's sites. Seq-bucket splits are
    left to a reader of the table."""
    out = []
    for p in proposals:
        common = dict(kernel=p["kernel"], rule=p["rule"], config=_config(p["proposed"]), shipped=_config(p["shipped"]))
        if p["split"] == "all" and p["proposed"] != p["shipped"] and (p["gain"] or math.inf) >= min_gain:
            out.append(dict(common, head_dim=None))
        elif p["split"].startswith("head_dim=") and (p["split_gain"] or 0.0) >= min_gain:
            out.append(dict(common, head_dim=int(p["split"].split("=")[1])))
    return out


def apply(rules: dict, chosen: list[dict]) -> dict:
    """kernels/tuned.py rules of one architecture {kernel: [(conditions, config)]} with `overrides` put in: a
    rule's entry replaced, a head-dim split inserted right before its rule (so it decides exactly that rule's
    launches of that head dim) -> a new dict; `rules` is not changed. Raises ValueError where a rule no longer
    ships what the tuning timed as shipped (the rules changed since)."""
    for o in chosen:
        cfg = rules[o["kernel"]][o["rule"]][1]
        if (*cfg[:4], bool(cfg[4:] and cfg[4])) != tuple(o["shipped"]):
            raise ValueError(f"{o['kernel']} rule {o['rule']} ships {cfg}, but the tuning timed {o['shipped']} there: "
                             "kernels/tuned.py changed since (tune again)")
    out = {}
    for kernel, entries in rules.items():
        new = []
        for i, (cond, cfg) in enumerate(entries):
            mine = [o for o in chosen if (o["kernel"], o["rule"]) == (kernel, i)]
            new += [(dict(cond, head_dim=o["head_dim"]), tuple(o["config"])) for o in mine if o["head_dim"] is not None]
            whole = [tuple(o["config"]) for o in mine if o["head_dim"] is None]
            new.append((cond, whole[0] if whole else cfg))
        out[kernel] = new
    return out


def _config(candidate: str) -> tuple:
    """"128x64 w8 s3 +tma" -> (128, 64, 8, 3, True)."""
    tiles, warps, stages, *tma = candidate.split()
    bm, bn = map(int, tiles.split("x"))
    return bm, bn, int(warps[1:]), int(stages[1:]), bool(tma)


def _conditions(cond: dict) -> str:
    return ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in cond.items()) or "(last rule)"


def markdown(proposals: list[dict], chosen: list[dict]) -> list[str]:
    """The proposals and the overrides chosen from them as markdown lines (headings, a table, a list)."""
    fmt = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    cols = ("kernel", "rule", "conditions", "split", "sites", "shipped", "shipped_x", "proposed", "proposed_x",
            "proposed_worst", "gain", "split_gain")
    return ["## Proposed sm90 rules (kernels/tuned.py: rule = index in the kernel's list)", "",
            "x: geometric mean over the rule's sites of time / the site's fastest; worst: the largest such ratio.",
            "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|",
            *("| " + " | ".join(fmt(p[c]) for c in cols) + " |" for p in proposals), "",
            "## Chosen (what `bench/throughput.py --rules STEM.json` applies)", "",
            *(f"- {o['kernel']} rule {o['rule']}" + (f", head_dim={o['head_dim']} split off" if o["head_dim"] else "")
              + f": {label(o['config'], o['config'][4])} (shipped {label(o['shipped'], o['shipped'][4])})"
              for o in chosen), *([] if chosen else ["- none"])]


def load_rules(path: str) -> tuple[str, list[dict]]:
    """(arch, overrides) of a tuning's STEM.json (bench/tune_attention.py writes them there)."""
    with open(path) as f:
        payload = json.load(f)
    return payload["arch"], payload["overrides"]


def source(rules: dict) -> str:
    """Rules {kernel: [(conditions, config)]} as the Python of kernels/tuned.py's table (to paste there)."""
    lines = []
    for kernel, entries in rules.items():
        lines.append(f'"{kernel}": [')
        for cond, cfg in entries:
            args = ", ".join(f"{k}={v!r}" for k, v in cond.items())
            cfg = tuple(cfg[:4]) + ((True,) if cfg[4:] and cfg[4] else ())
            lines.append(f"    (dict({args}), {cfg}),")
        lines.append("],")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python bench/tune_rules.py STEM.json: kernels/tuned.py's rules of the tuning's architecture with its
    chosen overrides put in, printed as Python for tuned.py (the reasons in its comments are the writer's)."""
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("tuning", help="an attention tuning's STEM.json (bench/tune_attention.py)")
    args = ap.parse_args(argv)
    try:
        arch, chosen = load_rules(args.tuning)
        print(source(apply(tuned._RULES[arch], chosen)))
    except (OSError, KeyError, ValueError) as e:
        ap.error(f"{args.tuning}: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
