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


@pytest.mark.parametrize("name", ["./no/such/checkpoint", "/no/such/dir", "13b"])
def test_nonexistent_directory_and_unknown_preset(name):
    """One message for both: a path is not called an unknown preset, nor a preset name a missing folder."""
    with pytest.raises(CheckpointError, match=f"^'{name}' is neither a checkpoint directory nor a preset "
                                              r"\(tiny, 3b, 7b\)$"):
        load_model(name)


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


def test_a_checkpoint_without_tokenizer_says_it_uses_the_embedded_one(hf_dir, caplog):
    """hf_dir holds config and weights only: the embedded tokenizer stands in, and the log says so."""
    assert not (hf_dir / "tokenizer.json").exists()
    with caplog.at_level("WARNING", logger="moca"):
        proc = Processor.from_pretrained(str(hf_dir))
    assert "has no tokenizer.json / vocab.json: using the embedded Qwen2 tokenizer" in caplog.text
    assert proc.tokenizer.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id


def test_save_over_existing_checkpoint_replaces_it(hf_dir, tmp_path):
    model = load_model(str(hf_dir))
    out = tmp_path / "ckpt"
    save_model(model, str(out))
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    save_model(model, str(out))
    assert torch.equal(load_model(str(out)).norm.weight, model.norm.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_save_reaches_the_disk_before_the_rename(hf_dir, tmp_path, monkeypatch):
    """Crash safety: every file and the folder are fsynced before the rename that publishes them, the
    parent after it (else a power loss can leave a published checkpoint with empty files)."""
    model = load_model(str(hf_dir))
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(b)))
        real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "ckpt"
    save_model(model, str(out), processor=Processor.from_pretrained("tiny"))
    published = events.index(("rename", str(out)))
    synced = {os.path.basename(p) for kind, p in events[:published] if kind == "fsync"}
    assert set(os.listdir(out)) < synced and any(n.startswith(".tmp-ckpt") for n in synced)
    assert ("fsync", str(tmp_path)) in events[published:]


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


