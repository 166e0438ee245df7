"""moca.image against transformers' Qwen2-VL image processor (PIL/numpy backend, which is what
`transformers.Qwen2VLImageProcessor` resolves to without torchvision and what MoCa's release ran).
Transparency: ours composites onto white, as transformers' convert_to_rgb does in its newer 5.x
releases; older ones dropped the alpha band, and there the alpha cases are skipped."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
    smart_resize,
)

from moca.image import ImageConfig, ImageError, image_grid, load_image, preprocess_image

MOCA = ImageConfig()
SMALL = ImageConfig(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)


def _rng(*key):
    return np.random.default_rng([1234, *key])


def _random_image(width, height, mode="RGB", seed=0):
    rng = _rng(width, height, seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2, "CMYK": 4}[mode]
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _reference(image, config):
    proc = Qwen2VLImageProcessorPil(min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    out = proc(image, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def _assert_same(image, config):
    ours, grid = preprocess_image(image, config)
    ref, ref_grid = _reference(image, config)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert grid == ref_grid
    np.testing.assert_array_equal(ours, ref)
    return ours, grid


@pytest.mark.parametrize("config", [SMALL, MOCA], ids=["small", "moca"])
@pytest.mark.parametrize("size", [(20, 20), (28, 28), (1, 7), (37, 211), (500, 17), (131, 257), (2000, 1500)])
def test_pixels_and_grid_match_transformers(size, config):
    ours, grid = _assert_same(_random_image(*size), config)
    assert grid == image_grid(*size, config)
    t, h, w = grid
    assert ours.shape == (t * h * w, 3 * 2 * 14 * 14)
    assert config.min_pixels <= h * w * 14 * 14 <= config.max_pixels


def _transformers_composites_alpha() -> bool:
    from transformers.image_transforms import convert_to_rgb

    clear = Image.new("RGBA", (1, 1), (0, 0, 0, 0))  # a transparent black pixel: white once composited
    return np.asarray(convert_to_rgb(clear)).reshape(-1).tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "CMYK", "P-transparent"])
def test_colour_modes_match_transformers(mode):
    if mode in ("RGBA", "LA", "P-transparent") and not _transformers_composites_alpha():
        pytest.skip("this transformers drops the alpha band instead of compositing onto white")
    if mode == "P-transparent":
        img = _random_image(61, 45).quantize(colors=16)
        img.info["transparency"] = 3
    else:
        img = _random_image(61, 45, mode)
    _assert_same(img, SMALL)
    assert load_image(img).mode == "RGB"


def test_sources_agree(tmp_path):
    img = _random_image(83, 59, "RGBA")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()
    path = tmp_path / "img.png"
    path.write_bytes(data)
    want, grid = preprocess_image(img, SMALL)
    dicts = ({"bytes": data, "path": None}, {"bytes": None, "path": str(path)})
    for src in (data, bytearray(data), path, str(path), *dicts):
        got, got_grid = preprocess_image(src, SMALL)
        assert got_grid == grid
        np.testing.assert_array_equal(got, want)


def test_patch_rows_are_conv3d_inputs_in_merge_order():
    """Independent of transformers: rows @ flattened Conv3d weight == Conv3d over the 2-frame clip,
    with rows in 2x2-merge-group order."""
    img = _random_image(97, 131)
    patches, (t, gh, gw) = preprocess_image(img, SMALL)
    resized = load_image(img).resize((gw * 14, gh * 14), Image.Resampling.BICUBIC)
    resized = np.asarray(resized, dtype=np.float64)
    mean, std = np.asarray(SMALL.image_mean), np.asarray(SMALL.image_std)
    chw = torch.from_numpy(((resized / 255 - mean) / std).transpose(2, 0, 1).copy())
    clip = chw[None, :, None].expand(1, 3, 2, gh * 14, gw * 14)  # (1, C, T, H, W)
    weight = torch.randn(5, 3, 2, 14, 14, dtype=torch.float64)
    conv = torch.nn.functional.conv3d(clip, weight, stride=(2, 14, 14))[0, :, 0]  # (5, gh, gw)
    conv = conv.reshape(5, gh // 2, 2, gw // 2, 2).permute(1, 3, 2, 4, 0).reshape(gh * gw, 5)
    ours = torch.from_numpy(patches.astype(np.float64)) @ weight.reshape(5, -1).T
    torch.testing.assert_close(ours, conv, rtol=0, atol=1e-4)


def test_image_grid_matches_smart_resize_on_many_sizes():
    rng = _rng(7)
    halfway = [(14, 70), (70, 126), (182, 14), (1386, 1022)]  # sides at 28k+14: Python rounds half to even
    sizes = np.concatenate([halfway, rng.integers(1, 60, (200, 2)), rng.integers(1, 5000, (300, 2))])
    for config in (SMALL, MOCA):
        for w, h in sizes.tolist():
            if max(w, h) / min(w, h) > 200:
                with pytest.raises(ImageError, match="aspect ratio"):
                    image_grid(w, h, config)
                continue
            rh, rw = smart_resize(h, w, 28, config.min_pixels, config.max_pixels)
            assert image_grid(w, h, config) == (1, rh // 14, rw // 14)


def test_extreme_aspect_ratio_raises():
    img = _random_image(403, 2)
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(img, SMALL)
    with pytest.raises(ValueError):
        _reference(img, SMALL)


def test_config_roundtrip_and_transformers_loads_it(tmp_path):
    config = ImageConfig(min_pixels=8 * 28 * 28, max_pixels=48 * 28 * 28)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config.to_dict()))
    assert ImageConfig.from_pretrained(tmp_path) == config
    proc = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert proc.size["shortest_edge"] == config.min_pixels
    assert proc.size["longest_edge"] == config.max_pixels
    img = _random_image(300, 71)
    ours, grid = preprocess_image(img, config)
    ref = proc(img, return_tensors="np")
    assert grid == tuple(int(v) for v in ref["image_grid_thw"][0])
    np.testing.assert_array_equal(ours, ref["pixel_values"])


def test_from_pretrained_spellings(tmp_path):
    assert ImageConfig.from_pretrained(tmp_path) == ImageConfig()
    file = tmp_path / "preprocessor_config.json"
    file.write_text(json.dumps({"size": {"shortest_edge": 3136, "longest_edge": 12845056}}))
    assert ImageConfig.from_pretrained(tmp_path) == ImageConfig(min_pixels=3136, max_pixels=12845056)
    # as in transformers, explicit min/max_pixels win over size
    size = {"shortest_edge": 1, "longest_edge": 2}
    file.write_text(json.dumps({"min_pixels": 784, "max_pixels": 9408, "size": size}))
    assert ImageConfig.from_pretrained(tmp_path) == ImageConfig(min_pixels=784, max_pixels=9408)
    proc = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (784, 9408)


def test_load_image_errors_name_the_source(tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="nope.jpg"):
        load_image(missing)
    with pytest.raises(ImageError, match="nope.jpg"):
        load_image({"bytes": None, "path": str(missing)})
    junk = _rng(3).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="<bytes>"):
        load_image(junk)
    buf = io.BytesIO()
    _random_image(64, 64).save(buf, "PNG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]  # header intact: fails only when decoded
    with pytest.raises(ImageError, match="<bytes>"):
        load_image({"bytes": truncated})
    with pytest.raises(ImageError, match="<PIL image>"):
        load_image(Image.open(io.BytesIO(truncated)))  # a lazily opened PIL image is decoded here too
    bad = tmp_path / "bad.png"
    bad.write_bytes(truncated)
    with pytest.raises(ImageError, match="bad.png"):
        load_image(str(bad))
    with pytest.raises(ImageError, match="zero-sized"):
        load_image(Image.new("RGB", (0, 5)))
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------- high bit depths (#13 item 14)
def _png16(arr):
    """(H, W[, C]) uint16 -> 16-bit PNG bytes written by hand (PIL cannot write 16-bit colour PNGs);
    C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA."""
    import struct
    import zlib

    arr = arr if arr.ndim == 3 else arr[:, :, None]
    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _ramp16(width=112, height=112):
    """0..65535 over the image, row-major: every 8-bit level appears."""
    n = width * height
    return (np.arange(n, dtype=np.uint64) * 65535 // (n - 1)).astype(np.uint16).reshape(height, width)


def test_16bit_greyscale_png_scales_to_8_bits():
    ramp = _ramp16()
    img = Image.open(io.BytesIO(_png16(ramp)))
    assert img.mode == "I;16"
    rgb = np.asarray(load_image(img))
    expected = (ramp >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)
    assert len(np.unique(rgb)) == 256
    # the patches are those of the 8-bit image, which transformers processes right
    eight = Image.fromarray(expected)
    ours, grid = preprocess_image(_png16(ramp), SMALL)
    ref, ref_grid = _reference(eight, SMALL)
    assert grid == ref_grid
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_integer_modes_scale_to_8_bits(mode):
    v = _rng(5).integers(0, 65536, (9, 13)).astype(np.uint16)
    if mode == "I":
        img = Image.fromarray(v.astype(np.int32))
    else:
        img = Image.frombytes(mode, (13, 9), v.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(img))[..., 1], v >> 8)


@pytest.mark.parametrize("channels", [2, 3, 4], ids=["LA", "RGB", "RGBA"])
def test_16bit_colour_pngs_keep_the_high_byte(channels):
    v = _rng(6, channels).integers(0, 65536, (9, 13, channels)).astype(np.uint16)
    if channels != 3:
        v[..., -1] = 65535  # opaque: compositing onto white leaves the colour
    got = np.asarray(load_image(_png16(v)))
    grey = v[..., :1] if channels == 2 else v[..., :3]
    np.testing.assert_array_equal(got, np.broadcast_to(grey >> 8, got.shape))


def test_16bit_grey_transparency_becomes_white():
    v = _ramp16(16, 4)
    img = Image.open(io.BytesIO(_png16(v)))
    img.info["transparency"] = int(v[1, 3])
    got = np.asarray(load_image(img))
    assert (got[1, 3] == 255).all() and got[0, 0, 0] == 0 and got[3, 15, 0] == 255 and got[2, 2, 0] == v[2, 2] >> 8


def test_unscalable_bit_depths_are_refused():
    with pytest.raises(ImageError, match=r"<PIL image>: floating-point images \(mode F\)"):
        load_image(Image.fromarray(np.ones((4, 4), np.float32)))
    with pytest.raises(ImageError, match=r"values outside 0..65535 \(-1..70000\)"):
        load_image(Image.fromarray(np.array([[-1, 70000]], np.int32)))


def test_bad_preprocessor_config_names_the_file(tmp_path):
    from moca.config import CheckpointError

    file = tmp_path / "preprocessor_config.json"
    file.write_text('{"min_pixels": 3136,')
    with pytest.raises(CheckpointError, match="preprocessor_config.json: not valid JSON"):
        ImageConfig.from_pretrained(tmp_path)
    file.write_text('{"min_pixels": "many"}')
    with pytest.raises(CheckpointError, match="preprocessor_config.json: field 'min_pixels'"):
        ImageConfig.from_pretrained(tmp_path)


def test_aspect_ratio_of_exactly_200_is_allowed_like_transformers():
    """transformers refuses an aspect ratio above 200 only: 200 itself resizes (to transformers' grid), 200 plus a
    little does not."""
    for w, h in [(2, 400), (400, 2), (3, 600), (70, 14000)]:
        assert max(w, h) / min(w, h) == 200
        rh, rw = smart_resize(h, w, 28, SMALL.min_pixels, SMALL.max_pixels)
        assert image_grid(w, h, SMALL) == (1, rh // 14, rw // 14)
    for w, h in [(2, 401), (401, 2)]:
        with pytest.raises(ValueError):
            smart_resize(h, w, 28, SMALL.min_pixels, SMALL.max_pixels)
        with pytest.raises(ImageError, match="aspect ratio"):
            image_grid(w, h, SMALL)
