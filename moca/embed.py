"""Embed texts, images and interleaved inputs: `embed_items` (Python) and `python -m moca.embed` (CLI).

The high-throughput path, in three stages:
1. Cost of every input, cheaply (`item_costs`): text length from one batched tokenizer call per
   4096 inputs (the Rust tokenizer's threads) plus the image grids read from the image headers
   (PIL opens lazily), never the pixels, so a huge data set is never held as patches.
2. The C++ packer sorts inputs by cost and packs them into micro-batches under a token budget
   (`host_ops.pack_bins`): nothing is padded and long and short inputs never share a padded shape.
3. A torch DataLoader whose workers decode, preprocess and pack each micro-batch
   (`num_workers`; 0 = in this process) while the model runs the previous one; on CUDA the
   batches arrive in pinned memory, are copied with `non_blocking=True`, and the vectors come
   back through a pinned buffer one batch late, so the host never waits on the device in the loop.
   The CLI writes them straight into a memory-mapped .npy (`vector_files`): a corpus's vectors never
   have to fit in host memory.
Each sample attends only to itself, so vectors equal embedding one input at a time; they come
back in input order. An input that cannot be embedded is an InputError naming it (FILE:LINE
for --jsonl, else its index); nothing is written unless every input embeds.

    python -m moca.embed                                   # built-in examples on the tiny preset
    python -m moca.embed --model CKPT --text "a cat" --image cat.jpg --output out.npy
    python -m moca.embed --model CKPT --jsonl inputs.jsonl --output vectors.npy --num-workers 8
"""

import argparse
import contextlib
import errno
import io
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moca import host_ops
from moca.batch import Sample
from moca.checkpoint import check_model_name, load_model
from moca.config import CheckpointError
from moca.image import ImageError, image_grid
from moca.processor import (COUNT, IMAGE_MARKER, POSITIVE, Processor, TruncationError, add_image_tokens_arg,
                            check_images_fit, device_arg, item_parts)

log = logging.getLogger("moca")


class InputError(ValueError):
    """An input that cannot be embedded; the message names it (FILE:LINE or `input i`) and the reason."""


def _where(names, i: int) -> str:
    return names[i] if names is not None else f"input {i}"


def sample_cost(sample: Sample) -> int:
    """Work a sample brings to a micro-batch: LLM tokens plus raw vision patches."""
    return len(sample) + sample.num_patches


def image_size(src) -> tuple[int, int]:
    """(width, height) of anything `load_image` takes, from the header only (PIL opens lazily)."""
    if isinstance(src, Image.Image):
        return src.size
    name = "<bytes>"
    if isinstance(src, dict):
        data, path = src.get("bytes"), src.get("path")
        if data is None and not path:
            raise ImageError("image dict has neither 'bytes' nor 'path'")
        src = data if data is not None else path
        name = os.fspath(path) if path else name
    elif isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
    elif not isinstance(src, (bytes, bytearray, memoryview)):
        raise TypeError(f"cannot load an image from {type(src).__name__}")  # as load_image says
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(src))) as img:
                return img.size
        with Image.open(src) as img:
            return img.size
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {name}") from e
    except Image.UnidentifiedImageError as e:  # its message names the BytesIO object, not the input
        raise ImageError(f"cannot decode image {name}: not an image format PIL reads") from e
    except Exception as e:  # PIL raises many types on a bad header
        raise ImageError(f"cannot decode image {name}: {e}") from e


def item_cost(processor: Processor, item: dict) -> int:
    """`sample_cost` of `processor.encode(item)` without decoding pixels. Raises the errors `encode`
    would: a missing image names its path, images over `max_length` are a TruncationError."""
    text, images = item_parts(item)
    return _cost(processor, len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]), images)


