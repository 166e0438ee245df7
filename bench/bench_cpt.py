"""CPT step (forward + backward of MLM + 0.1 MAE): our packed engine vs the reference path, same batch.

ours: packed, unpadded batch -> MoCaModel -> masked positions only -> fused masked-LM loss and the
MAE head (extra decoder layer + fused patch loss). reference: transformers' Qwen2.5-VL made
bidirectional (text_config.is_causal=False) with the same weights on the same masked batch, padded
to a multiple of 32, the LM loss over ALL positions with ignored labels (Liger's fused linear
cross-entropy when installed on GPU, else logits + F.cross_entropy), and the MAE projection + MSE
on the masked image tokens WITHOUT the extra decoder layer (which favours the reference).
Reported: tokens/s (real tokens, no padding counted) and peak memory of one step.
CPU --quick: the tiny preset. GPU: 3B shapes with 4 LLM layers and 4 vision blocks.
"""

import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench/ for common, the repo root for engine/
from common import peak_gib, time_ms  # noqa: E402


def _setup(device: str, quick: bool):
    from engine import synthetic
    from engine.cpt import CPTModule, MAEHead
    from engine.masking import add_mask_token, mask_batch, mask_generator, special_token_ids
    from moca import Processor
    from moca.config import ModelConfig, VisionConfig
    from moca.image import ImageConfig
    from moca.model import MoCaModel

    if device == "cuda":
        cfg = ModelConfig(num_hidden_layers=4, vision=VisionConfig(depth=4, fullatt_block_indexes=(3,)))
        proc = Processor(Processor.from_pretrained("tiny").tokenizer, cfg, ImageConfig(), max_length=1280)
        n_records, shape = (16 if quick else 32), "3b-shapes, 4 layers, 4 vision blocks"
    else:
        proc = Processor.from_pretrained("tiny", max_length=512)
        cfg = proc.config
        n_records, shape = (6 if quick else 16), "tiny"
    add_mask_token(proc.tokenizer)
    torch.manual_seed(0)
    model = MoCaModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    head = MAEHead(model, torch.Generator().manual_seed(1))
    module = CPTModule(model, head).to(device).train()
    batch = proc([synthetic.record(0, i) for i in range(n_records)])
    mb = mask_batch(batch, special_token_ids(proc.tokenizer, cfg), proc.tokenizer.convert_tokens_to_ids("<|mask|>"),
                    mask_generator(0, 0, 0))
    return module, proc, mb, shape


def _reference(module, proc, mb, device):
    """The HF model with our weights and the padded, masked batch + a loss closure."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from moca.checkpoint import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(module.model, tmp, processor=proc)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    hf = hf.to(device).train()
    b = mb.batch
    lengths = b.lengths.tolist()
    L = -(-max(lengths) // 32) * 32
    ids = torch.full((len(lengths), L), proc.config.pad_token_id, dtype=torch.int64)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    full_labels = torch.full((b.num_tokens,), -100, dtype=torch.int64)
    full_labels[mb.mlm_positions] = mb.mlm_targets
    starts = b.cu_seqlens.tolist()
    for i, n in enumerate(lengths):
        ids[i, :n] = b.input_ids[starts[i] : starts[i] + n]
        labels[i, :n] = full_labels[starts[i] : starts[i] + n]
        attn[i, :n] = 1
    image_slots = torch.zeros_like(ids, dtype=torch.bool)
    image_slots[attn.bool()] = torch.zeros(b.num_tokens, dtype=torch.bool).index_fill_(0, mb.mae_positions, True)
    inputs = dict(input_ids=ids, attention_mask=attn, mm_token_type_ids=(ids == proc.config.image_token_id).int(),
                  pixel_values=b.patches, image_grid_thw=b.grid_thw)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    labels, image_slots = labels.to(device), image_slots.to(device)
    proj, targets = module.mae_head.proj, mb.mae_targets.to(device)
    flce = None
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            flce = LigerFusedLinearCrossEntropyLoss()
        except ImportError:
            pass

    def step():
        hidden = hf.model(**inputs).last_hidden_state  # (B, L, H)
        flat, lab = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        if flce is not None:
            mlm = flce(hf.lm_head.weight, flat, lab)
        else:
            mlm = F.cross_entropy(hf.lm_head(flat).float(), lab, ignore_index=-100)
        mae = F.mse_loss(proj(hidden[image_slots]).float(), targets)
        (mlm + 0.1 * mae).backward()

    return hf, step


def run(device: str, quick: bool) -> list[dict]:
    module, proc, mb, shape = _setup(device, quick)
    dmb = mb.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    if device != "cuda":
        module.model.attn_backend = "torch"

    def ours():
        with autocast:
            loss, _, _ = module(dmb, 1.0, 1.0)
        loss.backward()

    hf, ref_step = _reference(module, proc, mb, device)

    def reference():
        with autocast:
            ref_step()

    T = mb.batch.num_tokens
    padded = mb.batch.num_samples * (-(-mb.batch.max_seqlen // 32) * 32)
    providers = (("ours", ours, module), ("reference", reference, hf))
    if device == "cuda":
        times = {name: time_ms(fn, device) for name, fn, _ in providers}
    else:  # a shared CPU's load drifts: alternate the providers and take each one's median
        samples = {name: [] for name, _, _ in providers}
        for _ in range(1 if quick else 3):
            for name, fn, _ in providers:
                samples[name].append(time_ms(fn, device, warmup=1, repeats=1))
        times = {name: statistics.median(v) for name, v in samples.items()}
    rows = []
    for provider, fn, params in providers:
        ms = times[provider]
        peak = peak_gib(fn, device)
        for p in params.parameters():
            p.grad = None
        rows.append({"provider": provider, "shape": shape, "samples": mb.batch.num_samples, "tokens": T,
                     "padded_tokens": padded if provider == "reference" else T, "masked": mb.num_mlm,
                     "ms": ms, "tokens_per_s": T / ms * 1e3, "peak_gib": peak})
    return rows


def summary(rows: list[dict]) -> dict:
    ours = next(r for r in rows if r["provider"] == "ours")
    ref = next(r for r in rows if r["provider"] == "reference")
    out = {"cpt_speedup_tokens_per_s": ours["tokens_per_s"] / ref["tokens_per_s"]}
    if ours["peak_gib"] and ref["peak_gib"]:
        out["cpt_peak_memory_ratio"] = ours["peak_gib"] / ref["peak_gib"]
    return out
