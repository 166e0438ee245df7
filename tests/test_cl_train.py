"""`python -m engine.train cl`: exact resume (checkpoint-k, then on to the end, gives the losses of the
uninterrupted run), metrics.jsonl fields, HF-layout embedding checkpoint, eval.json before/after; --freeze."""

import json
import shutil

import pytest
import torch

from engine.train import main
from moca.checkpoint import load_model
from spawn_ranks import free_port, run_ranks

ARGS = ["cl", "--model", "tiny", "--data", "synthetic:16", "--batch-size", "4", "--max-steps", "4",
        "--save-every", "2", "--lr", "1e-3", "--no-progress", "--attn-backend", "torch"]


def _metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_exact_resume(tmp_path):
    out = tmp_path / "run"
    main(ARGS + ["--output-dir", str(out)])
    full = _metrics(out)
    assert [r["step"] for r in full] == [1, 2, 3, 4] and all({"loss", "lr"} <= r.keys() for r in full)
    # the reference's linear schedule (HF Trainer): warm-up ceil(0.1 * 4) = 1 step from lr 0, then down to 0 at step 4
    assert [r["lr"] for r in full] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and set(ev["after"]["tasks"]) == {"t2i", "i2t", "vqa", "cls"}
    final = load_model(str(out / "final"))
    shutil.rmtree(out / "final")
    main(ARGS + ["--output-dir", str(out), "--resume"])
    resumed = _metrics(out)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert json.loads((out / "eval.json").read_text()) == ev  # "before" kept from the run that was resumed
    again = load_model(str(out / "final"))
    for (name, a), b in zip(final.named_parameters(), again.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_freeze_keeps_the_named_parameters(tmp_path):
    out = tmp_path / "frozen"
    main(["cl", "--model", "tiny", "--data", "synthetic:16", "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3",
          "--no-progress", "--attn-backend", "torch", "--output-dir", str(out), "--freeze", "embed_tokens", "visual.blocks.0."])
    start, end = load_model("tiny", seed=0), load_model(str(out / "final"))
    for (name, a), b in zip(start.named_parameters(), end.parameters()):
        if name.startswith(("embed_tokens", "visual.blocks.0.")):
            assert torch.equal(a, b), name
        elif a.ndim >= 2:  # every trained matrix moved (a key bias may not: its gradient is exactly zero)
            assert not torch.equal(a, b), name
    with pytest.raises(ValueError, match="embed_token_typo"):
        main(ARGS + ["--output-dir", str(tmp_path / "typo"), "--freeze", "embed_token_typo"])


def test_epochs_set_the_run_length(tmp_path):
    """No --max-steps: --epochs passes over the data. Subsets of 10 and 6 records in global batches of 4 give
    2 + 1 batches an epoch (each subset's remainder is dropped)."""
    for name, n in (("a", 10), ("b", 6)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(
            {"qry": f"query {name} {i}", "qry_image_path": "", "pos_text": f"positive {name} {i}",
             "pos_image_path": "", "neg_text": [], "neg_image_path": []}) + "\n" for i in range(n)))
    base = ["cl", "--model", "tiny", "--data", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--batch-size",
            "4", "--lr", "1e-3", "--no-progress", "--attn-backend", "torch"]
    for epochs, steps in (("1", 3), ("1.5", 5)):
        main(base + ["--epochs", epochs, "--output-dir", str(tmp_path / epochs)])
        assert [r["step"] for r in _metrics(tmp_path / epochs)] == list(range(1, steps + 1))
    with pytest.raises(SystemExit, match="not both"):
        main(base + ["--epochs", "1", "--max-steps", "2", "--output-dir", str(tmp_path / "both")])
    with pytest.raises(SystemExit) as exit_:  # refused when parsed, as a usage error
        main(base + ["--epochs", "0", "--output-dir", str(tmp_path / "none")])
    assert exit_.value.code == 2


def _rank(rank, port, argv):
    import os

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(argv)


def test_fsdp_run_ends_with_its_evaluation(tmp_path):
    """Under FSDP the trained model is sharded: the "after" evaluation reads the gathered final/ (it crashed on
    mixed Tensor / DTensor weights, after training, with no eval.json)."""
    port = free_port()
    out = tmp_path / "fsdp"
    argv = ["cl", "--model", "tiny", "--data", "synthetic:16", "--batch-size", "2", "--max-steps", "1", "--lr", "1e-3",
            "--no-progress", "--attn-backend", "torch", "--parallel", "fsdp", "--output-dir", str(out)]
    run_ranks(_rank, (port, argv))
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and 0 <= ev["after"]["mean_precision@1"] <= 1


def test_help_gives_each_stage_its_defaults_and_flags(capsys):
    from engine.train import build_parser

    helps = {}
    for stage in ("cpt", "cl"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([stage, "--help"])
        helps[stage] = " ".join(capsys.readouterr().out.split())
    assert "(default: synthetic:2000)" in helps["cl"] and "MOCA.md: 2e-05" in helps["cl"]
    assert "newest runs/cpt-tiny*/final" in helps["cl"]
    assert "(default: synthetic:1000)" in helps["cpt"] and "MOCA.md: 2e-06" in helps["cpt"]
    for cpt_only in ("--budget", "--max-items", "--cache-dir", "--workers", "--mlm-prob"):
        assert cpt_only in helps["cpt"] and cpt_only not in helps["cl"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cl", "--batch-size", "0"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["cl", "--temperature", "0"])


def test_overwrite_deletes_the_old_reports_too(tmp_path):
    """The previous run's eval.json must not sit beside a new run's checkpoints."""
    out = tmp_path / "run"
    argv = ["cl", "--model", "tiny", "--data", "synthetic:8", "--batch-size", "4", "--max-steps", "1", "--no-progress",
            "--attn-backend", "torch", "--output-dir", str(out)]
    main(argv)
    assert (out / "eval.json").exists()
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"qry": f"query {i}", "pos_text": f"positive {i}"}) + "\n"
                                              for i in range(8)))
    main(argv[:4] + [str(tmp_path / "a.jsonl")] + argv[5:] + ["--overwrite"])  # real data: no synthetic eval
    assert sorted(p.name for p in out.iterdir()) == [".lock", "final", "loss_curve.png", "metrics.jsonl"]


def _rank_own_data(rank, port, argvs):
    _rank(rank, port, argvs[rank])


def test_ranks_that_read_different_data_stop_together(tmp_path):
    """Each rank computes the epoch plan from its own view of --data (a node without the shared filesystem
    sees other files): plans that differ are a DataError on every rank before anything is written, not
    ranks that train other records and hang at the end on a step count of their own."""
    argvs = []
    for rank, n in ((0, 8), (1, 12)):
        data = tmp_path / f"rank{rank}" / "pairs.jsonl"
        data.parent.mkdir()
        data.write_text("".join(json.dumps({"qry": f"query {i}", "pos_text": f"positive {i}"}) + "\n"
                                for i in range(n)))
        argvs.append(["cl", "--model", "tiny", "--data", str(data), "--batch-size", "2", "--max-steps", "1",
                      "--no-progress", "--attn-backend", "torch", "--output-dir", str(tmp_path / "run")])
    with pytest.raises(Exception, match="the ranks read different data"):
        run_ranks(_rank_own_data, (free_port(), argvs), timeout=300)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
