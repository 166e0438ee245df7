"""Model configuration: one dataclass with named presets and HF `config.json` round-trips.

Presets `3b` and `7b` carry the published Qwen2.5-VL shapes (MOCA.md §1; 7b's vocab_size is its released
config's 152064); `tiny` keeps the real vocabulary and token ids but is small enough to train in minutes on a CPU.
`is_causal=False` (every decoder layer bidirectional) is MoCa's only architectural change.
Reading a checkpoint's JSON (`read_json`) raises `CheckpointError` naming the file and the key,
never a bare KeyError or JSONDecodeError.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file (and the tensor or key)."""


def read_json(path: str) -> dict:
    """The JSON object in `path`; CheckpointError naming the file if it is missing, not JSON or not an object."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


@dataclass
class VisionConfig:
    """The Qwen2.5-VL vision tower (MOCA.md §1). patch_size and window_size in pixels; blocks in
    fullatt_block_indexes attend over the whole image, the others within windows."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # one raw patch: 3 * 2 * 14 * 14 = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class ModelConfig:
    """The decoder and its vision tower; defaults are the 3b preset. ValueError (from __post_init__) when the
    heads, mrope_section (sums to head_dim / 2) or vision.out_hidden_size do not fit hidden_size."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    is_causal: bool = False
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    pad_token_id: int = 151643
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        self.mrope_section = tuple(self.mrope_section)
        self.vision.fullatt_block_indexes = tuple(self.vision.fullatt_block_indexes)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.vision.hidden_size % self.vision.num_heads or self.vision.head_dim % 4:
            raise ValueError("vision head_dim must be an integer multiple of 4 (2-D rotary)")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError("vision.out_hidden_size must equal the LLM hidden_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """The preset `name` ("tiny", "3b", "7b"); ValueError for any other name."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)} or a checkpoint directory")
        return PRESETS[name]()

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_config(cls, path_or_dict) -> "ModelConfig":
        """Read an HF Qwen2.5-VL `config.json` (transformers 4.x flat layout or 5.x `text_config`).
        A missing or ill-typed field is a CheckpointError naming the file and the field."""
        if isinstance(path_or_dict, dict):
            cfg, where = path_or_dict, "config"
        else:
            where = os.path.join(path_or_dict, "config.json") if os.path.isdir(path_or_dict) else path_or_dict
            cfg = read_json(where)
        if cfg.get("model_type") not in ("qwen2_5_vl", None):
            raise CheckpointError(f"{where}: expected a qwen2_5_vl config, got model_type={cfg.get('model_type')!r}")
        text, vis = {**cfg, **_section(cfg, "text_config", where, {})}, _section(cfg, "vision_config", where)

        def need(d, key, section=""):  # a required size: a positive integer
            value = d.get(key)
            if value is None:
                raise CheckpointError(f"{where}: missing field {section + key!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{where}: field {section + key!r} must be a positive integer, got {value!r}")
            return value

        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        try:
            return cls(
                vocab_size=need(text, "vocab_size"),
                hidden_size=need(text, "hidden_size"),
                intermediate_size=need(text, "intermediate_size"),
                num_hidden_layers=need(text, "num_hidden_layers"),
                num_attention_heads=need(text, "num_attention_heads"),
                num_key_value_heads=text.get("num_key_value_heads") or need(text, "num_attention_heads"),
                rms_norm_eps=text.get("rms_norm_eps", 1e-6),
                rope_theta=rope.get("rope_theta", text.get("rope_theta", 1_000_000.0)),
                mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
                max_position_embeddings=text.get("max_position_embeddings", 128000),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                is_causal=bool(text.get("is_causal", False)),
                image_token_id=cfg.get("image_token_id", 151655),
                vision_start_token_id=cfg.get("vision_start_token_id", 151652),
                vision_end_token_id=cfg.get("vision_end_token_id", 151653),
                pad_token_id=text.get("pad_token_id") if text.get("pad_token_id") is not None else 151643,
                vision=VisionConfig(
                    depth=need(vis, "depth", "vision_config."),
                    hidden_size=need(vis, "hidden_size", "vision_config."),
                    intermediate_size=need(vis, "intermediate_size", "vision_config."),
                    num_heads=need(vis, "num_heads", "vision_config."),
                    out_hidden_size=vis.get("out_hidden_size", text["hidden_size"]),
                    patch_size=vis.get("patch_size", 14),
                    temporal_patch_size=vis.get("temporal_patch_size", 2),
                    spatial_merge_size=vis.get("spatial_merge_size", 2),
                    in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
                    window_size=vis.get("window_size", 112),
                    fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
                    rope_theta=(vis.get("rope_parameters") or {}).get("rope_theta", 10000.0),
                    rms_norm_eps=1e-6,
                ),
            )
        except CheckpointError:
            raise
        except (TypeError, ValueError, ZeroDivisionError) as e:  # ill-typed or inconsistent values
            raise CheckpointError(f"{where}: {e}") from e

    def to_hf_config(self) -> dict:
        """A `config.json` that transformers 4.x (flat keys) and 5.x (`text_config`) both load."""
        rope = {"type": "mrope", "rope_type": "default", "mrope_section": list(self.mrope_section)}
        text = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "is_causal": self.is_causal,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": self.pad_token_id,
        }
        v = self.vision
        vision = {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "in_channels": v.in_channels,
            "in_chans": v.in_channels,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "hidden_act": "silu",
            "tokens_per_second": 2,
        }
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            **text,
            "rope_scaling": rope,
            "text_config": {**text, "model_type": "qwen2_5_vl_text", "rope_parameters": {**rope, "rope_theta": self.rope_theta}},
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": 151656,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section(cfg: dict, key: str, where: str, default=None) -> dict:
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"{where}: missing field {key!r}")
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: field {key!r} must be an object, got {type(value).__name__}")
    return value


def _tiny() -> ModelConfig:
    return ModelConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(4, 6, 6),
        tie_word_embeddings=True,
        vision=VisionConfig(
            depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=128, fullatt_block_indexes=(1,)
        ),
    )


def _3b() -> ModelConfig:
    return ModelConfig()


def _7b() -> ModelConfig:
    return ModelConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        vision=VisionConfig(out_hidden_size=3584),
    )


PRESETS = {"tiny": _tiny, "3b": _3b, "7b": _7b}
