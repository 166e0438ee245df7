"""`python -m engine.train cpt` end to end on a small model: exact resume, two gloo ranks against one
process, a source with bad records, and the final checkpoint in moca and in transformers."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from engine import synthetic
from engine.cpt import MAE_HEAD_FILE, MAEHead
from engine.train import main
from hf_oracle import hf_hidden
from moca import Processor
from moca.checkpoint import load_model, save_model
from moca.config import ModelConfig, VisionConfig
from moca.model import MoCaModel
from test_cpt_data import write_bad_jsonl
from spawn_ranks import free_port, run_ranks

PARTS = ("loss", "mlm_loss", "mae_loss", "lr", "grad_norm", "tokens", "samples")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small random checkpoint (real vocabulary, tiny image settings) and a shared cost cache; the module's
    runs write ~1.3 GB under it (checkpoints, optimizer states), removed when the module ends."""
    root = tmp_path_factory.mktemp("cpt")
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, mrope_section=(4, 6, 6),
                      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                                          out_hidden_size=64, fullatt_block_indexes=(0,)))
    model = MoCaModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    save_model(model, str(root / "init"), processor=Processor.from_pretrained("tiny"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def args(workdir, out, steps, *extra):
    return ["cpt", "--model", str(workdir / "init"), "--data", "synthetic:48", "--output-dir", str(out),
            "--max-steps", str(steps), "--max-len", "256", "--budget", "600", "--lr", "1e-3", "--warmup-ratio", "0.25",
            "--grad-accum", "1", "--attn-backend", "torch", "--cache-dir", str(workdir / "cache"), "--no-progress",
            "--workers", "2", *extra]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    return {**load_file(os.path.join(path, "model.safetensors")),
            **{"mae." + k: v for k, v in load_file(os.path.join(path, MAE_HEAD_FILE)).items()}}


@pytest.fixture(scope="module")
def full_run(workdir):
    out = workdir / "full"
    main(args(workdir, out, 4, "--save-every", "2"))
    return out


def test_run_writes_metrics_checkpoints_and_plot(full_run):
    rows = metrics(full_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert set(PARTS) <= set(r) and r["tokens"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
        assert abs(r["loss"] - (r["mlm_loss"] + 0.1 * r["mae_loss"])) < 1e-4 * r["loss"]
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"]
    assert sorted(os.listdir(full_run)) == [".lock", "checkpoint-2", "final", "loss_curve.png", "metrics.jsonl"]
    from PIL import Image

    assert Image.open(full_run / "loss_curve.png").size[1] == 3 * 300


def test_resume_reproduces_the_uninterrupted_run(workdir, full_run):
    """The state a run killed after step 2 leaves behind is checkpoint-2: resume from it alone."""
    out = workdir / "resumed"
    os.makedirs(out)
    shutil.copytree(full_run / "checkpoint-2", out / "checkpoint-2")
    main(args(workdir, out, 4, "--save-every", "2", "--resume"))
    ref, got = metrics(full_run)[2:], metrics(out)
    assert [r["step"] for r in got] == [3, 4]
    for a, b in zip(ref, got):
        assert {k: a[k] for k in PARTS} == {k: b[k] for k in PARTS}
    wa, wb = weights(full_run / "final"), weights(out / "final")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    w2 = weights(full_run / "checkpoint-2")
    assert not all(torch.equal(wa[k], w2[k]) for k in wa)  # steps 3-4 did change the weights


def test_final_checkpoint_loads_in_moca_and_transformers(workdir, full_run):
    from transformers import Qwen2_5_VLForConditionalGeneration

    final = str(full_run / "final")
    model = load_model(final)
    model.attn_backend = "torch"
    init = load_model(str(workdir / "init"))
    assert not torch.equal(model.layers[0].mlp.down_proj.weight, init.layers[0].mlp.down_proj.weight)
    proc = Processor.from_pretrained(final)
    assert proc.tokenizer.convert_tokens_to_ids("<|mask|>") == 151669
    assert os.path.exists(os.path.join(final, "preprocessor_config.json"))
    head = MAEHead(model)
    head.load_state_dict(load_file(os.path.join(final, MAE_HEAD_FILE)))  # strict: every head tensor is there

    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(final, output_loading_info=True,
                                                                   attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sample = proc.encode({"text": "a <|mask|> " + synthetic.record(0, 1)["text"],
                          "images": synthetic.record(0, 1)["images"]})
    ours = model(proc.pack([sample]))
    theirs = hf_hidden(hf.eval(), sample)
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-4, atol=1e-4)


def _main_recording_grads(argv, out):
    """`main(argv)`, writing each step's full gradients (what the optimizer is handed) to out/grads-<step>.safetensors."""
    steps = []

    def hook(optimizer, *_):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in grads]  # FSDP: collective
        steps.append(len(steps) + 1)
        if int(os.environ.get("RANK", "0")) == 0:
            os.makedirs(out, exist_ok=True)
            save_file({str(i): g.detach().contiguous() for i, g in enumerate(grads)},
                      os.path.join(out, f"grads-{steps[-1]}.safetensors"))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        main(argv)
    finally:
        handle.remove()


def _rank(rank, world, port, argv, out):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    _main_recording_grads(argv, out)


@pytest.fixture(scope="module")
def one_process(workdir):
    out = workdir / "one"
    _main_recording_grads(args(workdir, out, 2, "--grad-accum", "2"), workdir / "one-grads")
    return out


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_gloo_ranks_equal_one_process_with_the_combined_batch(workdir, one_process, mode):
    """2 ranks x 1 micro-batch and 1 process x 2 micro-batches see the same bins and masks, so the same
    losses and the same gradients. Post-Adam weights are not compared at rounding tolerance: Adam divides
    by sqrt(v) + eps, which turns rounding noise on near-zero gradients into lr-sized moves."""
    port = free_port()
    out = workdir / mode
    argv = args(workdir, out, 2, "--grad-accum", "1", "--parallel", mode)
    run_ranks(_rank, (2, port, argv, workdir / f"{mode}-grads"))
    a, b = metrics(out), metrics(one_process)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"] and ra["samples"] == rb["samples"]
        for k, rtol in (("loss", 1e-5), ("mlm_loss", 1e-5), ("mae_loss", 1e-5), ("grad_norm", 1e-4)):
            # the norm is summed in fp32 over parameters (FSDP: over shards, then ranks): its order differs
            assert abs(ra[k] - rb[k]) <= rtol * abs(rb[k]), (k, ra[k], rb[k])
    for step in (1, 2):
        ga = load_file(str(workdir / f"{mode}-grads" / f"grads-{step}.safetensors"))
        gb = load_file(str(workdir / "one-grads" / f"grads-{step}.safetensors"))
        assert ga.keys() == gb.keys() and len(ga) > 10
        scale = max(float(g.abs().max()) for g in gb.values())
        for k in gb:  # fp32 sums in another order (all-reduce vs accumulation): rounding, relative to the largest
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-5 * scale, msg=f"step {step} grad {k}")
    wa, init = weights(out / "final"), load_file(str(workdir / "init" / "model.safetensors"))
    assert max(float((wa[k] - init[k]).abs().max()) for k in init) > 1e-4  # a real update (lr 1e-3)


def test_bad_records_train_on_the_good_ones(workdir, capsys, caplog):
    path, bad = write_bad_jsonl(workdir / "badsrc")
    out = workdir / "bad"
    argv = args(workdir, out, 2)
    argv[argv.index("--data") + 1] = path
    main(argv)
    printed = capsys.readouterr().out
    assert f"({len(bad)} bad records skipped" in printed
    rows = metrics(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert os.path.isdir(out / "final")


@pytest.mark.parametrize("accum, epochs, steps", [(1, None, 5), (2, None, 3), (1, 1.5, 8)])
def test_epochs_set_the_run_length(workdir, tmp_path, accum, epochs, steps):
    """No --max-steps: --epochs (default 1, as the release) passes over the data. Five text records of over 16
    tokens at max_len 16 each cost the cap, 16, so a budget of 16 packs one a micro-batch: 5 micro-batches an
    epoch, `accum` of them an optimizer step."""
    src = tmp_path / "five.jsonl"
    src.write_text("".join(json.dumps({"text": f"record {i}: " + "many words here " * 8, "images": []}) + "\n"
                           for i in range(5)))
    argv = args(workdir, tmp_path / "run", 0, "--max-len", "16", "--budget", "16", "--grad-accum", str(accum))
    argv[argv.index("--data") + 1] = str(src)
    del argv[argv.index("--max-steps"):argv.index("--max-steps") + 2]
    main(argv + ([] if epochs is None else ["--epochs", str(epochs)]))
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, steps + 1))
    assert [r["samples"] for r in metrics(tmp_path / "run")][:2] == [accum, accum]
    with pytest.raises(SystemExit, match="not both"):
        main(args(workdir, tmp_path / "both", 2, "--epochs", "1"))
