"""Embed texts, images and interleaved inputs: `embed_items` (Python) and `python -m moca.embed` (CLI).

Inputs are processed in chunks; within a chunk they are sorted by cost and packed into
micro-batches under a token budget by the C++ packer, so nothing is padded and long and
short inputs never share a padded shape. Vectors come back in input order.

    python -m moca.embed                                   # built-in examples on the tiny preset
    python -m moca.embed --model CKPT --text "a cat" --image cat.jpg --output out.npy
    python -m moca.embed --model CKPT --jsonl inputs.jsonl --output vectors.npy
"""

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from moca import host_ops
from moca.batch import Sample
from moca.checkpoint import load_model
from moca.processor import IMAGE_MARKER, Processor

log = logging.getLogger("moca")


def sample_cost(sample: Sample) -> int:
    """Work a sample brings to a micro-batch: LLM tokens plus raw vision patches."""
    return len(sample) + sample.num_patches


@torch.no_grad()
def embed_items(
    model,
    processor: Processor,
    items,
    batch_tokens: int = 16384,
    chunk_size: int = 1024,
    pooling: str = "mean",
    progress: bool = False,
) -> torch.Tensor:
    """items: iterable of {"text", "images"} dicts -> (N, hidden) float32 L2-normalised, input order."""
    device = next(model.parameters()).device
    out = []
    items = list(items)
    bar = tqdm(total=len(items), desc="embed", unit="input", disable=not progress, file=sys.stderr)
    for start in range(0, len(items), chunk_size):
        samples = [processor.encode(it) for it in items[start : start + chunk_size]]
        costs = torch.tensor([sample_cost(s) for s in samples], dtype=torch.int64)
        order, offsets = host_ops.pack_bins(costs, batch_tokens)
        vectors = torch.empty(len(samples), model.config.hidden_size, dtype=torch.float32)
        bounds = offsets.tolist()
        for b in range(len(bounds) - 1):
            idx = order[bounds[b] : bounds[b + 1]]
            batch = processor.pack([samples[i] for i in idx.tolist()]).to(device, non_blocking=True)
            vectors[idx] = model.embed(batch, pooling=pooling).cpu()
            bar.update(idx.numel())
        out.append(vectors)
    bar.close()
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


def read_jsonl(path: str, image_root: str | None = None) -> list[dict]:
    """Objects with "text" and/or "images" (paths, relative to image_root or the file's folder)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not (obj.get("text") or obj.get("images")):
                raise ValueError(f"{path}:{n}: expected an object with 'text' and/or 'images'")
            images = [p if os.path.isabs(p) else os.path.join(root, p) for p in obj.get("images") or []]
            items.append({"text": obj.get("text") or "", "images": images})
    return items


def demo_items() -> tuple[list[dict], list[str]]:
    """Built-in examples: MoCa's demo prompts over images drawn in code."""
    from PIL import Image, ImageDraw

    def picture(colour, shape):
        img = Image.new("RGB", (224, 168), "white")
        draw = ImageDraw.Draw(img)
        box = (50, 30, 170, 140)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        return img

    red_circle, blue_square = picture("red", "circle"), picture("blue", "square")
    items = [
        {"text": "Find me an everyday image that matches the given caption: a red circle.\n"},
        {"text": "Find me an everyday image that matches the given caption: a blue square.\n"},
        {"text": IMAGE_MARKER + "Represent the given image.\n", "images": [red_circle]},
        {"text": IMAGE_MARKER + "Represent the given image.\n", "images": [blue_square]},
        {"text": IMAGE_MARKER + "Represent the given image with the following question: What colour is it?\n",
         "images": [red_circle]},
        {"text": "A red circle"},
    ]
    names = ["q: red circle", "q: blue square", "img: red circle", "img: blue square", "img+q: colour?", "txt: red circle"]
    return items, names


def similarity_table(vectors: torch.Tensor, names: list[str]) -> str:
    sims = vectors @ vectors.T
    width = max(len(n) for n in names)
    short = [n[:10] for n in names]
    lines = [" " * width + "  " + "  ".join(f"{s:>10}" for s in short)]
    for name, row in zip(names, sims.tolist()):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>10.4f}" for v in row))
    return "\n".join(lines)


def write_vectors(vectors: torch.Tensor, path: str) -> list[str]:
    """Write `path` (.npy) and the same stem as .safetensors, each atomically."""
    from safetensors.torch import save_file

    stem = path[: -len(".npy")] if path.endswith(".npy") else path
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    written = []
    for final, write in (
        (stem + ".npy", lambda p: np.save(open(p, "wb"), vectors.numpy())),
        (stem + ".safetensors", lambda p: save_file({"embeddings": vectors.contiguous()}, p)),
    ):
        tmp = final + ".tmp"
        write(tmp)
        os.replace(tmp, final)
        written.append(final)
    return written


def main(argv=None) -> torch.Tensor:
    p = argparse.ArgumentParser(prog="python -m moca.embed", description="Embed texts, images and interleaved inputs.")
    p.add_argument("--model", default="tiny", help="a preset (tiny, 3b, 7b) or an HF checkpoint directory")
    p.add_argument("--text", action="append", default=[], help="a text input (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file input (repeatable)")
    p.add_argument("--jsonl", help='a JSONL file of {"text": ..., "images": [paths]} objects')
    p.add_argument("--image-root", help="folder that relative image paths in --jsonl start from")
    p.add_argument("--output", default=None, help="where to write vectors (.npy, plus .safetensors beside it)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="token budget per micro-batch")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-length", type=int, default=None, help="truncate inputs to this many tokens")
    p.add_argument("--show", type=int, default=8, help="print the cosine-similarity table of the first N inputs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    items = [{"text": t} for t in args.text] + [{"text": IMAGE_MARKER, "images": [i]} for i in args.image]
    names = [f"text: {t[:24]}" for t in args.text] + [f"image: {os.path.basename(i)}" for i in args.image]
    if args.jsonl:
        file_items = read_jsonl(args.jsonl, args.image_root)
        items += file_items
        names += [f"{args.jsonl}:{n}" for n in range(1, len(file_items) + 1)]
    demo = not items
    if demo:
        items, names = demo_items()
        log.info("no inputs given: embedding %d built-in examples with model %r", len(items), args.model)
    output = args.output or (os.path.join("runs", "embed", "embeddings.npy") if demo else "embeddings.npy")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)

    model = load_model(args.model, device=args.device, dtype=dtype)
    processor = Processor.from_pretrained(args.model, max_length=args.max_length)
    vectors = embed_items(model, processor, items, args.batch_tokens, pooling=args.pooling, progress=True)
    for path in write_vectors(vectors, output):
        log.info("wrote %s (%d x %d)", path, *vectors.shape)
    if args.show:
        print(similarity_table(vectors[: args.show], names[: args.show]))
    return vectors


if __name__ == "__main__":
    main()
