"""Run by tests/test_tune_attention.py with TRITON_INTERPRET=0 (the binder needs compiled-mode kernels):
Triton cache keys of attention launches, built three ways, printed as JSON mismatches.

1. bench/tune_attention.py: captured from the launchers, a candidate's tiles put in (what it precompiles).
2. bench/compile_gate.py: built by hand from (kernel, head dim, group, config, token count, ...): what
   gpu-check's gate compiles for the benchmarks to find in Triton's cache.
3. The MOCA_AUTOTUNE=1 launch as Triton's autotuner makes it: the launcher's call to the autotuner,
   each candidate's pre_hook applied, its Config's kwargs added (what the tuning run then times).
Also: each launch is filed (for the tuner's proposed rules) under the kernels/tuned.py rule that decided it,
the seq bucket taken from the launch's own arguments.

    python tests/tune_keys.py SHAPE:VARIANT ...   ->   {"checked": {SHAPE:VARIANT: keys compared}, "mismatches": [...]}
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import tune_attention as tune  # noqa: E402  (imports compile_gate, which turns the interpreter off)
from common import with_env  # noqa: E402

import compile_gate as gate  # noqa: E402
import torch  # noqa: E402
from kernels import attention, tuned  # noqa: E402

GROUPS = {hq_hkv: g for g, hq_hkv in gate.GROUPS.items()}


def autotuned_launches(shape: str, variant: str) -> list[tuple]:
    """[(kernel, tiles, fused_dq, args, kwargs)]: the launcher's calls to the autotuner under MOCA_AUTOTUNE=1."""
    calls = []

    def recorder(name, tiles, fused_dq=False):
        class Call:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((name, tiles, fused_dq, args, kwargs))

        return Call()

    s = tune._shape(shape)
    T = sum(s["lens"])
    q, o, do = (torch.empty(T, s["hq"], s["d"], dtype=tune.DTYPE) for _ in range(3))
    k, v = (torch.empty(T, s["hkv"], s["d"], dtype=tune.DTYPE) for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(s["lens"]).cumsum(0).tolist()], dtype=torch.int32)
    tma, fused, _ = tune.VARIANTS[variant]
    saved = attention._autotuner
    attention._autotuner = recorder
    try:
        with with_env({"MOCA_AUTOTUNE": "1", "MOCA_TMA": tma, "MOCA_FUSED_DQ": fused}), tune._recording([]):
            _, lse = attention._attn_fwd_launch(q, k, v, cu, max(s["lens"]), 0.1)
            attention._attn_bwd_launch(do, q, k, v, o, lse, cu, max(s["lens"]), 0.1)
    finally:
        attention._autotuner = saved
    return calls


def main(pairs: list[str]) -> dict:
    mismatches, checked = [], {}
    for pair in pairs:
        checked[pair] = 0
        shape, variant = pair.split(":")
        s = tune._shape(shape)
        auto = autotuned_launches(shape, variant)
        launches = tune.capture(shape, variant)
        assert [c[0] for c in auto] == [x[0] for x in launches], "the two paths launch different kernels"
        for i, ((name, ptrs, sched, rest, meta, cfg, streamed), (_, tiles, fused, args, kwargs)) in enumerate(
                zip(launches, auto)):
            shipped = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
            # 1 vs 2: the shipped launch, captured and by hand
            ours = gate.launch_key(*tune.launch(shape, variant, i, shipped))
            tma = tune.VARIANTS[variant][0] == "1" and streamed is not None
            job = dict(family="attention", args=dict(
                kernel=name, head_dim=s["d"], dtype="bf16", group=GROUPS[s["hq"], s["hkv"]], cfg=shipped,
                n_tokens=sum(s["lens"]), packed=meta["PACKED"], tma=tma, fused_dq=meta.get("FUSED_DQ", False)))
            checked[pair] += 1
            if ours != gate._key(job):
                mismatches.append(f"{pair} launch {i} {name}: captured != compile gate\n{ours}\n{gate._key(job)}")
            # 1 vs 3: every candidate, precompiled and as the autotuner launches it
            for config in attention._autotuner.__wrapped__(name, tiles, fused).configs:
                cand = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
                nargs = dict(zip(attention._KERNELS[name].arg_names, args))
                config.pre_hook({**nargs, **kwargs, **config.all_kwargs()})
                theirs = gate.launch_key(attention._KERNELS[name], args, {**kwargs, **config.all_kwargs()})
                checked[pair] += 1
                if gate.launch_key(*tune.launch(shape, variant, i, cand)) != theirs:
                    mismatches.append(f"{pair} launch {i} {name} {tune.tune_rules.label(cand)}: "
                                      "precompiled != autotuned")
        # the rule the tuner files each launch under (for its proposals) is the one that decided the launch
        buckets = [dict(zip(attention._KERNELS[c[0]].arg_names, c[3]))["seq_bucket"] for c in auto]
        for item in (it for g in tune.groups([shape], [variant]) for it in g["items"]):
            meta = item["meta"]
            index, _, cfg = tuned.rule(gate.ARCH, item["kernel"], meta["HEAD_DIM"], tune.DTYPE, buckets[item["index"]],
                                       meta["PACKED"], meta.get("FUSED_DQ", False))
            checked[pair] += 1
            if (index, tuple(cfg[:4])) != (item["rule"], item["shipped"]):
                mismatches.append(f"{pair} launch {item['index']}: filed under rule {item['rule']}, decided by {index}")
    return dict(checked=checked, mismatches=mismatches)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
