"""The embedding API and `python -m moca.embed`: batched equals one-at-a-time, files written whole."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_oracle import random_image
from moca import Processor, load_model
from moca.embed import embed_items, main

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
