"""Shared oracle: tiny random transformers Qwen2.5-VL models with odd sizes, made bidirectional."""

import numpy as np
import torch
from PIL import Image


def tiny_hf_config(**overrides):
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=151936,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1_000_000.0},
        is_causal=False,  # in transformers 5 this is what makes the decoder bidirectional
        max_position_embeddings=4096,
    )
    vision = dict(
        depth=3,
        hidden_size=40,
        intermediate_size=64,
        num_heads=2,  # head dim 20
        out_hidden_size=96,
        window_size=56,  # 2x2 merged tokens per window: windows and full blocks both matter
        fullatt_block_indexes=[1],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=overrides.pop("tie", True), **overrides)


def tiny_hf_model(seed=0, **overrides):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**overrides)
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # post_init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@torch.no_grad()
def hf_hidden(hf_model, sample, image_token_id=151655):
    """Run transformers on ONE sample alone -> (L, H) last hidden states."""
    ids = sample.input_ids[None]
    kwargs = dict(input_ids=ids, mm_token_type_ids=(ids == image_token_id).int())
    if sample.grids:
        kwargs["pixel_values"] = sample.patches
        kwargs["image_grid_thw"] = torch.tensor(sample.grids)
    return hf_model.model(**kwargs).last_hidden_state[0]
