"""The embedding API and `python -m moca.embed`: batched equals one-at-a-time, files written whole."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_oracle import random_image
from moca import Processor, load_model
from moca.embed import embed_items, item_cost, main, sample_cost
from moca.image import ImageError

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny")
    model.attn_backend = "torch"
    return model, Processor.from_pretrained("tiny")


def _items():
    return [
        {"text": "a short text"},
        {"text": MARKER + "Represent the given image.\n", "images": [random_image(200, 120, 1)]},
        {"text": "a much longer text " * 30},
        {"text": "two " + MARKER + " images " + MARKER, "images": [random_image(60, 60, 2), random_image(90, 300, 3)]},
        {"text": "x"},
    ]


def test_batched_equals_one_at_a_time(tiny):
    model, proc = tiny
    items = _items()
    # A small budget forces several micro-batches in cost order, not input order.
    batched = embed_items(model, proc, items, batch_tokens=300)
    single = torch.cat([model.embed(proc([it])) for it in items])
    assert batched.shape == (len(items), model.config.hidden_size)
    assert (batched - single).abs().max().item() <= 1e-6
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(items)), atol=1e-6)


def test_workers_and_item_limit_equal_one_at_a_time(tiny, tmp_path):
    model, proc = tiny
    random_image(97, 131, 7).save(tmp_path / "p.png")
    buf = tmp_path / "b.jpg"
    random_image(57, 29, 8).save(buf)
    items = _items() + [
        {"text": MARKER + "a path", "images": [str(tmp_path / "p.png")]},
        {"text": "<image> bytes", "images": [buf.read_bytes()]},
        {"images": [{"path": str(tmp_path / "p.png")}]},
    ]
    single = torch.cat([model.embed(proc([it])) for it in items])
    # DataLoader workers decode and pack; at most 2 inputs per micro-batch
    batched = embed_items(model, proc, items, batch_tokens=700, num_workers=2, max_items=2)
    assert (batched - single).abs().max().item() <= 1e-6


def test_item_cost_matches_the_encoded_sample_without_decoding(tiny, tmp_path):
    model, proc = tiny
    random_image(173, 97, 9).save(tmp_path / "c.png")
    items = _items() + [{"text": "<|image_1|> phi marker", "images": [str(tmp_path / "c.png")]},
                        {"images": [{"bytes": (tmp_path / "c.png").read_bytes()}]}]
    assert [item_cost(proc, it) for it in items] == [sample_cost(proc.encode(it)) for it in items]
    # a missing file is named before any pixel is decoded
    with pytest.raises(ImageError, match="nope.png"):
        embed_items(model, proc, [{"text": "fine"}, {"text": MARKER, "images": [str(tmp_path / "nope.png")]}])
    with pytest.raises(ValueError, match="names 1 image"):
        item_cost(proc, {"text": MARKER, "images": []})


def test_cli_jsonl_writes_npy_and_safetensors(tiny, tmp_path, capsys):
    model, proc = tiny
    random_image(80, 120, 5).save(tmp_path / "a.png")
    lines = [{"text": "hello world"}, {"text": MARKER + "Represent the given image.", "images": ["a.png"]}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "vec.npy"
    main(["--jsonl", str(tmp_path / "in.jsonl"), "--output", str(out), "--device", "cpu"])
    npy = np.load(out)
    st = load_file(tmp_path / "vec.safetensors")["embeddings"]
    items = [{"text": "hello world"}, {"text": lines[1]["text"], "images": [str(tmp_path / "a.png")]}]
    expected = embed_items(model, proc, items)
    assert np.allclose(npy, expected.numpy(), atol=1e-5) and torch.equal(torch.from_numpy(npy), st)
    table = capsys.readouterr().out
    assert "in.jsonl:1" in table and "1.0000" in table


def test_cli_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="in.jsonl:2"):
        main(["--jsonl", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "v.npy")])
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.gpu
def test_cuda_bf16_pinned_workers_path_matches_fp32():
    """The CUDA path (bf16, Triton attention, pinned non-blocking copies, workers) against fp32 one at a time."""
    proc = Processor.from_pretrained("tiny")
    ref_model = load_model("tiny", device="cuda", dtype=torch.float32)
    model = load_model("tiny", device="cuda", dtype=torch.bfloat16)
    items = _items() * 7  # many micro-batches, so the one-batch-late copy-back is exercised
    with torch.no_grad():
        ref = torch.cat([ref_model.embed(proc([it]).to("cuda")).cpu() for it in items])
        single = torch.cat([model.embed(proc([it]).to("cuda")).cpu() for it in items])
    batched = embed_items(model, proc, items, batch_tokens=300, num_workers=2)
    err_single = (single - ref).abs().max().item()
    assert (batched - ref).abs().max().item() <= 2 * err_single + 1e-3
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(items)), atol=1e-5)