# ---------------------------------------------------------------- unreadable files (#13 item 8)
def _write_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors", "not a readable safetensors"),
        (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
         "model.safetensors", "not a readable safetensors"),
        (lambda p: (p / "config.json").write_text('{"model_type": "qwen2_5_vl",'), "config.json", "not valid JSON"),
        (lambda p: (p / "config.json").write_bytes(b'{"model_type": "\xff"}'), "config.json", "not valid JSON"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json", "expected a JSON object"),
        (lambda p: os.remove(p / "config.json"), "config.json", "no such file"),
        (lambda p: _write_config(p, lambda c: c.pop("vision_config")), "config.json", "missing field 'vision_config'"),
        (lambda p: _write_config(p, lambda c: c["vision_config"].pop("depth")), "config.json",
         "missing field 'vision_config.depth'"),
        (lambda p: _write_config(p, lambda c: (c.pop("hidden_size", None), c["text_config"].pop("hidden_size"))),
         "config.json", "missing field 'hidden_size'"),
        (lambda p: _write_config(p, lambda c: c["text_config"].update(num_attention_heads="three")), "config.json",
         "field 'num_attention_heads' must be a positive integer, got 'three'"),
        (lambda p: _write_config(p, lambda c: c["text_config"].update(num_key_value_heads=2)), "config.json",
         "num_attention_heads must be a multiple of num_key_value_heads"),
    ],
    ids=["empty-st", "truncated-st", "bad-json", "not-utf8", "json-list", "no-config", "no-vision-config",
         "no-depth", "no-hidden-size", "ill-typed", "inconsistent"],
)
def test_unreadable_files_are_checkpoint_errors_naming_the_file(hf_dir, tmp_path, damage, file, message):
    path = _copy(hf_dir, tmp_path / "bad", None)
    (path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    damage(path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(str(path))
    assert str(path / file) in str(err.value)


def test_damaged_shard_index_and_shards_are_named(hf_dir, tmp_path):
    path = _shard(hf_dir, tmp_path / "sharded")
    index = path / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(good[:-5])
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        load_model(str(path))
    assert str(index) in str(err.value)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="'weight_map' must map"):
        load_model(str(path))
    # the index places a tensor in a shard that does not hold it
    weight_map = json.loads(good)["weight_map"]
    name = "model.layers.2.mlp.down_proj.weight"
    elsewhere = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    index.write_text(json.dumps({"weight_map": {**weight_map, name: elsewhere}}))
    with pytest.raises(CheckpointError, match=f"{elsewhere}: has no tensor '{name}'"):
        load_model(str(path))
    index.write_text(good)
    (path / elsewhere).write_bytes((path / elsewhere).read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{elsewhere}: not a readable safetensors"):
        load_model(str(path))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_integer_tensor_is_refused(hf_dir, tmp_path, dtype):
    tensors = load_file(hf_dir / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=dtype)
    path = _copy(hf_dir, tmp_path / "bad", tensors)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{name}' is {dtype}, expected a floating"):
        load_model(str(path))


# ---------------------------------------------------------------- LM head and layouts (#13 items 12, 13)
def test_tied_config_with_a_different_stored_head_stays_untied_like_transformers(hf_dir, tmp_path, caplog):
    from transformers import Qwen2_5_VLForConditionalGeneration

    tensors = load_file(hf_dir / "model.safetensors")
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    path = _copy(hf_dir, tmp_path / "tied-but-own-head", tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)  # the oracle keeps the stored head
    assert torch.equal(hf.lm_head.weight, tensors["lm_head.weight"])
    with caplog.at_level("WARNING", logger="moca"):
        model = load_model(str(path))
    assert "kept untied" in caplog.text
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert torch.equal(model.embed_tokens.weight, tensors["model.embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert not model.config.tie_word_embeddings

    save_model(model, str(tmp_path / "resaved"))
    again = load_file(tmp_path / "resaved" / "model.safetensors")
    assert torch.equal(again["lm_head.weight"], tensors["lm_head.weight"])
    assert torch.equal(load_model(str(tmp_path / "resaved")).lm_head.weight, tensors["lm_head.weight"])


def test_tied_config_with_an_equal_stored_head_stays_tied(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    path = _copy(hf_dir, tmp_path / "tied-copy", tensors)
    save_file(tensors, path / "model.safetensors")
    model = load_model(str(path))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_bare_qwen2_5_vl_model_checkpoint_loads_and_embeds(tmp_path, tie, caplog):
    """`Qwen2_5_VLModel.save_pretrained`: `language_model.*` + `visual.*`, no lm_head."""
    from transformers import Qwen2_5_VLModel

    from hf_oracle import tiny_hf_config

    torch.manual_seed(5)
    cfg = tiny_hf_config(tie=tie)
    cfg._attn_implementation = cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "eager"
    bare = Qwen2_5_VLModel(cfg).eval()
    with torch.no_grad():
        for p in bare.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    bare.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("language_model.layers.") for k in keys) and "lm_head.weight" not in keys
    with caplog.at_level("WARNING", logger="moca"):
        model = load_model(str(tmp_path))
    assert ("copy of the input embeddings" in caplog.text) == (not tie)
    assert torch.equal(model.lm_head.weight, bare.language_model.embed_tokens.weight)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie

    proc = Processor(load_tokenizer(default_tokenizer_dir()), model.config, ImageConfig(4 * 784, 24 * 784))
    sample = proc.encode({"text": IMAGE_MARKER + "Represent the given image.", "images": [random_image(70, 50)]})
    with torch.no_grad():
        ours = model(proc.pack([sample]))
        ids = sample.input_ids[None]
        theirs = bare(input_ids=ids, mm_token_type_ids=(ids == 151655).int(), pixel_values=sample.patches,
                      image_grid_thw=torch.tensor(sample.grids)).last_hidden_state[0]
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5


def test_transformers_5_naming_loads_the_same_weights(hf_dir, tmp_path):
    tensors = load_file(hf_dir / "model.safetensors")
    v5 = {("model.language_model." + k[len("model."):] if k.startswith("model.") else "model." + k
           if k.startswith("visual.") else k): v for k, v in tensors.items()}
    path = _copy(hf_dir, tmp_path / "v5", v5)
    save_file(v5, path / "model.safetensors")
    assert _params_equal(load_model(str(hf_dir)), load_model(str(path)))
    # one weight under two namings is ambiguous, not silently one of them
    v5["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].clone()
    save_file(v5, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="are the same weight"):
        load_model(str(path))


def test_not_a_qwen_checkpoint(hf_dir, tmp_path):
    path = _copy(hf_dir, tmp_path / "other", None)
    save_file({"encoder.weight": torch.zeros(2, 2)}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a Qwen2.5-VL checkpoint.*found encoder.weight"):
        load_model(str(path))


def test_rope_inv_freq_stays_fp32_in_bf16_like_transformers(hf_dir):
    """transformers' from_pretrained(dtype=bf16) keeps both RoPE inv_freq buffers fp32; ours must too, through
    load_model and a later .to(bf16) (rounded to bf16 they move rotary angles by radians at long distances)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.bfloat16)
    ours = load_model(str(hf_dir), dtype=torch.bfloat16)
    again = load_model(str(hf_dir)).to(torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    for theirs, path in ((hf.model.language_model.rotary_emb.inv_freq, "inv_freq"),
                         (hf.model.visual.rotary_pos_emb.inv_freq, "visual.inv_freq")):
        assert theirs.dtype == torch.float32
        for model in (ours, again):
            mine = model.get_buffer(path)
            assert mine.dtype == torch.float32
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0)


def test_save_in_bf16_stores_bf16_and_transformers_loads_it_as_bf16(hf_dir, tmp_path):
    """save_model(dtype=bf16): every stored tensor is the fp32 weight rounded once to bf16, and config.json's dtype
    says so, so that transformers' dtype="auto" loads it in bf16 (not upcast to fp32)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from moca.checkpoint import canonical_name

    model = load_model(str(hf_dir))
    out = tmp_path / "bf16"
    save_model(model, str(out), dtype=torch.bfloat16)
    fp32 = {canonical_name(k): v for k, v in load_file(hf_dir / "model.safetensors").items()}  # transformers' save
    stored = load_file(out / "model.safetensors")
    assert stored and set(stored) <= set(fp32)
    for name, t in stored.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, fp32[name].to(torch.bfloat16)), name
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}


def test_loading_our_checkpoint_prints_no_transformers_config_warnings(tmp_path):
    """Our config.json keeps a top-level rope_scaling for transformers 4.x beside 5.x's text_config; transformers 5
    warns about it (once a process) when the tokenizer loads, which reads the config it then does not use."""
    import subprocess
    import sys

    model = load_model("tiny", dtype=torch.float32)
    save_model(model, str(tmp_path / "ckpt"), processor=Processor.from_pretrained("tiny"))
    load = f"from moca import Processor; Processor.from_pretrained({str(tmp_path / 'ckpt')!r})"
    run = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "rope" not in run.stderr and "[transformers]" not in run.stderr, run.stderr
