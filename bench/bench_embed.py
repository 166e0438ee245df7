"""End-to-end embedding benchmark: our packed engine against transformers' Qwen2.5-VL, same inputs and weights.

The inputs are an MMEB-like mix, shuffled: short texts, single images with a question, and
interleaved documents (long text with two images), the images as JPEG bytes. Both providers
start from those raw items and run the same preprocessing (moca's Processor: decode, resize,
patchify, tokenise) in the same kind of DataLoader (workers on CUDA, none on a CPU whose
cores the model needs), so the ratio measures what differs: ours sorts by cost, packs under
a token budget and runs unpadded varlen attention; transformers runs the reference path:
batches of a fixed size in input order, right padding, sdpa, `text_config.is_causal=False`,
mean pooling over the attention mask. The
weights are ours copied into transformers' model. CPU: a small custom config, images of
32..128 tokens (--quick) or 256..1024; CUDA: the 3B shapes in bf16, images of 256..1024 tokens.
"""

import io
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from moca.checkpoint import load_model, state_dict_hf
from moca.config import ModelConfig, VisionConfig
from moca.embed import embed_items
from moca.image import ImageConfig
from moca.model import MoCaModel
from moca.processor import IMAGE_MARKER, Processor, default_tokenizer_dir, load_tokenizer

WORDS = ("the a cat dog red blue house river city chart revenue table figure shows of in on with and "
         "report growth year market image photo person street car tree sky").split()


def _small_config() -> ModelConfig:
    return ModelConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        mrope_section=(8, 12, 12),
        vision=VisionConfig(depth=4, hidden_size=128, intermediate_size=352, num_heads=2, out_hidden_size=256,
                            fullatt_block_indexes=(1, 3)),
    )


def _setup(device: str, quick: bool):
    """-> (config name, our model, processor, item counts, tokens-per-image range, batch_tokens, hf batch, workers)."""
    if device == "cuda":
        model = load_model("3b", device="cuda", dtype=torch.bfloat16)
        return "3b", model, (512, 256, 64), (256, 1024), 16384, 16, 8
    model = MoCaModel(_small_config())
    model.init_weights(torch.Generator().manual_seed(0))
    model.eval()
    if quick:
        return "small", model, (24, 12, 4), (32, 128), 4096, 8, 0
    return "small", model, (64, 32, 8), (256, 1024), 8192, 8, 0


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _jpeg(rng: random.Random, tokens: int) -> bytes:
    """A noisy JPEG whose Qwen grid has about `tokens` merged tokens (28x28 px each)."""
    aspect = rng.uniform(0.6, 1.6)
    h = max(28, int((tokens / aspect) ** 0.5) * 28)
    w = max(28, int(tokens * 28 * 28 / h))
    pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_items(counts, token_range, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    n_text, n_image, n_doc = counts
    items = [{"text": "Find me an everyday image that matches the given caption: " + _text(rng, rng.randint(5, 25)) + ".\n"}
             for _ in range(n_text)]
    items += [{"text": IMAGE_MARKER + "Represent the given image with the following question: " + _text(rng, rng.randint(4, 12)) + "?\n",
               "images": [_jpeg(rng, rng.randint(*token_range))]} for _ in range(n_image)]
    items += [{"text": _text(rng, rng.randint(60, 200)) + IMAGE_MARKER + _text(rng, rng.randint(40, 120)) + IMAGE_MARKER
               + _text(rng, rng.randint(20, 80)),
               "images": [_jpeg(rng, rng.randint(*token_range)) for _ in range(2)]} for _ in range(n_doc)]
    rng.shuffle(items)
    return items


def _hf_model(model, device: str, dtype: torch.dtype):
    import transformers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformers.logging.set_verbosity_error()
    hf_cfg = model.config.to_hf_config()
    cfg = Qwen2_5_VLConfig(text_config=hf_cfg["text_config"], vision_config=hf_cfg["vision_config"],
                           tie_word_embeddings=model.config.tie_word_embeddings)
    cfg._attn_implementation = "sdpa"
    cfg.text_config.is_causal = False  # transformers 5: what makes the decoder bidirectional
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(state_dict_hf(model, "v5"), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing}, unexpected {unexpected}")
    return hf


class PaddedBatches(torch.utils.data.Dataset):
    """Chunk c of `batch_size` items in input order -> the padded tensors transformers takes."""

    def __init__(self, processor: Processor, items: list[dict], batch_size: int):
        self.processor, self.items, self.batch_size = processor, items, batch_size

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __getitem__(self, c: int) -> dict:
        samples = [self.processor.encode(it) for it in self.items[c * self.batch_size : (c + 1) * self.batch_size]]
        length = max(len(x) for x in samples)
        ids = torch.full((len(samples), length), self.processor.config.pad_token_id, dtype=torch.int64)
        mask = torch.zeros(len(samples), length, dtype=torch.int64)
        for i, x in enumerate(samples):
            ids[i, : len(x)] = x.input_ids
            mask[i, : len(x)] = 1
        batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == self.processor.image_token_id).int())
        grids = [g for x in samples for g in x.grids]
        if grids:
            batch["pixel_values"] = torch.cat([x.patches for x in samples if x.grids])
            batch["image_grid_thw"] = torch.tensor(grids)
        return batch


