"""Checkpoint I/O: HF Qwen2.5-VL safetensors <-> MoCaModel, streamed tensor by tensor.

The weight-name mapping is a data table with `{i}` layer placeholders. Fused parameters
(`qkv_proj`, `gate_up_proj`) are filled slice by slice from HF's separate weights. Loading
builds the model on the meta device, materialises it empty on the target device and copies
each tensor once from `safe_open`: no second full copy of the weights. Every checkpoint
tensor must be consumed and every parameter filled, else the error names the culprits.
Every layout transformers loads for this architecture loads: 4.x (`model.layers.*`, `visual.*`,
as the released MoCa checkpoints), 5.x (`model.language_model.*`, `model.visual.*`) and the bare
`Qwen2_5_VLModel.save_pretrained` (`language_model.*`, `visual.*`, no `lm_head`); stored names are
rewritten to the 4.x naming per tensor, as transformers' own renaming rules do. We save the 4.x
naming, which transformers 4.x and 5.x both read.
LM head, as transformers: a config that ties but a stored `lm_head.weight` that differs from the
embeddings is kept untied (with a warning; re-saved untied). A checkpoint with no `lm_head` that
does not tie (a bare model) gets a copy of the input embeddings as its head, with a warning:
embedding never uses the head, and CPT then trains it from that tied-style start.
A file that cannot be read (not JSON, a truncated safetensors, a tensor missing from the shard its
index names, an integer tensor) is a CheckpointError naming the file and the tensor.
"""

import json
import logging
import os
import re
import secrets
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moca.config import PRESETS, CheckpointError, ModelConfig, read_json
from moca.model import MoCaModel

log = logging.getLogger("moca")

# (ours, [HF names in order of the slices], kind); "{T}" = text prefix, "{V}" = vision prefix.
WEIGHT_MAP = [
    ("embed_tokens.weight", ["{T}embed_tokens.weight"], "copy"),
    ("norm.weight", ["{T}norm.weight"], "copy"),
    ("lm_head.weight", ["lm_head.weight"], "copy"),
    ("layers.{i}.self_attn.qkv_proj.weight", ["{T}layers.{i}.self_attn.%s_proj.weight" % p for p in "qkv"], "cat"),
    ("layers.{i}.self_attn.qkv_proj.bias", ["{T}layers.{i}.self_attn.%s_proj.bias" % p for p in "qkv"], "cat"),
    ("layers.{i}.self_attn.o_proj.weight", ["{T}layers.{i}.self_attn.o_proj.weight"], "copy"),
    ("layers.{i}.mlp.gate_up_proj.weight", ["{T}layers.{i}.mlp.gate_proj.weight", "{T}layers.{i}.mlp.up_proj.weight"], "cat"),
    ("layers.{i}.mlp.down_proj.weight", ["{T}layers.{i}.mlp.down_proj.weight"], "copy"),
    ("layers.{i}.input_layernorm.weight", ["{T}layers.{i}.input_layernorm.weight"], "copy"),
    ("layers.{i}.post_attention_layernorm.weight", ["{T}layers.{i}.post_attention_layernorm.weight"], "copy"),
    ("visual.patch_embed.weight", ["{V}patch_embed.proj.weight"], "conv"),
    ("visual.blocks.{i}.norm1.weight", ["{V}blocks.{i}.norm1.weight"], "copy"),
    ("visual.blocks.{i}.norm2.weight", ["{V}blocks.{i}.norm2.weight"], "copy"),
    ("visual.blocks.{i}.attn.qkv_proj.weight", ["{V}blocks.{i}.attn.qkv.weight"], "copy"),
    ("visual.blocks.{i}.attn.qkv_proj.bias", ["{V}blocks.{i}.attn.qkv.bias"], "copy"),
    ("visual.blocks.{i}.attn.o_proj.weight", ["{V}blocks.{i}.attn.proj.weight"], "copy"),
    ("visual.blocks.{i}.attn.o_proj.bias", ["{V}blocks.{i}.attn.proj.bias"], "copy"),
    ("visual.blocks.{i}.mlp.gate_up_proj.weight", ["{V}blocks.{i}.mlp.gate_proj.weight", "{V}blocks.{i}.mlp.up_proj.weight"], "cat"),
    ("visual.blocks.{i}.mlp.gate_up_proj.bias", ["{V}blocks.{i}.mlp.gate_proj.bias", "{V}blocks.{i}.mlp.up_proj.bias"], "cat"),
    ("visual.blocks.{i}.mlp.down_proj.weight", ["{V}blocks.{i}.mlp.down_proj.weight"], "copy"),
    ("visual.blocks.{i}.mlp.down_proj.bias", ["{V}blocks.{i}.mlp.down_proj.bias"], "copy"),
    ("visual.merger.ln_q.weight", ["{V}merger.ln_q.weight"], "copy"),
    ("visual.merger.fc1.weight", ["{V}merger.mlp.0.weight"], "copy"),
    ("visual.merger.fc1.bias", ["{V}merger.mlp.0.bias"], "copy"),
    ("visual.merger.fc2.weight", ["{V}merger.mlp.2.weight"], "copy"),
    ("visual.merger.fc2.bias", ["{V}merger.mlp.2.bias"], "copy"),
]
NAMINGS = {  # prefixes per transformers generation
    "v4": {"T": "model.", "V": "visual."},
    "v5": {"T": "model.language_model.", "V": "model.visual."},
}
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
# Stored-name prefixes transformers accepts -> the 4.x naming we load by (first match wins).
LOAD_RENAMES = [
    (re.compile(r"^model\.language_model\."), "model."),  # 5.x ForConditionalGeneration
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^language_model\."), "model."),  # Qwen2_5_VLModel.save_pretrained
    (re.compile(r"^(embed_tokens|layers|norm)\."), r"model.\1."),  # the pre-4.52 bare text model
]


