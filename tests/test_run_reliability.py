"""Training runs that a user interrupts, repeats or feeds changing data (issue #13, items 1-7): no pickle
in the trainer state, one run per output folder, metrics that match the checkpoint resumed from,
half-written / half-deleted checkpoints that never count, a cost cache that notices its images
changed, checkpoint permissions that follow the umask, and bad records reported as FILE:LINE."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from engine.data import CPTData, DataError, open_source, source_costs
from engine.masking import add_mask_token
from engine.train import CL_DEFAULTS, CL_EMBEDDED, main
from engine.trainer import (LEGACY_STATE, STATE_JSON, STATE_TENSORS, LegacyCheckpointError, RunDirError, UsageError,
                            _rng_state, _set_rng_state, checkpoint_info, clean_run_dir, decode_state, encode_state,
                            find_checkpoint, lock_run_dir)
from moca import Processor
from moca.checkpoint import save_model
from moca.processor import IMAGE_MARKER
from test_cpt_data import write_bad_jsonl
from test_cpt_train import args, full_run, metrics, weights, workdir  # noqa: F401 (fixtures)
from spawn_ranks import free_port, run_ranks

PARTS = ("loss", "mlm_loss", "mae_loss", "lr", "grad_norm", "tokens", "samples")


class Payload:
    """Unpickling this touches a file: the stand-in for arbitrary code in a planted trainer_state.pt."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def plant_pickle(folder, marker):
    torch.save({"optimizer": Payload(marker)}, os.path.join(folder, LEGACY_STATE))


