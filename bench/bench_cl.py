"""CL step throughput: pairs/s and peak memory of one contrastive step (forward + backward).

ours: the micro-batch's queries, positives and hard negatives packed into PackedBatches, MoCaModel
(varlen attention), mean pooling, `infonce` (fused kernels on GPU).
reference: transformers' Qwen2_5_VLForConditionalGeneration with text_config.is_causal=False on
the same samples, padded to the longest one with an attention mask, masked mean pooling, plain
matmul + cross-entropy. Same config, same samples; random weights (throughput does not depend
on their values). CPU --quick: the tiny preset in one micro-batch; GPU: the 3b shapes in bf16, both
providers under the memory regime the engine trains them in at that scale: GradCache chunks of
CHUNK samples (engine/gradcache.py) and activation checkpointing of every block. (One 64-pair
micro-batch of the 3b model holds ~200k vision patches: without them it needs ~0.5 TB.)
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import peak_gib, time_ms  # noqa: E402

from engine import parallel  # noqa: E402
from engine.cl import TEMPERATURE, CLModule, cl_backward, pack_micro_batch  # noqa: E402
from engine.cl_data import CLData  # noqa: E402
from engine.gradcache import grad_cache_step  # noqa: E402
from moca.checkpoint import load_model  # noqa: E402
from moca.processor import Processor  # noqa: E402

R = 2
CHUNK = 16  # GPU: samples per GradCache chunk, both providers


def _samples(rb):
    return rb.queries + rb.positives + [n for negs in rb.negatives for n in negs]


def _reference_inputs(samples, config, device):
    L = max(len(s) for s in samples)
    ids = torch.full((len(samples), L), config.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(len(samples), L, dtype=torch.int64)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = s.input_ids
        mask[i, : len(s)] = 1
    kw = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == config.image_token_id).int())
    grids = [g for s in samples for g in s.grids]
    if grids:
        kw["pixel_values"] = torch.cat([s.patches for s in samples if s.grids])
        kw["image_grid_thw"] = torch.tensor(grids)
    return {k: v.to(device) for k, v in kw.items()}, int(mask.numel())


def _reference_model(config, device, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig.from_dict(config.to_hf_config())
    cfg.text_config.is_causal = False
    cfg._attn_implementation = cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "sdpa"
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration(cfg)
    return hf.to(dtype).train()


def _reference_embed(hf, kw):
    hidden = hf.model(**kw).last_hidden_state  # (N, L, H) padded
    m = kw["attention_mask"][..., None].to(hidden.dtype)
    return F.normalize(((hidden * m).sum(1) / m.sum(1)).float(), dim=-1)


def _reference_loss(emb, b, r):
    q, t, n = emb[:b], emb[b : 2 * b], emb[2 * b :].view(b, r, -1)
    logits = torch.cat([q @ t.T, torch.einsum("bd,brd->br", q, n)], 1) / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(b, device=q.device))


def _reference_step(hf, chunks, b, r):
    if len(chunks) == 1:
        _reference_loss(_reference_embed(hf, chunks[0]), b, r).backward()
    else:
        grad_cache_step(lambda kw: _reference_embed(hf, kw), [chunks], lambda emb: _reference_loss(emb, b, r))


def run(device: str, quick: bool) -> list[dict]:
    preset = "tiny" if device == "cpu" else "3b"
    pairs = (8 if quick else 32) if device == "cpu" else (16 if quick else 64)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    chunk = 0 if device == "cpu" else CHUNK
    processor = Processor.from_pretrained(preset)
    data = CLData(["synthetic/t2i:64"], processor, global_batch=pairs, negative_ratio=R)
    rb = data.rank_batch(0)  # caption -> image: one text query, an image target and R image negatives
    model = load_model(preset, device=device, dtype=dtype).train()
    mb = pack_micro_batch(rb, processor, chunk=chunk).to(device)
    module = CLModule(model)
    samples = _samples(rb)
    step = chunk or len(samples)
    ref_chunks = [_reference_inputs(samples[k : k + step], model.config, device) for k in range(0, len(samples), step)]
    padded = sum(n for _, n in ref_chunks)
    regime = f"GradCache chunk {chunk} + activation ckpt" if chunk else "one micro-batch"
    shape = f"{preset} {pairs} pairs r={R}, {regime}"
    if chunk:
        parallel.apply_activation_checkpointing(module)
    rows = []

    def ours():
        cl_backward(module, mb)
        model.zero_grad(set_to_none=True)

    reps = dict(warmup=1, repeats=3)
    ms = time_ms(ours, device, **reps)
    rows.append({"provider": "moca packed", "shape": shape, "ms": ms, "pairs_per_s": pairs / ms * 1e3,
                 "tokens": mb.num_tokens, "peak_gib": peak_gib(ours, device)})
    config = model.config
    del model, module
    hf = _reference_model(config, device, dtype)
    if chunk:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def reference():
        _reference_step(hf, [kw for kw, _ in ref_chunks], pairs, R)
        hf.zero_grad(set_to_none=True)

    ms = time_ms(reference, device, **reps)
    rows.append({"provider": "transformers padded", "shape": shape, "ms": ms, "pairs_per_s": pairs / ms * 1e3,
                 "tokens": padded, "peak_gib": peak_gib(reference, device)})
    return rows


def summary(rows: list[dict]) -> dict:
    ours, ref = rows[0], rows[1]
    out = {"cl_speedup": ref["ms"] / ours["ms"]}
    if ours["peak_gib"] and ref["peak_gib"]:
        out["cl_memory_ratio"] = ours["peak_gib"] / ref["peak_gib"]
    return out