def item_costs(processor: Processor, items: list, names: list[str] | None = None, chunk: int = 4096) -> torch.Tensor:
    """`item_cost` of every item -> (N,) int64, the texts tokenised `chunk` at a time in one batched call
    (the Rust tokenizer's threads: ~1.7x on 2 cores, more with more). InputError naming the input
    (`names`, else `input i`) for one that cannot be embedded, before any pixel is decoded."""
    parts = []
    for i, item in enumerate(items):
        try:
            parts.append(item_parts(item))
        except (ValueError, TypeError) as e:
            raise InputError(f"{_where(names, i)}: {e}") from e
    costs = torch.empty(len(items), dtype=torch.int64)
    for start in range(0, len(parts), chunk):
        block = parts[start : start + chunk]
        ids = processor.tokenizer([text for text, _ in block], add_special_tokens=False)["input_ids"]
        for i, (tokens, (_, images)) in enumerate(zip(ids, block), start):
            try:
                costs[i] = _cost(processor, len(tokens), images)
            except (ValueError, TypeError) as e:
                raise InputError(f"{_where(names, i)}: {e}") from e
    return costs


def _cost(processor: Processor, text_tokens: int, images: list) -> int:
    """The cost of an input whose text (markers in place) is `text_tokens` tokens long, with `images`."""
    merge = processor.config.vision.spatial_merge_size**2
    grids = [image_grid(*image_size(img), processor.image_config) for img in images]
    image_tokens = sum(t * h * w // merge for t, h, w in grids)
    check_images_fit(grids, image_tokens + 2 * len(images), processor.max_length)  # + vision_start/end
    tokens = text_tokens - len(images) + image_tokens  # each marker becomes its image's tokens
    if processor.max_length is not None:
        tokens = min(tokens, processor.max_length)
    return tokens + sum(t * h * w for t, h, w in grids)


class PackedBins(Dataset):
    """Bin b -> (input indices (n,) int64, PackedBatch of those inputs, None), or (indices, None, the
    InputError's message) when an input fails: raised by the caller, so that a DataLoader worker's
    failure reads as one line, not as the worker's traceback."""

    def __init__(self, processor: Processor, items: list, order: torch.Tensor, offsets: torch.Tensor, names=None):
        self.processor, self.items, self.order, self.offsets = processor, items, order, offsets.tolist()
        self.names = names

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, b: int):
        idx = self.order[self.offsets[b] : self.offsets[b + 1]]
        samples = []
        for i in idx.tolist():
            try:
                samples.append(self.processor.encode(self.items[i]))
            except (ValueError, TypeError) as e:  # pixels that do not decode although the header did
                return idx, None, f"{_where(self.names, i)}: {e}"
        return idx, self.processor.pack(samples), None


