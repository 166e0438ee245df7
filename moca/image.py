"""Image loading and Qwen2-VL image preprocessing (pixels -> raw 14x14 patches).

Bit-for-bit equal to transformers' `Qwen2VLImageProcessor` (PIL/numpy backend): alpha is
composited onto white (as transformers' convert_to_rgb does in newer 5.x releases, 5.24 here; older
ones, the 4.50 the reference release ran and 5.17 among them, drop the alpha band by PIL's
convert("RGB"), so RGBA, LA and transparent-palette images differ from the release's pixels);
`smart_resize` picks a size whose sides are multiples of patch*merge (28) with the pixel count in
[min_pixels, max_pixels], PIL bicubic resizes, then rescale (float64 * 1/255 -> float32) and CLIP
normalisation (float32).
Key design decision: rescale+normalise of a uint8 pixel has only 256 possible results
per channel, so it is a lookup table computed with transformers' exact float ops; `host_ops.patchify`
(C++) reads the resized uint8 image once and writes every float32 value of the patch rows once, in
patch order (its NumPy reference reorders the uint8 image, then gathers from the table).

Tiny images (a side < 28 px): transformers 5.x does not raise for them; `smart_resize`
lifts every side to >= 28 in its single bicubic resize, and we do exactly the same, so
pixels and grid match transformers. MOCA.md §1 describes the reference as resizing such
images up to 28 px first (older transformers raised on them); no separate pre-upscale is
applied here, so images with a side < 28 (and only they) can differ from the release's pixels and
patch grid, hence token count.

High bit depths: 16-bit RGB(A) files decode to 8 bits in PIL already (the high byte); 16-bit
greyscale (modes `I;16*`, and `I` holding 0..65535) is scaled the same way, v >> 8, where
PIL's own convert (and transformers) would clip it to 255. Other 32-bit integer values and
float images (mode `F`) have no agreed range and are refused.
"""

import io
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from moca import host_ops
from moca.config import CheckpointError, read_json

RESCALE_FACTOR = 1 / 255
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image that cannot be used: missing, undecodable, empty or too elongated."""


@dataclass(frozen=True)
class ImageConfig:
    """Qwen2.5-VL's image preprocessing: a resized image holds min_pixels..max_pixels pixels (defaults: MoCa's
    256..1024 merged tokens of 28 x 28 px, MOCA.md §1), cut into patch_size px patches, merge_size x
    merge_size of them per LLM token, each repeated temporal_patch_size times; CLIP mean and std per channel."""

    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1024 * 28 * 28
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    @classmethod
    def from_pretrained(cls, path) -> "ImageConfig":
        """Read `path/preprocessor_config.json` (defaults when absent). As in transformers,
        explicit `min_pixels`/`max_pixels` win over `size.shortest_edge`/`size.longest_edge`."""
        file = os.path.join(os.fspath(path), "preprocessor_config.json")
        if not os.path.isfile(file):
            return cls()
        cfg = read_json(file)
        size = cfg.get("size") or {}
        kw = {}
        try:
            for name, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
                value = cfg.get(name, size.get(edge))
                if value is not None:
                    kw[name] = int(value)
            for name in ("patch_size", "temporal_patch_size", "merge_size"):
                if cfg.get(name) is not None:
                    kw[name] = int(cfg[name])
            for name in ("image_mean", "image_std"):
                if cfg.get(name) is not None:
                    kw[name] = tuple(float(v) for v in cfg[name])
        except (AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: field {name!r}: {e}") from None
        return cls(**kw)

    def to_dict(self) -> dict:
        """A preprocessor_config.json that transformers' Qwen2VLImageProcessor loads."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            "do_resize": True,
            "resample": int(Image.Resampling.BICUBIC),
            "do_rescale": True,
            "rescale_factor": RESCALE_FACTOR,
            "do_normalize": True,
            "do_convert_rgb": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }


def _to_8bit(img: Image.Image, name: str) -> Image.Image:
    """16-bit greyscale -> mode L by v >> 8 (a grey-level transparency becomes an alpha band)."""
    if img.mode == "F":
        raise ImageError(f"{name}: floating-point images (mode F) are not supported; convert to 8 bits first")
    if img.getbands() != ("I",):
        return img
    v = np.asarray(img)
    if v.size and (int(v.min()) < 0 or int(v.max()) > 65535):
        raise ImageError(f"{name}: 32-bit integer image (mode {img.mode}) with values outside 0..65535 "
                         f"({int(v.min())}..{int(v.max())}): not supported; convert to 8 or 16 bits first")
    grey = Image.fromarray((v.astype(np.uint32) >> 8).astype(np.uint8))
    key = img.info.get("transparency")
    if isinstance(key, int):
        grey = Image.merge("LA", (grey, Image.fromarray(np.where(v == key, 0, 255).astype(np.uint8))))
    return grey


def _to_rgb(img: Image.Image) -> Image.Image:
    # transformers' convert_to_rgb: any transparency is composited onto white.
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src) -> Image.Image:
    """PIL image, bytes, path or HF-datasets dict {"bytes": ..} / {"path": ..} -> decoded RGB image."""
    if isinstance(src, dict):
        data, path = src.get("bytes"), src.get("path")
        if data is None and not path:
            raise ImageError("image dict has neither 'bytes' nor 'path'")
        src = data if data is not None else path
        name = os.fspath(path) if path else "<bytes>"
    elif isinstance(src, Image.Image):
        name = "<PIL image>"
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = "<bytes>"
    elif isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
    else:
        raise TypeError(f"cannot load an image from {type(src).__name__}")

    try:
        if isinstance(src, Image.Image):
            img = src
            img.load()
        elif isinstance(src, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(src)))
            img.load()
        else:
            with open(src, "rb") as f:
                img = Image.open(f)
                img.load()
    except FileNotFoundError as e:
        raise ImageError(f"image file not found: {name}") from e
    except Image.UnidentifiedImageError as e:  # its message names the BytesIO object, not the input
        raise ImageError(f"cannot decode image {name}: not an image format PIL reads") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error...) on bad data
        raise ImageError(f"cannot decode image {name}: {e}") from e
    if img.width == 0 or img.height == 0:
        raise ImageError(f"zero-sized image {name} ({img.width}x{img.height})")
    return _to_rgb(_to_8bit(img, name))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' smart_resize, same float ops in the same order -> (new_height, new_width)."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {width}x{height}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(width: int, height: int, config: ImageConfig = ImageConfig()) -> tuple[int, int, int]:
    """(t, h, w) patch grid of an image of this size, without touching pixels."""
    factor = config.patch_size * config.merge_size
    h, w = smart_resize(height, width, factor, config.min_pixels, config.max_pixels)
    return 1, h // config.patch_size, w // config.patch_size


@lru_cache(maxsize=8)
def _normalise_table(mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) float32: normalised value of every uint8 level, with transformers' float ops."""
    levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean32) / std32
    table.flags.writeable = False
    return table


def preprocess_image(image, config: ImageConfig = ImageConfig()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Anything `load_image` takes -> (patches (t*h*w, 3*T*p*p) float32, (t, h, w) grid).

    Rows are raw patches in merge order (each merge x merge group contiguous); a row is
    laid out (channel, temporal, p, p), the flattening of a Conv3d weight.
    """
    img = load_image(image)
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size
    t, gh, gw = image_grid(img.width, img.height, config)
    img = img.resize((gw * p, gh * p), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(img)  # (H, W, 3) uint8
    table = _normalise_table(tuple(config.image_mean), tuple(config.image_std))
    return host_ops.patchify(pixels, table, p, m, tp), (t, gh, gw)