@torch.no_grad()
def hf_embed(hf, processor: Processor, items: list[dict], batch_size: int, device: str, num_workers: int):
    """The reference path, fed by the same kind of DataLoader as ours
    -> ((N, H) float32 L2-normalised vectors, LLM tokens computed including padding)."""
    loader = torch.utils.data.DataLoader(PaddedBatches(processor, items, batch_size), batch_size=None,
                                         num_workers=num_workers, pin_memory=device == "cuda")
    out, computed = [], 0
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(hf.dtype)
        computed += batch["input_ids"].numel()
        hidden = hf.model(**batch).last_hidden_state.float()
        m = batch["attention_mask"][..., None].float()
        out.append(F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).cpu())
    return torch.cat(out), computed


def _timed(fn, device: str):
    """One call -> (its result, wall seconds, this process's CPU seconds, peak GiB above the
    starting allocation (CUDA) or None). CPU seconds tell work from waiting on a shared machine."""
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return result, time.perf_counter() - t0, time.process_time() - c0, peak


def run(device: str, quick: bool) -> list[dict]:
    name, model, counts, token_range, batch_tokens, hf_batch, workers = _setup(device, quick)
    dtype = next(model.parameters()).dtype
    processor = Processor(load_tokenizer(default_tokenizer_dir()), model.config,
                          ImageConfig(min_pixels=token_range[0] * 28 * 28, max_pixels=token_range[1] * 28 * 28))
    hf = _hf_model(model, device, dtype)
    items = make_items(counts, token_range)
    samples = [processor.encode(it) for it in items]
    tokens = sum(len(x) for x in samples)
    patches = sum(x.num_patches for x in samples)
    del samples
    warm = items[: max(4, len(items) // 8)]
    ours = lambda its: embed_items(model, processor, its, batch_tokens, num_workers=workers)  # noqa: E731
    ref = lambda its: hf_embed(hf, processor, its, hf_batch, device, workers)  # noqa: E731
    ours(warm), ref(warm)
    # alternate the providers so that load from other processes hits both alike; best of the repeats
    times = {"ours": [], "ref": []}
    for _ in range(2):
        ours_vec, *t, ours_peak = _timed(lambda: ours(items), device)
        times["ours"].append(t)
        (ref_vec, padded), *t, ref_peak = _timed(lambda: ref(items), device)
        times["ref"].append(t)
    (ours_s, ours_cpu), (ref_s, ref_cpu) = min(times["ours"]), min(times["ref"])
    diff = (ours_vec - ref_vec).abs().max().item()
    shape = f"{name} {len(items)} items ({counts[0]} text, {counts[1]} image, {counts[2]} doc), {tokens} tok, {patches} patches"
    rows = []
    for provider, secs, cpu_secs, computed, peak, err in (
        ("moca (packed)", ours_s, ours_cpu, tokens, ours_peak, diff),
        ("transformers (padded, sdpa)", ref_s, ref_cpu, padded, ref_peak, 0.0),
    ):
        rows.append(dict(
            provider=provider, shape=shape, dtype=str(dtype).removeprefix("torch."), items=len(items), s=secs,
            cpu_s=cpu_secs if device == "cpu" else None, items_per_s=len(items) / secs, tokens_per_s=tokens / secs,
            llm_tokens_computed=computed, peak_gib=peak, max_abs_diff=err,
        ))
    return rows


def summary(rows: list[dict]) -> dict:
    ours = next(r for r in rows if r["provider"].startswith("moca"))
    ref = next(r for r in rows if r["provider"].startswith("transformers"))
    out = {"embed_speedup_vs_transformers": ours["items_per_s"] / ref["items_per_s"]}
    if ours["peak_gib"] is not None and ref["peak_gib"]:
        out["embed_peak_memory_vs_transformers"] = ours["peak_gib"] / ref["peak_gib"]
    return out