def is_pickle(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return head[:1] == b"\x80" or head == b"PK"  # a raw pickle, or torch.save's zip of one


# ---------------------------------------------------------------------------------- item 1
def test_checkpoints_hold_no_pickle(full_run):  # noqa: F811
    for ckpt in ("checkpoint-2", "final"):
        folder = full_run / ckpt
        names = sorted(os.listdir(folder))
        assert STATE_TENSORS in names and STATE_JSON in names and LEGACY_STATE not in names
        assert not [n for n in names if is_pickle(folder / n)]
        info = json.loads((folder / STATE_JSON).read_text())
        assert info["step"] == (2 if ckpt == "checkpoint-2" else 4)
        assert sorted(info["files"]) == sorted(set(names) - {STATE_JSON})  # the marker lists every other file


def test_resume_ignores_a_planted_pickle_and_reproduces_the_run(workdir, full_run, tmp_path):  # noqa: F811
    out = tmp_path / "resumed"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    marker = tmp_path / "payload-ran"
    plant_pickle(out / "checkpoint-2", marker)
    main(args(workdir, out, 4, "--save-every", "2", "--resume"))
    assert not marker.exists()
    ref, got = metrics(full_run)[2:], metrics(out)
    assert [r["step"] for r in got] == [3, 4]
    assert [{k: r[k] for k in PARTS} for r in got] == [{k: r[k] for k in PARTS} for r in ref]
    wa, wb = weights(full_run / "final"), weights(out / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_legacy_pickle_checkpoint(workdir, full_run, tmp_path):  # noqa: F811
    """A checkpoint written by the old version (trainer_state.pt only) is named, never unpickled."""
    out = tmp_path / "legacy"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    os.remove(out / "checkpoint-2" / STATE_TENSORS)
    marker = tmp_path / "payload-ran"
    plant_pickle(out / "checkpoint-2", marker)
    with pytest.raises(LegacyCheckpointError, match=f"checkpoint-2 holds a {LEGACY_STATE}"):
        main(args(workdir, out, 4, "--resume"))
    assert not marker.exists() and os.path.exists(out / "checkpoint-2" / LEGACY_STATE)


def test_optimizer_scheduler_and_rng_state_round_trip(tmp_path):
    """encode_state -> safetensors + JSON -> decode_state: the next step equals the uninterrupted one."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))

    def make():
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    def step(opt, sched, x):
        net(x).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    opt, sched = make()
    for _ in range(3):
        step(opt, sched, torch.randn(4, 5))
    tensors = {}
    skel = encode_state({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()},
                        "", tensors)
    save_file(tensors, str(tmp_path / "s.safetensors"))
    (tmp_path / "s.json").write_text(json.dumps(skel))
    saved = [p.detach().clone() for p in net.parameters()]
    x = torch.randn(4, 5)
    step(opt, sched, x)
    uninterrupted = [p.detach().clone() for p in net.parameters()]

    state = decode_state(json.loads((tmp_path / "s.json").read_text()), load_file(str(tmp_path / "s.safetensors")))
    with torch.no_grad():
        for p, p0 in zip(net.parameters(), saved):
            p.copy_(p0)
    opt2, sched2 = make()
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    assert torch.equal(torch.randn(4, 5), x)  # the RNG continues where it was saved
    step(opt2, sched2, x)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), uninterrupted))
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_each_rank_gets_its_own_rng_state_back():
    """Saved RNG states are (world, ...) rows; rank 1 restores row 1 (a view: torch.set_rng_state
    segfaults on a view with an offset unless the trainer copies it)."""
    draws, states = [], []
    for seed in (3, 4):
        torch.manual_seed(seed)
        states.append(_rng_state())
        draws.append(torch.rand(4))
    stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
    for rank in (1, 0):
        _set_rng_state({k: v[rank] for k, v in stacked.items()})
        assert torch.equal(torch.rand(4), draws[rank])


def test_cuda_rng_states_of_more_devices_than_visible_restore_those_visible(monkeypatch):
    """Saved with 4 visible GPUs, resumed where 2 are visible: devices 0 and 1 get theirs, no IndexError."""
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.__setitem__(device, s))
    cuda = torch.arange(4 * 3, dtype=torch.uint8).view(4, 3)
    _set_rng_state({"torch": torch.get_rng_state(), "cuda": cuda})
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[d], cuda[d]) for d in (0, 1))


def _rank(rank, world, port, argv):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(argv)


def _two_ranks(argv):
    run_ranks(_rank, (2, free_port(), argv))


@pytest.mark.slow
def test_fsdp_resume_reproduces_the_uninterrupted_run(workdir, tmp_path):  # noqa: F811
    """Two gloo ranks under FSDP2: the full optimizer state goes through safetensors + JSON and back."""
    full, out = tmp_path / "full", tmp_path / "resumed"
    _two_ranks(args(workdir, full, 4, "--save-every", "2", "--parallel", "fsdp"))
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    _two_ranks(args(workdir, out, 4, "--save-every", "2", "--parallel", "fsdp", "--resume"))
    got = metrics(out)
    assert [r["step"] for r in got] == [3, 4]
    assert [{k: r[k] for k in PARTS} for r in got] == [{k: r[k] for k in PARTS} for r in metrics(full)[2:]]
    wa, wb = weights(full / "final"), weights(out / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_pickle_loading_in_the_code():
    root = pathlib.Path(__file__).resolve().parents[1]
    for folder in ("engine", "moca", "kernels", "bench"):
        for f in (root / folder).rglob("*.py"):
            text = f.read_text()
            for bad in ("torch.load(", "import pickle", "weights_only", "_object(", "_object_list("):
                assert bad not in text, (f, bad)


# ---------------------------------------------------------------------------------- item 2
def test_fresh_run_refuses_a_folder_holding_a_run(workdir, full_run, tmp_path):  # noqa: F811
    out = tmp_path / "old"
    shutil.copytree(full_run, out)  # an older run: checkpoint-2 and final (step 4) are higher than steps 1-2 below
    before = sorted(os.listdir(out))
    with pytest.raises(RunDirError, match=re.escape(f"{out} already holds a run (checkpoint-2, final, metrics.jsonl)")
                       + ".*--resume.*--overwrite"):
        main(args(workdir, out, 2, "--save-every", "1"))
    assert sorted(os.listdir(out)) == before
    main(args(workdir, out, 3, "--save-every", "1", "--keep-last", "1", "--overwrite"))
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-2", "final", "loss_curve.png", "metrics.jsonl"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert checkpoint_info(str(out / "checkpoint-2"))["step"] == 2 and checkpoint_info(str(out / "final"))["step"] == 3


def test_a_folder_in_use_by_another_run_is_refused(workdir, full_run, tmp_path):  # noqa: F811
    """Two runs on one folder (a second launch, a forgotten one): the second is refused before it reads or
    deletes anything, even with --overwrite; once the holder has ended, however it ended, the folder is free."""
    out = tmp_path / "busy"
    shutil.copytree(full_run, out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from engine.trainer import lock_run_dir; "
                               f"lock_run_dir({str(out)!r}); print('locked', flush=True); sys.stdin.read()"],
                              cwd=pathlib.Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        for extra in (("--overwrite",), ("--resume",)):
            with pytest.raises(RunDirError, match=re.escape(f"{out} is in use by another run (pid {holder.pid},")):
                main(args(workdir, out, 2, *extra))
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    finally:
        holder.kill()  # a kill, not an exit: the kernel drops the lock either way
        holder.wait()
    lock_run_dir(str(out))  # free again; the same process taking it twice is a no-op
    lock_run_dir(str(out))


def _fake_checkpoint(folder, step, payload=b"weights"):
    """A complete checkpoint as far as the marker goes: one file plus trainer_state.json listing it."""
    os.makedirs(folder)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / STATE_JSON).write_text(json.dumps({"format": 2, "step": step, "files": {"model.safetensors": len(payload)}}))


def test_prune_never_deletes_the_checkpoint_just_saved(tmp_path):
    from types import SimpleNamespace

    from engine.trainer import Trainer

    for step in (2, 8):  # checkpoint-8: left by some other run, with more steps
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    fake = SimpleNamespace(cfg=SimpleNamespace(output_dir=str(tmp_path), keep_last=1))
    Trainer._prune(fake, keep=str(tmp_path / "checkpoint-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-8"]
    _fake_checkpoint(tmp_path / "checkpoint-10", 10)
    Trainer._prune(fake, keep=str(tmp_path / "checkpoint-10"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10"]


# ---------------------------------------------------------------------------------- items 3, 4
def test_resume_after_a_kill_in_the_first_save_starts_fresh_metrics(workdir, full_run, tmp_path):  # noqa: F811
    """Killed while checkpoint-2 was written: metrics rows 1, 2 and a .tmp-* folder, no checkpoint."""
    out = tmp_path / "killed"
    os.makedirs(out)
    shutil.copy(full_run / "metrics.jsonl", out / "metrics.jsonl")
    shutil.copytree(full_run / "checkpoint-2", out / ".tmp-checkpoint-2-123-abcd")
    main(args(workdir, out, 3, "--resume"))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(os.listdir(out)) == [".lock", "final", "loss_curve.png", "metrics.jsonl"]


def test_a_changed_checkpoint_never_counts_is_never_deleted_and_leftovers_are_cleaned(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-2", 2)
    _fake_checkpoint(tmp_path / "checkpoint-4", 4)
    os.remove(tmp_path / "checkpoint-4" / "model.safetensors")  # deleted by hand: json kept, tensors gone
    _fake_checkpoint(tmp_path / "checkpoint-6", 6, payload=b"w")
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"wei")  # size differs from the marker's
    _fake_checkpoint(tmp_path / ".tmp-checkpoint-8-1-ab", 8)
    _fake_checkpoint(tmp_path / ".trash-checkpoint-0-1", 0)
    _fake_checkpoint(tmp_path / "checkpoint-2.old", 1)  # beside a live checkpoint-2: stale
    with pytest.raises(RunDirError, match="checkpoint-4: incomplete checkpoint"):
        checkpoint_info(str(tmp_path / "checkpoint-4"))
    # newer than the newest complete one: resuming from checkpoint-2 would lose its steps, so it is an error
    with pytest.raises(RunDirError, match="checkpoint-4: incomplete.*newer than .*checkpoint-2.*nothing was deleted"):
        find_checkpoint(str(tmp_path))
    clean_run_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    _fake_checkpoint(tmp_path / "final.old", 9)  # killed between save_model's two renames: final is gone
    clean_run_dir(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "final"]
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "final")  # the changed ones are older: skipped


def test_resume_refuses_a_newer_checkpoint_it_cannot_read_and_keeps_it(workdir, full_run, tmp_path):  # noqa: F811
    """A hand-edited config.json (same content, other indent) or another trainer-state format: an error that
    names the file, the folder kept, no fresh start."""
    out = tmp_path / "edited"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(full_run / "metrics.jsonl", out / "metrics.jsonl")
    config = out / "checkpoint-2" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=4))
    with pytest.raises(RunDirError, match="config.json missing or not .* bytes.*nothing was deleted"):
        main(args(workdir, out, 4, "--resume"))
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-2", "metrics.jsonl"]
    assert len(metrics(out)) == 4


@pytest.mark.parametrize("flags, message", [(("--lr", "5e-2"), "lr 0.001 -> 0.05"),
                                            (("--seed", "7", "--grad-accum", "2"), "grad_accum 1 -> 2; seed 0 -> 7")])
def test_resume_with_other_settings_is_refused(workdir, full_run, tmp_path, flags, message):  # noqa: F811
    """The optimizer and schedule restore the run's lr, and seed / accumulation decide each step's data: a
    resume that changes them would continue some other run, and its final/ would record values never used."""
    out = tmp_path / "drift"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    with pytest.raises(RunDirError, match=re.escape(message)):
        main(args(workdir, out, 4, "--resume", *flags))
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-2"]


def test_resume_drops_a_metrics_row_cut_short(workdir, full_run, tmp_path):  # noqa: F811
    """A kill or a full disk mid-append leaves half a row (or NULs): resuming drops it, not crashes on it."""
    out = tmp_path / "cut"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    rows = (full_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(rows[:3]) + rows[3][:40] + "\x00" * 8)
    main(args(workdir, out, 4, "--save-every", "2", "--resume"))
    assert [{k: r[k] for k in PARTS} for r in metrics(out)] == [{k: r[k] for k in PARTS} for r in metrics(full_run)]


def test_overwrite_survives_a_leftover_trash_folder_of_the_same_pid(workdir, full_run, tmp_path):  # noqa: F811
    """pids repeat (a container's entrypoint is pid 1): a killed run's .trash-<name>-<pid> is no clash."""
    out = tmp_path / "pid"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    _fake_checkpoint(out / f".trash-checkpoint-2-{os.getpid()}", 2)
    main(args(workdir, out, 1, "--overwrite"))
    assert sorted(os.listdir(out)) == [".lock", "final", "loss_curve.png", "metrics.jsonl"]


def test_overwrite_deletes_nothing_until_model_and_data_load(workdir, full_run, tmp_path):  # noqa: F811
    """A typo in --data with --overwrite: an error, and the previous run is still all there."""
    out = tmp_path / "kept"
    shutil.copytree(full_run, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"}
    argv = args(workdir, out, 1, "--overwrite")
    argv[argv.index("--data") + 1] = str(tmp_path / "typo.jsonl")
    with pytest.raises(FileNotFoundError, match="typo.jsonl"):
        main(argv)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".lock"} == before


@pytest.mark.parametrize("flags, message", [(("--mlm-prob", "0.3"), "mlm_prob 0.4 -> 0.3"),
                                            (("--max-len", "200", "--no-mae"), "max_len 256 -> 200; no_mae False -> True")])
def test_resume_with_another_objective_or_batching_is_refused(workdir, full_run, tmp_path, flags, message):  # noqa: F811
    """What decides each step's batches and loss (the stage's settings) must match the run resumed."""
    out = tmp_path / "objective"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    with pytest.raises(RunDirError, match=re.escape(message)):
        main(args(workdir, out, 4, "--resume", *flags))


def test_resume_on_other_data_warns(workdir, full_run, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "moved"
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    argv = args(workdir, out, 4, "--resume")
    argv[argv.index("--data") + 1] = "synthetic:40"
    with caplog.at_level(logging.WARNING, logger="moca"):
        main(argv)
    assert "trained on ['synthetic:48'], this run reads ['synthetic:40']" in caplog.text


def test_a_non_finite_loss_stops_the_run_before_anything_is_saved(workdir, tmp_path, monkeypatch):  # noqa: F811
    from engine.cpt import CPTTask
    from engine.trainer import DivergedError

    real, calls = CPTTask.backward, []

    def backward(self, *a):  # the loss of the second step's micro-batch turns NaN, as a diverging run's does
        calls.append(1)
        parts = real(self, *a)
        return parts * float("nan") if len(calls) == 2 else parts

    monkeypatch.setattr(CPTTask, "backward", backward)
    out = tmp_path / "nan"
    with pytest.raises(DivergedError, match="step 2: loss = nan.*nothing of this step saved"):
        main(args(workdir, out, 4, "--save-every", "1"))
    assert [r["step"] for r in metrics(out)] == [1]
    assert sorted(os.listdir(out)) == [".lock", "checkpoint-1", "metrics.jsonl"]


@pytest.mark.parametrize("flags, message", [
    (("--grad-accum", "0"), "--grad-accum: must be >= 1, got 0"),
    (("--mlm-prob", "1.5"), r"--mlm-prob: must be in \[0.0, 1.0\], got 1.5"),
    (("--warmup-ratio", "2"), "--warmup-ratio: must be in"),
    (("--budget", "0"), "--budget: must be >= 1"),
    (("--lr", "nan"), "--lr: must be > 0.0"),
    (("--data", "synthetic:50:0"), "the count after ':' must be >= 1"),
])
def test_flag_values_are_checked_when_parsed(workdir, tmp_path, capsys, flags, message):  # noqa: F811
    with pytest.raises(SystemExit) as exit_:
        main(args(workdir, tmp_path / "never", 2, *flags))
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_user_errors_are_one_line(workdir, tmp_path):  # noqa: F811
    argv = args(workdir, tmp_path / "out", 1)
    argv[argv.index("--data") + 1] = str(tmp_path / "typo.jsonl")
    run = subprocess.run([sys.executable, "-m", "engine.train", *argv], cwd=pathlib.Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"moca: data source {str(tmp_path / 'typo.jsonl')!r} does not exist"


@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_a_bad_model_is_refused_before_the_run_folder_exists(tmp_path, stage):
    from moca.config import CheckpointError

    with pytest.raises(CheckpointError, match=re.escape(f"{str(tmp_path / 'nope')!r} is neither a checkpoint "
                                                        "directory nor a preset (tiny, 3b, 7b)")):
        main([stage, "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


def test_triton_on_a_cpu_without_its_interpreter_is_refused_when_parsed(workdir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UsageError, match=r"^--attn-backend triton: the Triton kernels need a CUDA device; use a "
                                         r"GPU, or set TRITON_INTERPRET=1 to run them in Triton's CPU interpreter "
                                         r"\(slow\)$"):
        main(args(workdir, tmp_path / "out", 1, "--attn-backend", "triton", "--device", "cpu"))
    assert list(tmp_path.iterdir()) == []


def test_cl_help_gives_the_defaults_a_run_takes(capsys):
    """--model tiny takes the tiny settings (CL_EMBEDDED) but the release's batch size; only the embedded run
    (no --model) takes 16."""
    with pytest.raises(SystemExit):
        main(["cl", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "queries per device and micro-batch (24; the embedded run, without --model: 16)" in text
    assert f"log a line every N steps ({CL_DEFAULTS['log_every']}; tiny: {CL_EMBEDDED['log_every']})" in text


def test_an_output_dir_that_is_a_file_or_an_unwritable_cache_is_named(workdir, tmp_path):  # noqa: F811
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(RunDirError, match=re.escape(f"--output-dir {tmp_path / 'afile'} is a file, not a folder")):
        main(args(workdir, tmp_path / "afile", 1))
    cache = tmp_path / "afile" / "cache"
    with pytest.raises(PermissionError, match=re.escape(f"--cache-dir (default $MOCA_CACHE_DIR or ~/.cache/moca): "
                                                        f"cannot write in {cache} (Not a directory)")):
        main(args(workdir, tmp_path / "out", 1, "--cache-dir", str(cache)))
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == "mine"


# ---------------------------------------------------------------------------------- item 5
@pytest.fixture(scope="module")
def proc():
    p = Processor.from_pretrained("tiny")
    add_mask_token(p.tokenizer)
    return p


def test_cost_cache_notices_images_that_changed(proc, tmp_path, caplog):
    path, bad = write_bad_jsonl(tmp_path / "src")
    cache = str(tmp_path / "cache")
    _, b1 = source_costs(open_source(path), proc, 256, cache, progress=False)
    assert sorted(b1) == sorted(bad)
    for i in (0, 4):
        os.remove(tmp_path / "src" / f"img{i}.png")
    with caplog.at_level(logging.INFO, logger="moca"):
        _, b2 = source_costs(open_source(path), proc, 256, cache, progress=False)
    assert "stale" in caplog.text and "from cache" not in caplog.text
    assert sorted(b2) == sorted(set(bad) | {0, 4})


def test_images_gone_after_the_cost_pass_count_once_then_a_clear_error(proc, tmp_path, caplog):
    path, bad = write_bad_jsonl(tmp_path / "src")
    data = CPTData([f"{path}:40"], proc, max_len=256, budget=300, cache_dir=str(tmp_path / "cache"), progress=False)
    bins = len(data.epoch_bins(0)) + len(data.epoch_bins(1)) + len(data.epoch_bins(2))
    gone = (0, 4)
    for i in gone:
        os.remove(tmp_path / "src" / f"img{i}.png")
    with caplog.at_level(logging.WARNING, logger="moca"):
        drawn = [item for k in range(bins) for item in data.micro_batch(k).items]  # three epochs: each record ~10x
    assert data.runtime_bad == len(gone)
    assert sorted({int(data.items[i, 1]) for i in drawn}) == sorted(set(range(13)) - set(bad) - set(gone))
    for i in gone:
        assert caplog.text.count(f"bad record: {path}:{i + 1}: ") == 1


def test_a_source_whose_images_all_went_is_a_clear_error(proc, tmp_path):
    """The issue's hang: every record of a cached source lost its image after the cost pass."""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + 8 * i, 30), (200, 10 * i, 10)).save(root / f"{i}.png")
    path = root / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"shape {i} {IMAGE_MARKER}", "images": [f"{i}.png"]}) + "\n"
                            for i in range(3)))
    data = CPTData([f"{path}:50"], proc, max_len=256, budget=300, cache_dir=str(tmp_path / "cache"), progress=False)
    for i in range(3):
        os.remove(root / f"{i}.png")
    with pytest.raises(DataError, match=f"source {path}: none of its 3 records loads any more"):
        for k in range(len(data)):  # a bin holds at least one item: 50 bins cannot all be skipped
            data.micro_batch(k)
    assert data.runtime_bad == 3
    # built again on the same cache: the cache sees the images changed, and no record is usable
    with pytest.raises(DataError, match=f"source {path}: none of its 3 records is usable"):
        CPTData([str(path)], proc, max_len=256, budget=300, cache_dir=str(tmp_path / "cache"), progress=False)