def _expand(cfg: ModelConfig, naming: str):
    """Yield (our name, [hf names], kind) for every parameter of a model with this config."""
    prefixes = NAMINGS[naming]
    for ours, hf, kind in WEIGHT_MAP:
        if ours.startswith("layers."):
            count = cfg.num_hidden_layers
        elif ours.startswith("visual.blocks."):
            count = cfg.vision.depth
        else:
            count = None
        for i in range(count) if count is not None else [None]:
            fmt = dict(prefixes, i=i)
            yield ours.format(i=i), [h.format(**fmt) for h in hf], kind


def _tied_skip(cfg: ModelConfig, ours: str) -> bool:
    return cfg.tie_word_embeddings and ours == "lm_head.weight"


# ---------------------------------------------------------------------------- loading
def _open(file: str):
    try:
        return safe_open(file, "pt")
    except Exception as e:  # SafetensorError (empty, truncated, bad header) or OSError
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


def canonical_name(stored: str) -> str:
    """A stored tensor name in any accepted layout -> its 4.x name."""
    for pattern, repl in LOAD_RENAMES:
        name, n = pattern.subn(repl, stored)
        if n:
            return name
    return stored


def _shard_index(path: str) -> dict[str, tuple[str, str]]:
    """4.x tensor name -> (shard file path, name stored in it); every shard opened and checked."""
    index_file = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_file):
        weight_map = read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
        missing = sorted({s for s in weight_map.values() if not os.path.exists(os.path.join(path, s))})
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}")
        stored = {k: os.path.join(path, s) for k, s in weight_map.items()}
        for shard in sorted(set(stored.values())):
            with _open(shard) as f:
                present = set(f.keys())
            absent = sorted(k for k, s in stored.items() if s == shard and k not in present)
            if absent:
                more = f" (+{len(absent) - 1} more)" if len(absent) > 1 else ""
                raise CheckpointError(f"{shard}: has no tensor {absent[0]!r}{more}, which {INDEX_NAME} places there")
    else:
        single = os.path.join(path, WEIGHTS_NAME)
        if not os.path.exists(single):
            raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        with _open(single) as f:
            stored = {k: single for k in f.keys()}
    index: dict[str, tuple[str, str]] = {}
    for name, shard in stored.items():
        ours = canonical_name(name)
        if ours in index:
            raise CheckpointError(f"{path}: {index[ours][1]!r} and {name!r} are the same weight ({ours!r})")
        index[ours] = (shard, name)
    if not any(k.startswith("model.layers.") for k in index):
        found = ", ".join(sorted(stored)[:4])
        raise CheckpointError(f"{path}: not a Qwen2.5-VL checkpoint: no decoder layer tensors "
                              f"('model.layers.*', 'model.language_model.layers.*' or 'language_model.layers.*'); "
                              f"found {found or 'no tensors'}")
    return index


