"""Stage 2 of MoCa, heterogeneous contrastive fine-tuning (MOCA.md §3): the CL step and its Task.

One micro-batch is this rank's slice of a task-homogeneous global batch: its b queries, b
positives and b x r hard negatives are packed into ONE PackedBatch (samples in that order) and
run through ONE forward; `model.embed` mean-pools each sample and L2-normalises. The loss is
`gathered_infonce` (temperature 0.03): every rank's embeddings are gathered, the local slice
keeps its gradient, and the loss equals the single-process loss of the whole global batch.

Scaling: `gathered_infonce` gives each rank the full-batch gradient of its own rows, DDP / FSDP
average parameter gradients over ranks, and an optimizer step averages its `accum` global
batches, so each rank backpropagates `world / accum * loss`.

GradCache (`chunk` > 0): the micro-batch's samples, in the same order, are packed into chunks of
at most `chunk` samples; `engine.gradcache.grad_cache_step` embeds them without autograd, takes
the loss's gradient w.r.t. the embeddings, then re-encodes chunk by chunk. Same update, activation
memory of one chunk.
"""

from dataclasses import dataclass, replace

import torch
from torch import nn

from engine import parallel
from engine.cl_data import CLData, RankBatch
from engine.gradcache import grad_cache_step
from engine.trainer import Task, full_model_from_state
from kernels.infonce import gathered_infonce
from moca.batch import PackedBatch
from moca.checkpoint import save_model
from moca.model import MoCaModel
from moca.processor import Processor

TEMPERATURE = 0.03


@dataclass
class CLMicroBatch:
    """Packed samples [queries (b) | positives (b) | negatives (b*r), query-major]."""

    batches: list[PackedBatch]  # one PackedBatch, or GradCache chunks in sample order
    num_queries: int  # b
    num_negatives: int  # r
    subset: str

    @property
    def num_tokens(self) -> int:
        return sum(x.num_tokens for x in self.batches)

    @property
    def num_patches(self) -> int:
        return sum(0 if x.patches is None else x.patches.shape[0] for x in self.batches)

    def to(self, device, non_blocking: bool = False) -> "CLMicroBatch":
        return replace(self, batches=[x.to(device, non_blocking=non_blocking) for x in self.batches])

    def pin_memory(self) -> "CLMicroBatch":
        return replace(self, batches=[x.pin_memory() for x in self.batches])


def pack_micro_batch(rb: RankBatch, processor: Processor, chunk: int = 0) -> CLMicroBatch:
    """This rank's b queries, b positives and b x r negatives (query-major), in that order, packed into one
    PackedBatch, or into consecutive chunks of at most `chunk` samples for GradCache."""
    samples = rb.queries + rb.positives + [n for negs in rb.negatives for n in negs]
    step = chunk if chunk > 0 else len(samples)
    batches = [processor.pack(samples[k : k + step]) for k in range(0, len(samples), step)]
    return CLMicroBatch(batches, len(rb.queries), rb.num_negatives, rb.subset)


def contrastive_loss(emb: torch.Tensor, b: int, r: int, temperature: float = TEMPERATURE,
                     backend: str | None = None) -> torch.Tensor:
    """emb: (b*(2+r), H) in micro-batch order -> the global batch's InfoNCE (same on every rank)."""
    q, t, n = emb[:b], emb[b : 2 * b], emb[2 * b :]
    neg = n.view(b, r, emb.shape[1]) if r else None
    return gathered_infonce(q, t, neg, temperature, backend)


class CLModule(nn.Module):
    """What DDP / FSDP wrap: PackedBatch -> (B, H) L2-normalised mean-pooled embeddings."""

    def __init__(self, model: MoCaModel):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return self.model.embed(batch)


def cl_backward(module: nn.Module, mb: CLMicroBatch, scale: float = 1.0, temperature: float = TEMPERATURE,
                backend: str | None = None) -> torch.Tensor:
    """Forward and backward of `scale * loss` for one micro-batch; returns the detached loss.

    module: CLModule or its DDP / FSDP wrapper. With several chunks, GradCache; the data-parallel
    gradient reduction then runs once, with the last chunk's re-encoding.
    """
    b, r = mb.num_queries, mb.num_negatives
    if len(mb.batches) == 1:
        loss = contrastive_loss(module(mb.batches[0]), b, r, temperature, backend)
        (loss * scale).backward()
        return loss.detach()
    scaled = grad_cache_step(
        module, [mb.batches], lambda emb: scale * contrastive_loss(emb, b, r, temperature, backend),
        no_sync=lambda: parallel.no_grad_sync(module, last=False),
    )
    return scaled / scale


class CLTask(Task):
    """CLData -> packed micro-batches -> InfoNCE; embedding checkpoints in HF layout."""

    name, part_names = "cl", ("loss",)

    def __init__(self, model: MoCaModel, processor: Processor, data: CLData, chunk: int = 0,
                 temperature: float = TEMPERATURE):
        self.processor, self.data, self.chunk, self.temperature = processor, data, chunk, temperature
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.requires_grad_(False)  # an embedding model never uses the LM head
        self.module = CLModule(model)
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        cfg = model.config
        self._flop_terms = (n(model.layers), n(model.visual), cfg.num_hidden_layers * cfg.hidden_size)

    def micro_batches(self, step, rank, world, accum):
        return [pack_micro_batch(self.data.rank_batch(step * accum + a, rank, world), self.processor, self.chunk)
                for a in range(accum)]

    def counts(self, mbs):
        return torch.tensor([float(len(mbs))], dtype=torch.float64)

    def loader_state(self):
        return frozenset(self.data.broken)

    def merge_loader_state(self, state):
        self.data.broken |= state

    def backward(self, module, mb, totals, world):
        """-> (1,) detached parts: this micro-batch's share of the step's mean loss."""
        accum = float(totals[0]) / world
        loss = cl_backward(module, mb, world / accum, self.temperature, self.module.model.attn_backend)
        return (loss / (accum * world)).reshape(1)

    def stats(self, mbs):
        llm, vis, attn = self._flop_terms
        flops = 0.0
        for mb in mbs:
            for x in mb.batches:
                P = 0 if x.patches is None else x.patches.shape[0]
                flops += 6 * llm * x.num_tokens + 6 * vis * P + 12 * attn * float((x.lengths.double() ** 2).sum())
        return {"tokens": float(sum(mb.num_tokens for mb in mbs)),
                "samples": float(sum(mb.num_queries for mb in mbs)), "flops": flops}

    def save(self, path, model_state, extra_files):
        model = self.module.model
        if model_state is not None:  # sharded run: a full CPU copy from the gathered state
            model = full_model_from_state(model.config, model_state)
        save_model(model, path, processor=self.processor, extra_files=extra_files)