# ---------------------------------------------------------------------------------- item 6
def test_checkpoint_permissions_follow_the_umask(tmp_path):
    from moca.config import ModelConfig, VisionConfig
    from moca.model import MoCaModel

    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, mrope_section=(2, 3, 3),
                      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                                          out_hidden_size=32, fullatt_block_indexes=(0,)))
    model = MoCaModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    extra = {"state.safetensors": lambda p: save_file({"x": torch.zeros(3)}, p)}
    for umask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        old = os.umask(umask)
        try:
            out = tmp_path / f"ckpt-{umask:o}"
            save_model(model, str(out), extra_files=extra)
        finally:
            os.umask(old)
        assert os.stat(out).st_mode & 0o777 == dir_mode
        modes = {n: os.stat(out / n).st_mode & 0o777 for n in os.listdir(out)}
        assert set(modes) == {"model.safetensors", "config.json", "state.safetensors"}
        assert set(modes.values()) == {file_mode}, modes


# ---------------------------------------------------------------------------------- item 7
def test_bad_records_of_a_jsonl_folder_are_reported_as_file_and_line(proc, tmp_path, caplog):
    path, bad = write_bad_jsonl(tmp_path / "src")
    lines = open(path).read().splitlines()
    folder = tmp_path / "src"
    os.remove(path)
    # a.jsonl: records 0-5 with a blank line after each pair; b.jsonl: a blank first line, then the rest
    a = [x for k in range(0, 6, 2) for x in (lines[k], lines[k + 1], "")]
    (folder / "a.jsonl").write_text("\n".join(a) + "\n")
    (folder / "b.jsonl").write_text("\n" + "\n".join(lines[6:]) + "\n")
    where = {3: f"{folder / 'a.jsonl'}:5", 5: f"{folder / 'a.jsonl'}:8",
             7: f"{folder / 'b.jsonl'}:3", 10: f"{folder / 'b.jsonl'}:6"}
    assert sorted(where) == sorted(bad)
    with caplog.at_level(logging.WARNING, logger="moca"):
        data = CPTData([str(folder)], proc, max_len=256, budget=600, cache_dir=str(tmp_path / "cache"), progress=False)
    assert sorted(data.bad[str(folder)]) == sorted(bad)
    for i, loc in where.items():
        assert f"bad record: {loc}: " in caplog.text, loc
    assert "index=" not in caplog.text
    assert np.all(data.costs > 0)


