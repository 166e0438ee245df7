"""The dtype-flow gate: CPT, CL and embedding steps in the exact dtype regime of the GPU path, on CPU.

On CUDA the engine trains under bf16 autocast (fp32 master weights) and embeds with bf16 weights,
through the Triton kernels. Here the same regime runs through Triton's interpreter (conftest turns it
on), so a dtype mismatch between kernels and model (e.g. rotary promoting q and k to fp32 while v stays
bf16 under autocast: the H200 crash at 64ccfab) fails on a CPU machine. Each run is checked against
the same run in fp32: bf16 rounding moves the loss by a few percent at most.
"""

import json

import pytest
import torch

from engine.train import main
from kernels._backend import interpreter_enabled
from moca import Processor
from moca.processor import IMAGE_MARKER
from moca.checkpoint import load_model
from moca.embed import embed_items
from moca.layers import Attention

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="CPU gate: the GPU runs the real thing")


def _first_step(out) -> dict:
    with open(out / "metrics.jsonl") as f:
        return json.loads(f.readline())


def test_attention_under_autocast_takes_mixed_q_k_v():
    """What the model hands attention under autocast: fp32 q, k (rotary) and a bf16 v."""
    attn = Attention(64, 4, 2, qkv_bias=True, out_bias=False)
    x = torch.randn(11, 64)
    cos, sin = torch.ones(11, 16), torch.zeros(11, 16)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, cos, sin, cu, 7, backend="triton")
    ref = attn(x, cos, sin, cu, 7, backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("stage", ["cpt", "cl"])
def test_train_step_bf16_autocast_through_triton(tmp_path, stage):
    def run(precision):
        out = tmp_path / f"{stage}-{precision}"
        common = ["--model", "tiny", "--output-dir", str(out), "--max-steps", "1", "--grad-accum", "1",
                  "--attn-backend", "triton", "--precision", precision, "--no-progress", "--lr", "1e-4"]
        if stage == "cpt":
            main(["cpt", *common, "--data", "synthetic:6", "--max-len", "200", "--budget", "400",
                  "--cache-dir", str(tmp_path / "cache"), "--workers", "1"])
        else:  # a JSONL data set, not `synthetic:` (whose before/after eval would run 400 embeddings here)
            main(["cl", *common, "--data", str(_cl_jsonl(tmp_path)), "--batch-size", "4"])
        return _first_step(out)

    bf16, fp32 = run("bf16"), run("fp32")
    for k in ("loss", "grad_norm"):
        assert torch.isfinite(torch.tensor(bf16[k])), (k, bf16[k])
    assert abs(bf16["loss"] - fp32["loss"]) <= 0.05 * abs(fp32["loss"]), (bf16["loss"], fp32["loss"])


def _cl_jsonl(tmp_path):
    """Eight text-to-text pairs with one hard negative each, in the MMEB-train record layout."""
    path = tmp_path / "cl.jsonl"
    if not path.exists():
        words = ["red", "green", "blue", "black", "white", "pink", "gray", "gold"]
        rows = [{"qry": f"a {w} circle", "pos_text": f"the circle is {w}", "neg_text": f"the circle is {words[i - 1]}"}
                for i, w in enumerate(words)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_embed_bf16_weights_through_triton():
    """The GPU embedding regime (bf16 weights, Triton attention) against fp32 with the torch reference."""
    proc = Processor.from_pretrained("tiny")
    items = [{"text": "a red circle on blue"}, {"text": IMAGE_MARKER + " what colour?", "images": [_image()]},
             {"text": "", "images": [_image(1)]}]
    ref_model = load_model("tiny", dtype=torch.float32)
    ref_model.attn_backend = "torch"
    model = load_model("tiny", dtype=torch.bfloat16)
    model.attn_backend = "triton"
    ref = embed_items(ref_model, proc, items)
    got = embed_items(model, proc, items)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    cos = (got * ref).sum(-1)
    assert cos.min() > 0.99, cos


def _image(seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(56, 84, 3, generator=g) * 255).to(torch.uint8).numpy())



def test_pinned_batches_keep_every_tensor(monkeypatch):
    """The trainer pins micro-batches on CUDA. CPU-only torch has no pinned allocator, so pinning is a
    tracked copy here: every tensor of a CPT and a CL micro-batch must go through it and come back equal."""
    from dataclasses import fields, is_dataclass

    from engine import synthetic
    from engine.cl import CLMicroBatch, pack_micro_batch
    from engine.cl_data import RankBatch
    from engine.masking import add_mask_token, mask_batch, mask_generator, special_token_ids

    pinned = set()

    def fake_pin(t):
        out = t.clone()
        pinned.add(id(out))
        return out

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, list):
            for v in x:
                yield from tensors(v)
        elif is_dataclass(x):
            for f in fields(x):
                yield from tensors(getattr(x, f.name))

    proc = Processor.from_pretrained("tiny")
    model_cfg = load_model("tiny").config
    samples = [proc.encode(synthetic.record(0, i)) for i in range(3)]
    cpt = mask_batch(proc.pack(samples), special_token_ids(proc.tokenizer, model_cfg), add_mask_token(proc.tokenizer),
                     mask_generator(0, 0, 0))
    cl = pack_micro_batch(RankBatch("s", [0], samples[:1], samples[1:2], [samples[2:]]), proc, chunk=2)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    for mb in (cpt, cl):
        before, after = list(tensors(mb)), list(tensors(mb.pin_memory()))
        assert len(before) == len(after) >= 5
        assert all(id(t) in pinned for t in after)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert isinstance(cl.pin_memory(), CLMicroBatch)


def _loss_inputs(name):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "infonce":
        q, t = torch.nn.functional.normalize(r(37, 64), dim=-1), torch.nn.functional.normalize(r(37, 64), dim=-1)
        return (q, t, torch.nn.functional.normalize(r(37, 2, 64), dim=-1)), ()
    if name == "lm":
        return (r(29, 64), r(300, 64) * 0.1), (torch.randint(0, 300, (29,), generator=g),)
    return (r(13, 64), r(4704, 64) * 0.02, r(4704) * 0.01), (r(13, 4704),)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["infonce", "lm", "patch"])
def test_losses_keep_their_precision_under_autocast(name, backend):
    """The trainer computes the losses, and calls backward, inside bf16 autocast: fp32 inputs must still get
    the fp32 maths (autocast would run the losses' fp32 matmuls and accumulations in bf16: InfoNCE's gradients
    were 1e-3 (Triton) to 3e-2 (torch) off)."""
    from kernels import infonce, masked_lm_loss, masked_patch_loss

    fn = {"infonce": lambda q, t, n: infonce(q, t, n, 0.03, backend=backend),
          "lm": lambda h, w, y: masked_lm_loss(h, w, y, backend=backend),
          "patch": lambda h, w, b, y: masked_patch_loss(h, w, b, y, backend=backend)}[name]
    leaves, rest = _loss_inputs(name)

    def run():
        xs = [x.clone().requires_grad_() for x in leaves]
        loss = fn(*xs, *rest)
        return [loss.detach(), *torch.autograd.grad(loss, xs)]

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = run()
    for a, b in zip(plain, under):
        assert b.dtype == a.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