@torch.no_grad()
def embed_items(
    model,
    processor: Processor,
    items,
    batch_tokens: int = 16384,
    pooling: str = "mean",
    num_workers: int = 0,
    max_items: int = 0,
    progress: bool = False,
    names: list[str] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """items: iterable of {"text", "images"} dicts -> (N, hidden) float32 L2-normalised, input order.

    batch_tokens: budget of LLM tokens + raw patches per micro-batch (an input over it runs alone);
    num_workers: DataLoader processes decoding images and packing batches (0 = this process);
    max_items: most inputs per micro-batch (0 = unlimited);
    names: how errors name each input (e.g. FILE:LINE; default `input i`, its index in `items`).
    pooling: "mean" (MoCa) or "last"; out: the (N, hidden) float32 tensor to fill and return (e.g. a memory-mapped
    file's: `vector_files`), else a new one. InputError, naming the input, for one that cannot be embedded;
    ValueError for an `out` of another shape or dtype.
    """
    items = list(items)
    device = next(model.parameters()).device
    shape = (len(items), model.config.hidden_size)
    if out is not None and (tuple(out.shape) != shape or out.dtype != torch.float32):
        raise ValueError(f"out must be a {shape} float32 tensor, got {tuple(out.shape)} {out.dtype}")
    vectors = torch.empty(shape, dtype=torch.float32) if out is None else out
    if not items:
        return vectors
    costs = item_costs(processor, items, names)
    order, offsets = host_ops.pack_bins(costs, batch_tokens, max_items)
    cuda = device.type == "cuda"
    if num_workers > 0:
        # the cost pass used the tokenizer's thread pool; forked workers must not inherit it
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        PackedBins(processor, items, order, offsets, names),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=cuda,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    bar = tqdm(total=len(items), desc="embed", unit="input", disable=not progress, file=sys.stderr)
    pending = None  # CUDA: (indices, pinned host vectors, event) of the batch before
    for idx, batch, error in loader:
        if error is not None:
            raise InputError(error)
        out = model.embed(batch.to(device, non_blocking=cuda), pooling=pooling)
        if cuda:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            if pending is not None:
                _finish(vectors, *pending)
            pending = (idx, host, event)
        else:
            vectors[idx] = out
        bar.update(idx.numel())
    if pending is not None:
        _finish(vectors, *pending)
    bar.close()
    return vectors


def _finish(vectors: torch.Tensor, idx: torch.Tensor, host: torch.Tensor, event) -> None:
    event.synchronize()
    vectors[idx] = host


def read_jsonl(path: str, image_root: str | None = None) -> tuple[list[dict], list[str]]:
    """Objects with "text" and/or "images" (paths, relative to image_root or the file's folder)
    -> (items, their "FILE:LINE" names). Blank lines are skipped; a file with no object is an error."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    items, names = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: not valid JSON ({e.msg})") from None
            try:
                item_parts(obj)  # the checks every input gets: a dict, text a string, images a list, a key typo
            except (TypeError, ValueError) as e:
                raise InputError(f"{where}: {e}") from None
            text, images = obj.get("text") or "", obj.get("images") or []
            if not all(isinstance(p, str) and p for p in images):
                raise InputError(f"{where}: 'images' must be a list of image paths")
            items.append({"text": text, "images": [p if os.path.isabs(p) else os.path.join(root, p) for p in images]})
            names.append(where)
    if not items:
        raise InputError(f"{path}: no inputs (the file is empty or holds only blank lines)")
    return items, names


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


def vector_paths(path: str) -> tuple[str, str]:
    """--output (with or without a .npy / .safetensors suffix, any case) -> (.npy, .safetensors) paths;
    InputError if either is an existing folder or `path` names one (a trailing '/', '.' or '..')."""
    root, ext = os.path.splitext(path)
    targets = {".npy": (path, root + ".safetensors"), ".safetensors": (root + ".npy", path)}.get(
        ext.lower(), (path + ".npy", path + ".safetensors"))
    for folder in (path, *targets):
        if os.path.isdir(folder) or os.path.basename(folder) in ("", ".", ".."):
            raise InputError(f"--output {path}: {folder} is a folder; give a file path such as "
                             f"{os.path.join(folder, 'embeddings.npy')}")
    return targets


def writable_folder(folder: str, flag: str) -> None:
    """Create `folder` (and parents) and check that a file can be written in it, before any compute:
    NotADirectoryError if it is a file, PermissionError if it cannot be made or written (a probe file,
    deleted at once: nothing is left behind). Each message names `flag` and the folder."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{flag}: {folder} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise PermissionError(f"{flag}: cannot write in {folder} ({e.strerror or e})") from None


# A user's mistake (a bad path, file, input or --model), not a bug: the CLIs print it as one line.
USER_ERRORS = (CheckpointError, InputError, ImageError, TruncationError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError)


def run_cli(main, prog: str, errors: tuple = ()) -> None:
    """`python -m` entry: run main(); a user error (USER_ERRORS or `errors`) or a full disk or quota ends the
    process with status 1 and one line `prog: message` on stderr; anything else (a bug) keeps its traceback.
    Ctrl-C (KeyboardInterrupt) ends it with status 130, the shell's for SIGINT, and the line `prog: interrupted`."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if not isinstance(e, USER_ERRORS + tuple(errors)) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        message = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
        sys.exit(f"{prog}: {message}")
    except USER_ERRORS + tuple(errors) as e:
        sys.exit(f"{prog}: {e}")


def _allocate(path: str) -> None:
    """Give the (sparse) file its blocks now, so that a full disk is an OSError here rather than a SIGBUS when a
    page of its memory map is written; a no-op where the platform or file system cannot (macOS, some FUSE)."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


@contextlib.contextmanager
def vector_files(path: str, n: int, dim: int):
    """Yield an (n, dim) float32 tensor backed by a memory-mapped .npy temp file, so the vectors of a large job
    stream to disk instead of living in host memory. On a clean exit the .npy and a .safetensors copy
    (`vector_paths(path)`; key "embeddings") are renamed into place; on an exception neither is written and
    no temp file is left. The .npy's blocks are allocated up front: OSError (ENOSPC) before any vector if
    the disk cannot hold it."""
    from safetensors.torch import save_file

    targets = vector_paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(targets[0])), exist_ok=True)
    temps = [t + ".tmp" for t in targets]
    try:
        array = np.lib.format.open_memmap(temps[0], mode="w+", dtype=np.float32, shape=(n, dim))
        _allocate(temps[0])
        yield torch.from_numpy(array)
        array.flush()
        save_file({"embeddings": torch.from_numpy(array)}, temps[1])
        shutil.copymode(temps[0], temps[1])  # safetensors writes 0600; the .npy has the umask's mode
        for tmp, final in zip(temps, targets):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


