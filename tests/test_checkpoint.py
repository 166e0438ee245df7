"""Checkpoint I/O: shards, ties, clear errors, atomic saves that transformers loads back."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_oracle import hf_hidden, random_image, tiny_hf_model
from moca import Processor, load_model, save_model
from moca.checkpoint import CheckpointError
from moca.image import ImageConfig
from moca.processor import IMAGE_MARKER, default_tokenizer_dir, load_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model(seed=3).save_pretrained(path)
    return path


def _copy(src, dst, tensors):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _shard(src, dst, n=3):
    """Re-save `src` as n shards with an index, the way large HF checkpoints come."""
    tensors = load_file(src / "model.safetensors")
    _copy(src, dst, tensors)
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, dst / shard)
        weight_map.update({k: shard for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _params_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sharded_equals_single_file(hf_dir, tmp_path):
    single = load_model(str(hf_dir))
    sharded = load_model(str(_shard(hf_dir, tmp_path / "sharded")))
    assert _params_equal(single, sharded)


def test_tied_embeddings_share_storage(hf_dir):
    model = load_model(str(hf_dir))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.embed_tokens.weight


def test_untied_checkpoint_loads_its_lm_head(tmp_path):
    hf = tiny_hf_model(seed=4, tie=False)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)


def test_missing_shard_is_named(hf_dir, tmp_path):
    path = _shard(hf_dir, tmp_path / "broken")
    os.remove(path / "model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_model(str(path))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing weight 'model.layers.1.mlp.up_proj.weight'"),
        (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 96)}), "k_proj.weight' has shape \\(64, 96\\)"),
        (lambda t: t.update({"visual.blocks.0.attn.extra.weight": torch.zeros(2)}), "unexpected weight.*attn.extra.weight"),
    ],
    ids=["missing", "wrong-shape", "unexpected"],
)
def test_bad_checkpoint_errors_name_the_weight(hf_dir, tmp_path, edit, message):
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    path = _copy(hf_dir, tmp_path / "bad", tensors)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_model(str(path))


def test_nonexistent_directory_and_unknown_preset():
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("./no/such/checkpoint")
    with pytest.raises(ValueError, match="unknown preset"):
        load_model("13b")


def test_save_loads_in_transformers_and_back(hf_dir, tmp_path):
    """Our saved checkpoint: transformers loads it and computes what our model computes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = load_model(str(hf_dir))
    proc = Processor(load_tokenizer(default_tokenizer_dir()), model.config, ImageConfig(4 * 784, 24 * 784))
    out = tmp_path / "saved"
    save_model(model, str(out), processor=proc)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (out / f).exists(), f
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.text_config.is_causal is False
    sample = proc.encode({"text": IMAGE_MARKER + "Represent the given image.", "images": [random_image(70, 50)]})
    with torch.no_grad():
        ours = model(proc.pack([sample]))
    theirs = hf_hidden(hf, sample)
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5

    again = load_model(str(out))
    assert _params_equal(model, again)
    assert Processor.from_pretrained(str(out)).image_config == proc.image_config


def test_failed_save_leaves_nothing_behind(hf_dir, tmp_path):
    model = load_model(str(hf_dir))
    out = tmp_path / "ckpt"

    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, str(out), extra_files={"state.pt": boom})
    assert os.listdir(tmp_path) == []


def test_save_over_existing_checkpoint_replaces_it(hf_dir, tmp_path):
    model = load_model(str(hf_dir))
    out = tmp_path / "ckpt"
    save_model(model, str(out))
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    save_model(model, str(out))
    assert torch.equal(load_model(str(out)).norm.weight, model.norm.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_presets_have_published_shapes():
    from moca.config import ModelConfig

    b3, b7 = ModelConfig.from_name("3b"), ModelConfig.from_name("7b")
    assert (b3.hidden_size, b3.num_hidden_layers, b3.num_attention_heads, b3.num_key_value_heads) == (2048, 36, 16, 2)
    assert (b3.intermediate_size, b3.vocab_size, b3.tie_word_embeddings) == (11008, 151936, True)
    assert (b7.hidden_size, b7.num_hidden_layers, b7.num_attention_heads, b7.num_key_value_heads) == (3584, 28, 28, 4)
    assert (b7.intermediate_size, b7.vocab_size, b7.tie_word_embeddings) == (18944, 152064, False)
    for c in (b3, b7):
        v = c.vision
        assert (v.depth, v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size) == (32, 1280, 16, 80, 3420)
        assert (v.window_size, v.fullatt_block_indexes, v.out_hidden_size) == (112, (7, 15, 23, 31), c.hidden_size)
        with torch.device("meta"):
            from moca.model import MoCaModel

            n = sum(p.numel() for p in MoCaModel(c).parameters())
        assert (3.5e9 if c is b3 else 8.0e9) < n < (4.0e9 if c is b3 else 8.5e9)
