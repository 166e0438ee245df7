"""MoCaModel: Qwen2.5-VL (vision tower -> merger -> decoder) on packed, unpadded batches.

`model(batch)` -> last hidden states (T, H); `model.embed(batch)` -> (B, H) L2-normalised
sample embeddings (mean over each sample's tokens, images included, MOCA.md §1; `pooling="last"` takes
each sample's last token instead). Each sample attends only to itself, always bidirectionally: a config
with `is_causal=True` is refused (NotImplementedError), there is no causal path.
The LM head is kept (CPT needs it; tied to the embeddings where the checkpoint ties) but
the forward never touches it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from moca.batch import PackedBatch, Sample, pack
from moca.config import ModelConfig
from moca.layers import DecoderLayer, RMSNorm, keep_inv_freq_fp32, mrope_cos_sin, rope_inv_freq
from moca.vision import VisionTower


def mean_pool(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """(T, H) -> (B, H): mean over each sample's tokens, accumulated in fp32."""
    sums = hidden.new_zeros(batch.num_samples, hidden.shape[1], dtype=torch.float32)
    sums.index_add_(0, batch.sample_ids, hidden.float())
    return sums / batch.lengths[:, None].to(sums.dtype)


def last_token_pool(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return hidden[batch.cu_seqlens[1:].long() - 1].float()


class MoCaModel(nn.Module):
    """Vision tower, token embeddings, bidirectional decoder, final norm and (unused by the forward) LM head.
    NotImplementedError when `config.is_causal`. `attn_backend` (None, "triton", "torch") picks the kernels."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.is_causal:
            raise NotImplementedError(
                "causal decoding is not supported: MoCa models are bidirectional (is_causal=False)"
            )
        self.config = config
        self.attn_backend: str | None = None  # None: Triton on CUDA / interpreter, torch otherwise
        # Under FSDP every rank must run the same collectives: a batch without images then still runs the
        # vision tower, once, on a black 2x2-patch image with weight 0 (parallel.wrap sets this; MOCA.md §2:
        # the reference appends such a dummy image for the same reason)
        self.vision_always_in_graph = False
        self.visual = VisionTower(config.vision)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(config.rope_theta, config.head_dim), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_inv_freq_fp32(self, self.config.rope_theta, self.config.head_dim)
        return self

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def input_embeddings(self, batch: PackedBatch) -> torch.Tensor:
        """Token embeddings with the vision tower's merged tokens written into the image slots."""
        x = self.embed_tokens(batch.input_ids)
        if batch.num_images:
            image_tokens = self.visual(batch, self.attn_backend).to(x.dtype)
            x = x.index_copy(0, batch.image_token_index, image_tokens)
        elif self.vision_always_in_graph:
            x = x + 0.0 * self.visual(self._dummy_image(x.device), self.attn_backend).sum().to(x.dtype)
        return x

    def _dummy_image(self, device) -> PackedBatch:
        """One black 2x2-patch image (one merged token) packed alone: the vision tower's smallest input."""
        cfg, merge = self.config, self.config.vision.spatial_merge_size
        sample = Sample(torch.full((1,), cfg.image_token_id), torch.zeros(merge * merge, cfg.vision.patch_dim),
                        ((1, merge, merge),))
        return pack([sample], cfg.vision, cfg.image_token_id).to(device)

    def forward(self, batch: PackedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """-> (T, hidden) final-normed last hidden states. inputs_embeds: (T, hidden) in place of
        `input_embeddings(batch)` (the vision tower then does not run)."""
        x = self.input_embeddings(batch) if inputs_embeds is None else inputs_embeds
        cos, sin = mrope_cos_sin(batch.position_ids, self.inv_freq, self.config.mrope_section, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, batch.cu_seqlens, batch.max_seqlen, self.attn_backend)
        return self.norm(x)

    def embed(self, batch: PackedBatch, pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
        """-> (B, hidden) fp32, L2-normalised unless `normalize` is False. pooling: "mean" (MoCa) or "last"."""
        hidden = self(batch)
        if pooling == "mean":
            pooled = mean_pool(hidden, batch)
        elif pooling == "last":
            pooled = last_token_pool(hidden, batch)
        else:
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        return F.normalize(pooled, dim=-1) if normalize else pooled

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Random init for presets: N(0, std) weights, zero biases, unit norms. The draws happen on the
        generator's device (a CUDA generator initialises a 3B model in a second, a CPU one in ~15 s)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                device = generator.device if generator is not None else p.device
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32, device=device).to(p.dtype) * std)