@torch.no_grad()
def load_weights(model: MoCaModel, path: str) -> set[str]:
    """Fill `model` from the safetensors in `path`; returns the set of (4.x) names consumed.
    CheckpointError for a missing, unexpected, misshapen or non-float tensor."""
    index = _shard_index(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    handles: dict[str, object] = {}
    loaded = set()

    def read(name: str, shape: tuple, conv: bool = False) -> torch.Tensor:
        if name not in index:
            raise CheckpointError(f"{path}: missing weight {name!r}")
        shard, stored = index[name]
        if shard not in handles:
            handles[shard] = _open(shard)
        try:
            t = handles[shard].get_tensor(stored)
        except Exception as e:
            raise CheckpointError(f"{shard}: cannot read tensor {stored!r} ({e})") from e
        if not t.is_floating_point():
            raise CheckpointError(f"{shard}: tensor {stored!r} is {t.dtype}, expected a floating-point weight")
        if conv and t.ndim:
            t = t.reshape(t.shape[0], -1)  # the patch-embedding Conv3d is our Linear
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{shard}: weight {stored!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        loaded.add(name)
        return t

    try:
        for ours, hf_names, kind in _expand(model.config, "v4"):
            if ours == "lm_head.weight":
                continue  # after embed_tokens, below
            param = params[ours]
            targets = param.split(_split_sizes(model.config, ours)) if kind == "cat" else [param]
            for hf, target in zip(hf_names, targets):
                target.copy_(read(hf, target.shape, conv=kind == "conv"))
        _load_lm_head(model, path, index, read)
    finally:
        handles.clear()
    unexpected = sorted(index[k][1] for k in set(index) - loaded)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        raise CheckpointError(f"{path}: unexpected weight(s) not used by the model: {shown}")
    return loaded


def _load_lm_head(model: MoCaModel, path: str, index: dict, read) -> None:
    """The LM head as transformers resolves it (module docstring); embed_tokens is loaded already."""
    cfg, embed = model.config, model.embed_tokens.weight
    if "lm_head.weight" not in index:
        if not cfg.tie_word_embeddings:
            log.warning("%s: no lm_head.weight and tie_word_embeddings is false: the LM head starts as a copy of "
                        "the input embeddings (embedding does not use it; CPT trains it from there)", path)
            model.lm_head.weight.copy_(embed)
        return
    head = read("lm_head.weight", embed.shape)
    if cfg.tie_word_embeddings:
        if torch.equal(head, read("model.embed_tokens.weight", embed.shape)):  # compared in the stored dtype
            return
        log.warning("%s: config.json ties the word embeddings but the stored lm_head.weight differs from them: "
                    "kept untied, as transformers does (set tie_word_embeddings=false to silence this)", path)
        cfg.tie_word_embeddings = False
        model.lm_head.weight = nn.Parameter(torch.empty_like(embed))
    model.lm_head.weight.copy_(head)


def check_model_name(name_or_path: str) -> None:
    """CheckpointError unless `name_or_path` is an existing directory or a preset name: a CLI checks its
    --model with it before any other work."""
    if not os.path.isdir(name_or_path) and name_or_path not in PRESETS:
        raise CheckpointError(f"{name_or_path!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def load_model(name_or_path: str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> MoCaModel:
    """A preset name ("tiny", "3b", "7b": random weights drawn from `seed`) or an HF checkpoint directory,
    built on `device` in `dtype`, in eval mode. CheckpointError for anything else or an unreadable,
    incomplete or mismatched checkpoint (the message names the file and tensor)."""
    check_model_name(name_or_path)
    if os.path.isdir(name_or_path):
        config = ModelConfig.from_hf_config(name_or_path)
    else:
        config = ModelConfig.from_name(name_or_path)
    with torch.device("meta"):
        model = MoCaModel(config)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()  # to_empty from meta makes new Parameters, which unties (inv_freq: recomputed, fp32)
    if os.path.isdir(name_or_path):
        load_weights(model, name_or_path)
        log.info("loaded %s (%s)", name_or_path, dtype)
    else:
        # CUDA presets draw on the device: a 3B model's host-side init and copy would take ~20 s
        gen_device = "cuda" if torch.device(device).type == "cuda" else "cpu"
        model.init_weights(torch.Generator(gen_device).manual_seed(seed))
    return model.eval()


# ---------------------------------------------------------------------------- saving
def state_dict_hf(model: MoCaModel, naming: str = "v4") -> dict[str, torch.Tensor]:
    """Our parameters split back into HF names (views where possible, no copies)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for ours, hf_names, kind in _expand(model.config, naming):
        if _tied_skip(model.config, ours):
            continue
        p = params[ours].detach()
        if kind == "cat":
            sizes = _split_sizes(model.config, ours)
            for hf, part in zip(hf_names, p.split(sizes)):
                out[hf] = part
        elif kind == "conv":
            v = model.config.vision
            out[hf_names[0]] = p.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        else:
            out[hf_names[0]] = p
    return out


def _split_sizes(cfg: ModelConfig, ours: str) -> list[int]:
    if "qkv_proj" in ours:
        return [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
    inter = cfg.vision.intermediate_size if ours.startswith("visual.") else cfg.intermediate_size
    return [inter, inter]


def _make_temp_dir(parent: str, prefix: str) -> str:
    """A new, uniquely named folder with the umask's permissions (tempfile.mkdtemp makes it 0700)."""
    while True:
        tmp = os.path.join(parent, f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp)
            return tmp
        except FileExistsError:
            continue


def _follow_umask(folder: str, like: str) -> None:
    """Give every file in `folder` the mode of `like`, written by a plain open(): the umask's
    (safetensors writes 0600)."""
    mode = os.stat(like).st_mode & 0o777
    for name in os.listdir(folder):
        f = os.path.join(folder, name)
        if os.path.isfile(f):
            os.chmod(f, mode)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model: MoCaModel, path: str, processor=None, dtype: torch.dtype | None = None, extra_files=None) -> None:
    """Write an HF-layout checkpoint: a temp dir beside `path`, fsynced, then renamed into place.

    A new `path` appears by one rename: after a crash it is absent or complete. An existing `path` is
    first renamed to `path.old`, then replaced: a crash between the two renames leaves only `path.old`
    (engine.trainer.clean_run_dir puts it back; other callers must do so themselves).

    `processor` (moca.Processor) adds tokenizer files and preprocessor_config.json;
    `extra_files` maps file names to callables `fn(full_path)` that write more state.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = _make_temp_dir(parent, ".tmp-" + os.path.basename(path))
    try:
        tensors = {
            k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in state_dict_hf(model).items()
        }
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        hf_config = model.config.to_hf_config()
        hf_config["torch_dtype"] = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if processor is not None:
            processor.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(os.path.join(tmp, name))
        _follow_umask(tmp, like=os.path.join(tmp, "config.json"))
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        if os.path.exists(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
