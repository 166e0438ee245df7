"""Processor: templating, image-pad expansion, truncation, packing metadata and clear input errors."""

import numpy as np
import pytest
import torch

from hf_oracle import random_image
from moca import Processor
from moca.image import ImageError

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
PAD, VS, VE = 151655, 151652, 151653


@pytest.fixture(scope="module")
def proc():
    return Processor.from_pretrained("tiny")


def test_text_tokens_equal_the_tokenizer(proc):
    text = "Find me an everyday image that matches the given caption: A cat and a dog.\n"
    sample = proc.encode({"text": text})
    assert sample.input_ids.tolist() == proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert sample.patches is None and sample.grids == ()


def test_image_pad_expands_to_the_grid(proc):
    img = random_image(140, 84)
    sample = proc.encode({"text": "look " + MARKER + " here", "images": [img]})
    (t, h, w), = sample.grids
    n = t * h * w // 4
    ids = sample.input_ids.tolist()
    assert ids.count(PAD) == n and sample.patches.shape == (t * h * w, 1176)
    first = ids.index(PAD)
    assert ids[first - 1] == VS and ids[first + n] == VE
    # The expansion equals tokenising the text with the pad written out n times.
    expanded = "look <|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|> here"
    assert ids == proc.tokenizer(expanded, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("alias", ["<image>", "<|image_1|>"])
def test_marker_aliases(proc, alias):
    img = random_image(60, 60)
    a = proc.encode({"text": alias + "Represent the given image.", "images": [img]})
    b = proc.encode({"text": MARKER + "Represent the given image.", "images": [img]})
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.patches, b.patches)


def test_images_without_text_get_markers(proc):
    img = random_image(60, 90)
    a = proc.encode({"images": [img]})
    b = proc.encode({"text": MARKER, "images": [img]})
    assert torch.equal(a.input_ids, b.input_ids)


@pytest.mark.parametrize(
    "item, error, message",
    [
        ({"text": MARKER + " and " + MARKER, "images": [None]}, ValueError, "names 2 image"),
        ({"text": "no marker here", "images": [b"x"]}, ValueError, "names 0 image"),
        ({"text": MARKER}, ValueError, "names 1 image"),
        ({"text": MARKER, "images": [b"not an image at all"]}, ImageError, "<bytes>"),
        ({"text": ""}, ValueError, "empty input"),
        ("just a string", TypeError, "dict"),
    ],
    ids=["markers>images", "images>markers", "marker-no-image", "corrupt-bytes", "empty", "not-a-dict"],
)
def test_bad_inputs_raise_clear_errors(proc, item, error, message):
    with pytest.raises(error, match=message):
        proc.encode(item)


def test_missing_image_file_is_named(proc, tmp_path):
    with pytest.raises(ImageError, match="missing.png"):
        proc.encode({"text": MARKER, "images": [str(tmp_path / "missing.png")]})


def test_truncation_drops_a_cut_image_whole(proc):
    img = random_image(112, 112)
    text = "before " + MARKER + " after the image there is more text"
    full = proc.encode({"text": text, "images": [img]})
    (t, h, w), = full.grids
    first_pad = full.input_ids.tolist().index(PAD)
    n = t * h * w // 4
    # Cut inside the image: the image and its vision_start go, nothing of it remains.
    cut = proc.truncate(full, first_pad + n // 2)
    assert cut.grids == () and cut.patches is None
    assert cut.input_ids.tolist() == full.input_ids[: first_pad - 1].tolist()
    # Cut after the image's vision_end: the image stays whole.
    keep = proc.truncate(full, first_pad + n + 3)
    assert keep.grids == full.grids and torch.equal(keep.patches, full.patches)
    assert keep.input_ids.tolist() == full.input_ids[: first_pad + n + 3].tolist()
    limited = Processor.from_pretrained("tiny", max_length=first_pad + n // 2)
    assert torch.equal(limited.encode({"text": text, "images": [img]}).input_ids, cut.input_ids)


def test_pack_metadata(proc):
    items = [{"text": "one"}, {"text": MARKER + " two", "images": [random_image(84, 56)]}, {"text": "three four five"}]
    samples = [proc.encode(i) for i in items]
    batch = proc.pack(samples)
    lengths = [len(s) for s in samples]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert batch.max_seqlen == max(lengths)
    assert batch.sample_ids.tolist() == sum(([i] * n for i, n in enumerate(lengths)), [])
    assert batch.image_token_index.tolist() == (batch.input_ids == PAD).nonzero().flatten().tolist()
    assert batch.position_ids.shape == (3, batch.num_tokens)
    for i in range(3):  # positions restart at 0 for every sample
        assert batch.position_ids[:, batch.cu_seqlens[i]].tolist() == [0, 0, 0]
    assert torch.equal(batch.window_index[batch.window_reverse], torch.arange(batch.window_index.numel()))
    assert int(batch.window_cu_seqlens[-1]) == batch.patches.shape[0]
