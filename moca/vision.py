"""The Qwen2.5-VL vision tower on packed patches: patch embedding -> window/full blocks -> 2x2 merger.

Patches are reordered once into window order (merge groups of one window contiguous), so
window blocks and full blocks both run as plain varlen attention: per window through
`window_cu_seqlens`, per image through `vision_cu_seqlens` (windows never cross images).
The merger output is put back into raster order with the host-computed inverse index.
"""

import torch
from torch import nn

from moca.layers import Attention, GatedMLP, RMSNorm, keep_inv_freq_fp32, rope_inv_freq


class VisionBlock(nn.Module):
    """A Qwen2.5-VL vision block: pre-norm attention over (patches, cu_seqlens) of windows or whole images, then
    SwiGLU; x (P, hidden) -> (P, hidden)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, qkv_bias=True, out_bias=True)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend=None):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, max_seqlen, backend, rotary_fp32=True)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then 2x2 neighbouring patches concatenated -> MLP -> one LLM token."""

    def __init__(self, cfg):
        super().__init__()
        self.merged_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.fc2 = nn.Linear(self.merged_dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.merged_dim)
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class VisionTower(nn.Module):
    """Qwen2.5-VL's vision encoder (transformers' Qwen2_5_VisionTransformerPretrainedModel, same weights and
    maths): raw patches (P, 3 * T * p * p) of a PackedBatch -> (P / merge_size**2, out_hidden_size) LLM
    tokens, windowed blocks except `fullatt_block_indexes`, 2-D rotary positions, then the patch merger."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # A Conv3d whose kernel equals its stride is a linear map over each patch's 1176 values.
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope_theta, cfg.head_dim // 2), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_inv_freq_fp32(self, self.cfg.rope_theta, self.cfg.head_dim // 2)
        return self

    def forward(self, batch, backend=None) -> torch.Tensor:
        """batch: PackedBatch with images -> (P/4, out_hidden) merged tokens in image/raster order."""
        unit = self.cfg.spatial_merge_size**2
        x = self.patch_embed(batch.patches.to(self.patch_embed.weight.dtype))  # (P, C)
        P, C = x.shape
        x = x.view(P // unit, unit, C)[batch.window_index].view(P, C)
        freqs = batch.vision_positions[..., None].float() * self.inv_freq  # (P, 2, hd/4), already window order
        emb = freqs.flatten(1)
        emb = torch.cat((emb, emb), dim=-1)  # (P, hd)
        cos, sin = emb.cos(), emb.sin()
        full = set(self.cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            if i in full:
                x = block(x, cos, sin, batch.vision_cu_seqlens, batch.vision_max_seqlen, backend)
            else:
                x = block(x, cos, sin, batch.window_cu_seqlens, batch.window_max_seqlen, backend)
        return self.merger(x)[batch.window_reverse]
