"""Stage 1 of MoCa, the modality-aware continual pre-training objective (MOCA.md §2).

`CPTModule` bundles the backbone and the MAE head so that DDP / FSDP2 wrap ONE module whose
forward returns the loss: the LM head (tied to the embeddings where the checkpoint ties) and the
MAE projection are used inside that forward, where FSDP2 has their weights unsharded.

Losses are normalised by the GLOBAL number of targets of the optimizer step (all micro-batches,
all ranks; host ints known before the forward), so any split of a step's data over ranks and
accumulation steps gives the gradient of the single big batch. Only masked positions reach the
heads: `masked_lm_loss` never materialises the (M, V) logits.
"""

import copy

import torch
from safetensors.torch import save_file
from torch import nn

from engine.data import CPTData
from engine.masking import MASK_TOKEN, MaskedBatch, add_mask_token, mask_batch, mask_generator, special_token_ids
from engine.trainer import Task, full_model_from_state
from kernels import masked_lm_loss, masked_patch_loss
from moca.checkpoint import save_model
from moca.layers import DecoderLayer, mrope_cos_sin
from moca.model import MoCaModel
from moca.processor import Processor

MAE_HEAD_FILE = "mae_head.safetensors"


class MAEHead(nn.Module):
    """One extra bidirectional decoder layer over the final hidden states, then Linear(H, 4*1176)."""

    def __init__(self, model: MoCaModel, generator: torch.Generator | None = None):
        super().__init__()
        cfg = model.config
        self.layer = DecoderLayer(cfg)
        self.layer.load_state_dict(copy.deepcopy(model.layers[cfg.num_hidden_layers // 2].state_dict()))
        out = cfg.vision.spatial_merge_size**2 * cfg.vision.patch_dim
        self.proj = nn.Linear(cfg.hidden_size, out)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) * 0.02)
            self.proj.bias.zero_()
        self.to(model.embed_tokens.weight.device, model.embed_tokens.weight.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class CPTModule(nn.Module):
    """Backbone + MAE head as the one module DDP / FSDP wrap; forward -> MLM + mae_weight * MAE (MOCA.md §2)."""

    def __init__(self, model: MoCaModel, mae_head: MAEHead, mae_weight: float = 0.1):
        super().__init__()
        self.model, self.mae_head, self.mae_weight = model, mae_head, mae_weight
        # Under FSDP every rank must run the same collectives (parallel.wrap sets this): a micro-batch without
        # targets of a part that is on for the step still runs that part's head, with weight 0
        self.heads_always_in_graph = False

    def forward(self, mb: MaskedBatch, mlm_scale: float, mae_scale: float, mlm_on: bool | None = None,
                mae_on: bool | None = None):
        """-> (loss to backpropagate, mlm mean, mae mean) for one micro-batch.

        mlm_scale / mae_scale: this micro-batch's share of the step's global targets times the
        gradient-averaging factor of the data-parallel wrapper (0: the part is off or empty here).
        mlm_on / mae_on: whether the part has targets anywhere in the step (default: scale != 0).
        """
        model, batch = self.model, mb.batch
        mlm_on = bool(mlm_scale) if mlm_on is None else mlm_on
        mae_on = bool(mae_scale) if mae_on is None else mae_on
        hidden = model(batch)  # (T, H)
        zero = hidden.new_zeros((), dtype=torch.float32)
        mlm, mae = zero, zero
        loss = 0.0 * hidden[:1].float().sum()  # in the graph even when this micro-batch has no target at all
        if mlm_on and mb.num_mlm:
            dtype = _compute_dtype(hidden)
            mlm = masked_lm_loss(hidden[mb.mlm_positions].to(dtype), model.lm_head.weight.to(dtype), mb.mlm_targets)
            loss = loss + mlm * mlm_scale
        elif mlm_on and self.heads_always_in_graph:  # an untied lm_head needs its gradient on every rank
            loss = loss + 0.0 * (hidden[:1] @ model.lm_head.weight.to(hidden.dtype).T).float().sum()
        if mae_on and (mb.num_mae or self.heads_always_in_graph):
            head = self.mae_head
            cos, sin = mrope_cos_sin(batch.position_ids, model.inv_freq, model.config.mrope_section, hidden.dtype)
            dec = head.layer(hidden, cos, sin, batch.cu_seqlens, batch.max_seqlen, model.attn_backend)
            dtype = _compute_dtype(dec)
            if mb.num_mae:
                mae = masked_patch_loss(dec[mb.mae_positions].to(dtype), head.proj.weight.to(dtype),
                                        head.proj.bias.to(dtype), mb.mae_targets)
                loss = loss + mae * (self.mae_weight * mae_scale)
            else:
                loss = loss + 0.0 * head.proj(dec[:1].to(head.proj.weight.dtype)).float().sum()
        return loss, mlm.detach(), mae.detach()


class CPTTask(Task):
    """Data -> packed, masked micro-batches -> CPTModule losses; checkpoints in HF layout + MAE head."""

    def __init__(self, model: MoCaModel, processor: Processor, data: CPTData, mae_head: MAEHead, seed: int = 0,
                 mlm_prob: float = 0.4, mae_prob: float = 0.5, mae_weight: float = 0.1):
        if not (mlm_prob or mae_prob):
            raise ValueError("both MLM and MAE are switched off: nothing to train")
        self.processor, self.data, self.seed = processor, data, seed
        self.mlm_prob, self.mae_prob = mlm_prob, mae_prob
        self.module = CPTModule(model, mae_head, mae_weight)
        self.mask_id = add_mask_token(processor.tokenizer)
        if self.mask_id >= model.config.vocab_size:
            raise ValueError(f"{MASK_TOKEN} got id {self.mask_id}, outside the model's vocabulary ({model.config.vocab_size})")
        self.special_ids = special_token_ids(processor.tokenizer, model.config)
        self.merge = model.config.vision.spatial_merge_size**2
        self.part_names = ("loss",) + (("mlm_loss",) if mlm_prob else ()) + (("mae_loss",) if mae_prob else ())
        cfg = model.config
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        self._flop_terms = (n(model.layers), n(model.visual), n(mae_head.layer) if mae_prob else 0,
                            (cfg.num_hidden_layers + (1 if mae_prob else 0)) * cfg.hidden_size, cfg.vocab_size * cfg.hidden_size,
                            mae_head.proj.weight.numel())

    def micro_batches(self, step: int, rank: int, world: int, accum: int) -> list[MaskedBatch]:
        out = []
        for a in range(accum):
            slot = a * world + rank
            mb = self.data.micro_batch(step * world * accum + slot)
            out.append(mask_batch(self.processor.pack(mb.samples), self.special_ids, self.mask_id,
                                  mask_generator(self.seed, step, slot), self.mlm_prob, self.mae_prob, self.merge,
                                  inplace=True))  # the batch was packed for this call
        return out

    def counts(self, mbs):
        return torch.tensor([sum(mb.num_mlm for mb in mbs), sum(mb.num_mae for mb in mbs)], dtype=torch.float64)

    def loader_state(self):
        return frozenset(self.data.broken)

    def merge_loader_state(self, state):
        self.data.broken |= state

    def loss(self, module, mb, totals, world):
        mlm_share = mb.num_mlm / float(totals[0]) if totals[0] else 0.0
        mae_share = mb.num_mae / float(totals[1]) if totals[1] else 0.0
        # DDP / FSDP average gradients over ranks: scale by world so they sum instead
        loss, mlm, mae = module(mb, mlm_share * world, mae_share * world, bool(totals[0]), bool(totals[1]))
        w = self.module.mae_weight
        parts = [mlm * mlm_share + w * mae * mae_share]
        parts += [mlm * mlm_share] if self.mlm_prob else []
        parts += [mae * mae_share] if self.mae_prob else []
        return loss, torch.stack(parts)

    def stats(self, mbs):
        llm, vis, head, attn, lm, proj = self._flop_terms
        flops = 0.0
        for mb in mbs:
            b = mb.batch
            T, P = b.num_tokens, 0 if b.patches is None else b.patches.shape[0]
            flops += 6 * (llm + head) * T + 6 * vis * P + 12 * attn * float((b.lengths.double() ** 2).sum())
            flops += 6 * lm * mb.num_mlm + 6 * proj * mb.num_mae
        return {"tokens": float(sum(mb.batch.num_tokens for mb in mbs)),
                "samples": float(sum(mb.batch.num_samples for mb in mbs)), "flops": flops}

    def save(self, path, model_state, extra_files):
        model, head = self.module.model, self.module.mae_head
        if model_state is not None:  # sharded run: rebuild full CPU copies from the gathered state
            model = full_model_from_state(model.config, model_state)
            head = {k[len("mae_head."):]: v for k, v in model_state.items() if k.startswith("mae_head.")}
        head_state = head if isinstance(head, dict) else head.state_dict()
        files = {MAE_HEAD_FILE: lambda p: save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()}, p)}
        save_model(model, path, processor=self.processor, extra_files={**files, **extra_files})