def main(argv=None) -> torch.Tensor:
    p = argparse.ArgumentParser(prog="python -m moca.embed", description="Embed texts, images and interleaved inputs.")
    p.add_argument("--model", default="tiny", help="a preset (tiny, 3b, 7b) or an HF checkpoint directory")
    # one list in command-line order: the vectors' rows follow it
    p.add_argument("--text", dest="inputs", action="append", type=lambda v: ("text", v),
                   help="a text input (repeatable; rows follow the order of --text and --image)")
    p.add_argument("--image", dest="inputs", action="append", type=lambda v: ("image", v),
                   help="an image file input, embedded as the bare image (repeatable)")
    p.add_argument("--jsonl", help='a JSONL file of {"text": ..., "images": [paths]} objects')
    p.add_argument("--image-root", help="folder that relative image paths in --jsonl start from")
    p.add_argument("--output", default=None, help="where to write vectors (.npy, plus .safetensors beside it)")
    p.add_argument("--batch-tokens", type=POSITIVE, default=16384, help="token budget per micro-batch")
    p.add_argument("--num-workers", type=COUNT, default=None,
                   help="DataLoader processes decoding images and packing batches (default: 4 on CUDA; 0 on a CPU, "
                        "which they would only take from the model)")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-length", type=POSITIVE, default=None,
                   help="tokens per input (default: no limit); a longer one has its text cut from the end, its "
                   "images kept whole, and one whose images alone exceed it is an error")
    add_image_tokens_arg(p)
    p.add_argument("--show", type=COUNT, default=8, help="print the cosine-similarity table of the first N inputs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    items, names = [], []
    for kind, value in args.inputs or []:
        items.append({"text": value} if kind == "text" else {"text": IMAGE_MARKER, "images": [value]})
        names.append(f"text: {value[:24]}" if kind == "text" else f"image: {os.path.basename(value)}")
    if args.jsonl:
        file_items, file_names = read_jsonl(args.jsonl, args.image_root)
        items += file_items
        names += file_names
    demo = not items
    if demo:
        items, names = demo_items()
        log.info("no inputs given: embedding %d built-in examples with model %r", len(items), args.model)
    output = args.output or (os.path.join("runs", "embed", "embeddings.npy") if demo else "embeddings.npy")
    check_model_name(args.model)  # a bad --model or --output fails before the model loads
    writable_folder(os.path.dirname(os.path.abspath(vector_paths(output)[0])), f"--output {output}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)

    model = load_model(args.model, device=args.device, dtype=dtype)
    processor = Processor.from_pretrained(args.model, max_length=args.max_length, image_tokens=args.image_tokens)
    workers = args.num_workers if args.num_workers is not None else (4 if args.device.startswith("cuda") else 0)
    with vector_files(output, len(items), model.config.hidden_size) as vectors:
        embed_items(model, processor, items, args.batch_tokens, pooling=args.pooling, num_workers=workers,
                    progress=True, names=names, out=vectors)
    for path in vector_paths(output):
        log.info("wrote %s (%d x %d)", path, *vectors.shape)
    if args.show:
        print(similarity_table(vectors[: args.show], names[: args.show]))
    return vectors


if __name__ == "__main__":
    run_cli(main, "moca.embed")  # a bad input or path: one line naming it, not a traceback (nothing was written)
