"""Our packed model against transformers' own Qwen2.5-VL (bidirectional) on tiny random configs."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_oracle import hf_hidden, random_image, tiny_hf_model
from moca import Processor, load_model
from moca.image import ImageConfig
from moca.processor import default_tokenizer_dir, load_tokenizer

SMALL_IMAGES = ImageConfig(min_pixels=4 * 28 * 28, max_pixels=40 * 28 * 28)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_tokenizer_dir())


@pytest.fixture(scope="module", params=["v4", "v5"])
def pair(request, tmp_path_factory, tokenizer):
    """(transformers model, our model loaded from its checkpoint, processor), both key namings."""
    hf = tiny_hf_model(seed=1)
    path = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    hf.save_pretrained(path)  # transformers 5 saves the 4.x names (model.layers.*, visual.*)
    if request.param == "v5":  # its in-memory names: model.language_model.*, model.visual.*
        from safetensors.torch import save_file

        tensors = {k: v.clone() for k, v in hf.state_dict().items()}
        assert any(k.startswith("model.language_model.") for k in tensors)
        save_file(tensors, path / "model.safetensors")
    model = load_model(str(path))
    model.attn_backend = "torch"
    proc = Processor(tokenizer, model.config, SMALL_IMAGES)
    return hf, model, proc


def _inputs():
    marker = "<|vision_start|><|image_pad|><|vision_end|>"
    return {
        "text only": {"text": "A cat and a dog sit on a mat."},
        "one image": {"text": marker + "Represent the given image.\n", "images": [random_image(56, 84, 1)]},
        "two images interleaved": {
            "text": "First " + marker + " then some text " + marker + " and more.",
            "images": [random_image(100, 60, 2), random_image(60, 150, 3)],
        },
        "big odd image": {"text": marker + "What is in the image?", "images": [random_image(173, 97, 4)]},
    }


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(_inputs()))
def test_single_sample_matches_transformers(pair, name):
    hf, model, proc = pair
    sample = proc.encode(_inputs()[name])
    expected = hf_hidden(hf, sample)
    batch = proc.pack([sample])
    with torch.no_grad():
        hidden = model(batch)
        emb = model.embed(batch)
    assert hidden.shape == expected.shape
    assert _rel(hidden, expected) <= 1e-5
    ref_emb = F.normalize(expected.double().mean(0), dim=-1)
    assert torch.allclose(emb[0].double(), ref_emb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_batch_matches_transformers_sample_by_sample(pair, backend, monkeypatch):
    hf, model, proc = pair
    monkeypatch.setattr(model, "attn_backend", backend)  # triton runs through the interpreter on CPU
    items = list(_inputs().values())
    items = [items[2], items[0], items[1], items[3], items[0]]  # images of different sizes between texts
    samples = [proc.encode(it) for it in items]
    batch = proc.pack(samples)
    with torch.no_grad():
        hidden = model(batch)
        emb = model.embed(batch)
    bounds = batch.cu_seqlens.tolist()
    for i, sample in enumerate(samples):
        expected = hf_hidden(hf, sample)
        got = hidden[bounds[i] : bounds[i + 1]]
        assert _rel(got, expected) <= 1e-5, f"sample {i}"
        ref_emb = F.normalize(expected.double().mean(0), dim=-1)
        assert torch.allclose(emb[i].double(), ref_emb, atol=1e-6, rtol=1e-5), f"sample {i}"


def test_unnormalised_embedding_is_the_plain_token_mean(pair):
    """normalize=False (TEI's normalize: false) returns the mean itself: sum over the sample's tokens / its length,
    against transformers' hidden states (a per-sample scale, e.g. / (T - 1), vanishes only after L2 normalising)."""
    hf, model, proc = pair
    samples = [proc.encode(_inputs()["one image"]), proc.encode(_inputs()["text only"])]
    with torch.no_grad():
        got = model.embed(proc.pack(samples), normalize=False)
    for i, sample in enumerate(samples):
        expected = hf_hidden(hf, sample).double().mean(0)
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_batch_invariance(pair):
    """A sample's embedding does not depend on what else is in the batch."""
    _, model, proc = pair
    items = list(_inputs().values())
    target = items[1]
    alone = model.embed(proc([target]))
    crowded = model.embed(proc([items[2], items[0], target, items[3]]))
    assert (alone[0] - crowded[2]).abs().max().item() <= 1e-6


def test_bf16_runs_close_to_fp32(pair):
    _, model, proc = pair
    batch = proc(list(_inputs().values()))
    with torch.no_grad():
        ref = model.embed(batch)
    low = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        got = low.embed(batch)
    cos = (got * ref).sum(-1)
    assert got.dtype == torch.float32
    assert cos.min().item() > 0.99