def test_loader_workers_give_the_same_run_and_bring_back_what_broke(proc, tmp_path):
    """Micro-batches prepared by forked loader workers (the default on CUDA) train exactly as in-process ones, and
    the records a worker found broken (their images gone after the cost pass) reach the main process's count."""
    from engine.cpt import CPTTask, MAEHead
    from engine.parallel import DistContext
    from engine.trainer import TrainConfig, Trainer
    from test_cpt_masking import small_model

    path, _ = write_bad_jsonl(tmp_path / "src")
    build = lambda: CPTData([path], proc, max_len=256, budget=300,  # noqa: E731
                            cache_dir=str(tmp_path / "cache"), progress=False)
    datas = [build(), build()]
    steps = len(datas[0].epoch_bins(0)) // 2  # an epoch: every record drawn at least once
    for i in (0, 4):
        os.remove(tmp_path / "src" / f"img{i}.png")
    runs = []
    for workers, data in zip((0, 2), datas):
        model = small_model()
        task = CPTTask(model, proc, data, MAEHead(model, torch.Generator().manual_seed(1)))
        cfg = TrainConfig(str(tmp_path / f"run{workers}"), max_steps=steps, lr=1e-3, grad_accum=2, progress=False,
                          loader_workers=workers)
        runs.append([r["loss"] for r in Trainer(task, cfg, DistContext()).fit()])
        assert data.runtime_bad == 2, workers
    assert runs[0] == runs[1]
