"""Building blocks shared by the vision tower and the decoder, all on packed `(T, ...)` activations.

Projections that read the same input are fused (`qkv_proj`, `gate_up_proj`): one GEMM
instead of three or two; checkpoint I/O maps HF's separate weights onto slices of them.
Every attention goes through `kernels.varlen_attention`, whose backend is chosen per call.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kernels import varlen_attention


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, then times weight: transformers' Qwen2RMSNorm, rounding included."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (T, H, D); cos, sin: (T, D) -> (T, H, D): rotary embedding, rotate-half layout (transformers'
    apply_rotary_pos_emb)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def rope_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    """(dim/2,) fp32 RoPE inverse frequencies theta^(-2i/dim) (Su et al., 2021). Always fp32, as transformers
    keeps them: rounded to bf16 they shift the rotary angle by up to ~1.5 rad at 1280 tokens apart (head dim 128)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)


def keep_inv_freq_fp32(module: nn.Module, theta: float, dim: int) -> None:
    """After a `.to()` / `.to_empty()` of `module`: its `inv_freq` buffer recomputed in fp32 on the device it was
    moved to (a dtype cast would round it; from meta it would be empty)."""
    module.inv_freq = rope_inv_freq(theta, dim, module.inv_freq.device)


def mrope_cos_sin(position_ids, inv_freq, mrope_section, dtype):
    """M-RoPE (Qwen2-VL, transformers' apply_multimodal_rotary_pos_emb): (3, T) positions -> cos, sin (T, D) in
    `dtype`; frequency band i of `mrope_section` uses stream i % 3 (t, h, w)."""
    freqs = position_ids[..., None].float() * inv_freq  # (3, T, D/2)
    bands = freqs.split(list(mrope_section), dim=-1)
    freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Bidirectional GQA attention over packed segments: x (T, dim), cos/sin (T, head_dim) -> (T, dim).
    Each segment of cu_seqlens (B+1,) int32 attends only to itself; there is no causal mask."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool, out_bias: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.qkv_proj = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=out_bias)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend, rotary_fp32=False):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv_heads, self.head_dim)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        if rotary_fp32:  # the vision tower rotates in fp32, as the released model does
            q = apply_rotary(q.float(), cos, sin).to(x.dtype)
            k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=backend)
        return self.o_proj(out.reshape(T, -1))


class DecoderLayer(nn.Module):
    """A Qwen2 decoder layer made bidirectional (MOCA.md §1): pre-norm GQA attention with QKV bias, then SwiGLU."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, qkv_bias=True, out_bias=False
        )
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen, backend=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, max_seqlen, backend)
        return x + self.mlp(self.post_attention_layernorm(x))
