"""bench/tune_rules.py: from per-site tuning times to one candidate per kernels/tuned.py rule, on hand-computed
cases; and tuned.rule, the lookup both the launchers and those proposals go through."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tune_rules  # noqa: E402

from kernels import tuned  # noqa: E402

A, B = (128, 64, 8, 3), (64, 64, 4, 2)
LA, LB = tune_rules.label(A), tune_rules.label(B)


def _item(index, kernel="fwd", rule=7, head_dim=128, shipped=A, tma_possible=True, tiling="per-segment",
          bucket=4096):
    return dict(index=index, kernel=kernel, tiling=tiling, shipped=shipped, shipped_tma=False, rule=rule,
                conditions={}, meta=dict(HEAD_DIM=head_dim), seq_bucket=bucket, tma_possible=tma_possible)


def _row(shape, variant, config, ms, kernel="fwd", tiling="per-segment"):
    return dict(shape=shape, variant=variant, kernel=kernel, tiling=tiling, config=config, ms=ms)


@pytest.mark.parametrize("split", ["head_dim", "seq_bucket"])
def test_rule_candidate_by_geometric_mean_over_its_sites_and_per_head_dim_or_bucket(split):
    # site u (D128 or bucket 4096): A 1.0, B 1.2; site w (D80 or bucket 2048): A 1.5, B 1.0
    # -> A sqrt(1 * 1.5), B sqrt(1.2 * 1)
    w = _item(0, head_dim=80) if split == "head_dim" else _item(0, bucket=2048)
    plan = [dict(shape="u", variant="plain", items=[_item(0)]), dict(shape="w", variant="plain", items=[w])]
    rows = [_row("u", "plain", LA, 1.0), _row("u", "plain", LB, 1.2), _row("w", "plain", LA, 3.0),
            _row("w", "plain", LB, 2.0)]
    out = {p["split"]: p for p in tune_rules.propose(tune_rules.sites(rows, plan))}
    u, w = (f"{split}=128", f"{split}=80") if split == "head_dim" else (f"{split}=4096", f"{split}=2048")
    assert set(out) == {"all", u, w}
    assert out["all"]["proposed"] == LB and out["all"]["shipped"] == LA
    assert out["all"]["proposed_x"] == pytest.approx(math.sqrt(1.2))
    assert out["all"]["shipped_x"] == pytest.approx(math.sqrt(1.5))
    assert out["all"]["proposed_worst"] == pytest.approx(1.2)
    assert out["all"]["gain"] == pytest.approx(math.sqrt(1.5 / 1.2))
    assert out["all"]["sites"] == "u/per-segment, w/per-segment"
    assert (out[u]["proposed"], out[u]["gain"]) == (LA, pytest.approx(1.0))  # split: each its own
    assert (out[w]["proposed"], out[w]["gain"]) == (LB, pytest.approx(1.5))


def test_tma_candidates_where_tma_cannot_run_and_where_it_was_not_timed():
    # site p: TMA impossible (the launch runs plain), site q: TMA possible but its tma rows were not timed
    plan = [dict(shape="p", variant="plain", items=[_item(0, tma_possible=False)]),
            dict(shape="p", variant="tma", items=[])]
    rows = [_row("p", "plain", LA, 2.0), _row("p", "plain", LB, 1.0)]
    (only,) = tune_rules.propose(tune_rules.sites(rows, plan))
    assert only["proposed"] in (LB, LB + " +tma") and only["proposed_x"] == 1.0  # plain's time stands for TMA's

    plan.append(dict(shape="q", variant="plain", items=[_item(0)]))
    plan.append(dict(shape="q", variant="tma", items=[_item(0)]))
    rows += [_row("q", "plain", LA, 1.0), _row("q", "plain", LB, 1.1), _row("q", "tma", LB, 0.5)]
    (both,) = tune_rules.propose(tune_rules.sites(rows, plan))
    assert both["proposed"] == LB + " +tma"  # p: B plain 1.0 (= +tma), q: B +tma 0.5 the fastest
    assert both["proposed_x"] == pytest.approx(1.0)
    assert both["shipped_x"] == pytest.approx(math.sqrt(2.0 * 2.0))  # A: 2x the fastest at p and at q


def test_candidates_missing_a_site_are_not_ranked_and_rules_stay_apart():
    plan = [dict(shape="u", variant="plain", items=[_item(0), _item(1, kernel="dq", rule=2, shipped=B)]),
            dict(shape="w", variant="plain", items=[_item(0)])]
    rows = [_row("u", "plain", LA, 2.0), _row("u", "plain", LB, 1.0), _row("w", "plain", LA, 1.0),
            _row("w", "plain", LB, float("inf")),  # B over shared memory at w: the autotuner's inf
            _row("u", "plain", LB, 4.0, kernel="dq")]
    out = tune_rules.propose(tune_rules.sites(rows, plan))
    assert [(p["kernel"], p["rule"], p["proposed"]) for p in out] == [("dq", 2, LB), ("fwd", 7, LA)]
    assert out[1]["proposed_worst"] == pytest.approx(2.0)


def test_sites_not_timed_are_left_out():
    plan = [dict(shape="u", variant="plain", items=[_item(0)]), dict(shape="w", variant="plain", items=[_item(0)])]
    (only,) = tune_rules.propose(tune_rules.sites([_row("u", "plain", LA, 1.0)], plan))
    assert only["sites"] == "u/per-segment" and only["proposed"] == LA
    assert "| fwd | 7 |" in "\n".join(tune_rules.markdown([only], []))


def test_rule_lookup_first_holding_rule_with_head_dim_condition(monkeypatch):
    rules = {"sm90": {"fwd": [(dict(dtype=torch.float32), (32, 16, 8, 2)), (dict(head_dim=80), (64, 64, 4, 3, True)),
                              (dict(max_seq=64), (64, 64, 8, 3)), (dict(), (128, 64, 8, 3))]},
             "default": {"fwd": [(dict(), (64, 32, 4, 2))]}}
    monkeypatch.setattr(tuned, "_RULES", rules)
    assert tuned.rule("sm90", "fwd", 80, torch.bfloat16, 4096)[0] == 1
    assert tuned.rule("sm90", "fwd", 80, torch.float32, 64)[0] == 0
    assert tuned.rule("sm90", "fwd", 128, torch.bfloat16, 64)[0] == 2
    assert tuned.rule("sm90", "fwd", 128, torch.bfloat16, 128) == (3, {}, (128, 64, 8, 3))
    assert tuned.attention_config("sm90", "fwd", 80, torch.float16, 8192) == dict(
        BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True)
    assert tuned.rule("sm86", "fwd", 80, torch.float16, 8192) == (0, {}, (64, 32, 4, 2))


def _proposal(rule, split, shipped, proposed, gain=None, split_gain=None):
    return dict(kernel="fwd", rule=rule, split=split, shipped=shipped, proposed=proposed, gain=gain,
                split_gain=split_gain)


RULES = {"fwd": [(dict(dtype=torch.float32), (32, 16, 8, 2)), (dict(packed=True), (128, 64, 8, 3)),
                 (dict(), (128, 64, 8, 3))]}


def test_overrides_chosen_and_applied_decide_the_launches(monkeypatch, tmp_path):
    proposals = [
        _proposal(2, "all", LA, "64x128 w4 s2 +tma", gain=1.10),  # ships
        _proposal(2, "head_dim=80", LA, "128x32 w8 s3", gain=1.2, split_gain=1.05),  # split off
        _proposal(2, "head_dim=128", LA, "64x128 w4 s2 +tma", gain=1.1, split_gain=1.0),  # no better than the rule's
        _proposal(2, "seq_bucket=4096", LA, "64x64 w4 s2", gain=1.5, split_gain=1.5),  # bucket splits: a reader's call
        _proposal(1, "all", LA, "128x128 w8 s3", gain=1.01),  # under min_gain
    ]
    chosen = tune_rules.overrides(proposals)
    assert [(o["rule"], o["head_dim"], o["config"]) for o in chosen] == [
        (2, None, (64, 128, 4, 2, True)), (2, 80, (128, 32, 8, 3, False))]
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(dict(arch="sm90", overrides=chosen)))  # as STEM.json carries them
    arch, loaded = tune_rules.load_rules(str(path))
    new = tune_rules.apply(RULES, loaded)
    assert RULES["fwd"][2] == (dict(), (128, 64, 8, 3))  # not changed in place
    monkeypatch.setattr(tuned, "_RULES", {arch: new, "default": new})
    cfg = lambda d, dtype=torch.bfloat16, packed=False: tuple(  # noqa: E731
        tuned.attention_config("sm90", "fwd", d, dtype, 4096, packed).values())
    assert cfg(80) == (128, 32, 8, 3, False)  # the split, before the rule it came from
    assert cfg(128) == cfg(64) == (64, 128, 4, 2, True)  # the rule's new entry
    assert cfg(80, packed=True) == (128, 64, 8, 3, False)  # rules before it: as they were
    assert cfg(80, dtype=torch.float32) == (32, 16, 8, 2, False)

    stale = {"fwd": [*RULES["fwd"][:2], (dict(), (128, 128, 8, 3))]}
    with pytest.raises(ValueError, match="tune again"):
        tune_rules.apply(stale, loaded)


def test_throughput_runs_under_a_tunings_rules(monkeypatch, tmp_path, capsys):
    import throughput

    monkeypatch.setattr(tuned, "_RULES", dict(tuned._RULES))  # the run replaces sm90's list: restored after
    last = len(tuned._RULES["sm90"]["fwd"]) - 1
    shipped = (*tuned._RULES["sm90"]["fwd"][last][1][:4], False)
    rules = tmp_path / "tune.json"
    override = dict(kernel="fwd", rule=last, head_dim=None, config=[64, 128, 4, 2, True], shipped=shipped)
    rules.write_text(json.dumps(dict(arch="sm90", overrides=[override])))
    with pytest.raises(SystemExit):  # rules timed against another table: refused before anything runs
        stale = tmp_path / "stale.json"
        stale.write_text(json.dumps(dict(arch="sm90", overrides=[dict(override, shipped=[1, 2, 3, 4, False])])))
        throughput.main(["attention", "--quick", "--device", "cpu", "--json", str(tmp_path / "x.json"),
                         "--rules", str(stale)])
    assert "tune again" in capsys.readouterr().err and not (tmp_path / "x.json").exists()

    out = tmp_path / "bench.json"
    payload = throughput.main(["attention", "--quick", "--device", "cpu", "--json", str(out), "--rules", str(rules)])
    assert payload["environment"]["rules"] == "tune.json (1 overrides)"
    assert json.loads(out.read_text())["results"]["attention"]
    assert tuple(tuned.attention_config("sm90", "fwd", 128, torch.bfloat16, 8192).values()) == (64, 128, 4, 2, True)


def test_source_prints_the_applied_table_as_python_for_tuned_py():
    split = dict(kernel="fwd", rule=2, head_dim=80, config=(128, 32, 8, 3, True), shipped=(128, 64, 8, 3, False))
    text = tune_rules.source(tune_rules.apply(RULES, [split]))
    assert eval("{" + text + "}", {"torch": torch}) == {"fwd": [  # noqa: S307 - our own output
        (dict(dtype=torch.float32), (32, 16, 8, 2)), (dict(packed=True), (128, 64, 8, 3)),
        (dict(head_dim=80), (128, 32, 8, 3, True)), (dict(), (128, 64, 8, 3))]}
