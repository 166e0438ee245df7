"""Processor: templating, image-pad expansion, truncation, packing metadata and clear input errors."""

import json

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
        ({"text": MARKER, "images": [b"not an image at all"]}, ImageError, "<bytes>: not an image format PIL reads$"),
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


def _truncation_case(proc):
    """"before IMG after..." -> (item, sample, text before, image block, text after) as id lists."""
    text = "before the image, " + MARKER + " and after the image there is much more text to cut"
    item = {"text": text, "images": [random_image(112, 112)]}
    full = proc.encode(item)
    ids = full.input_ids.tolist()
    first_pad, n = ids.index(PAD), ids.count(PAD)
    assert ids[first_pad - 1] == VS and ids[first_pad + n] == VE
    return item, full, ids[: first_pad - 1], ids[first_pad - 1 : first_pad + n + 1], ids[first_pad + n + 1 :]


def test_truncation_keeps_images_whole_and_cuts_text(proc):
    item, full, before, block, after = _truncation_case(proc)
    assert len(before) >= 3 and len(after) >= 6
    cuts = {
        # a limit inside the image: the image stays whole, text before it is cut, text after it goes
        len(before) + len(block) - 2: before[:-2] + block,
        # a limit past the image: the text after it is cut to fit
        len(before) + len(block) + 4: before + block + after[:4],
        # exactly the image: no text at all
        len(block): block,
    }
    for limit, expected in cuts.items():
        cut = proc.truncate(full, limit)
        assert cut.input_ids.tolist() == expected and len(cut) == limit
        assert cut.grids == full.grids and torch.equal(cut.patches, full.patches)
    limit = len(before) + len(block) + 4
    # max_length in the processor applies the same rule
    limited = Processor.from_pretrained("tiny", max_length=limit)
    assert limited.encode(item).input_ids.tolist() == before + block + after[:4]


def test_truncation_keeps_every_image_of_several(proc):
    imgs = [random_image(112, 112, seed=1), random_image(84, 56, seed=2)]
    text = "one " + MARKER + " two three four five " + MARKER + " six seven eight"
    full = proc.encode({"text": text, "images": imgs})
    ids = full.input_ids.tolist()
    is_image = [False] * len(ids)
    for j, tok in enumerate(ids):  # an image's span: its pads, the vision_start before, the vision_end after
        if tok == PAD:
            is_image[j] = is_image[j - 1] = is_image[j + 1] = True
    n_image = sum(is_image)
    cut = proc.truncate(full, n_image + 3)
    kept_text = [tok for tok, img in zip(ids, is_image) if not img][:3]
    assert [tok for tok in cut.input_ids.tolist() if tok not in (PAD, VS, VE)] == kept_text
    assert cut.input_ids.tolist().count(PAD) == ids.count(PAD) and cut.grids == full.grids
    assert len(cut) == n_image + 3


def _release_truncation(ids: list[int], limit: int) -> tuple[list[int], int]:
    """The release's Truncation.truncate on one sequence (an independent algorithm, by counting markers): cut at
    `limit`; an image left unfinished (more vision_starts than vision_ends) is padded out from its vision_start
    on, pads dropped here -> (ids kept, images kept)."""
    cut = ids[:limit]
    if cut.count(VS) != cut.count(VE):
        cut = cut[: len(cut) - 1 - cut[::-1].index(VS)]
    return cut, cut.count(VS)


@pytest.mark.parametrize("text", [
    "one " + MARKER + " two three four five " + MARKER + " six seven eight",
    MARKER + MARKER + " a caption after two images",  # images back to back, the first at the very start
])
def test_training_truncation_is_the_releases_rule_at_every_limit(proc, text):
    """drop_images (CPT and CL data): the first `limit` tokens, less an image that would be cut and all after it,
    the kept images' patches and grids with them; nothing left (an image at the start over the limit) raises."""
    from moca.processor import TruncationError

    imgs = [random_image(112, 112, seed=1), random_image(84, 56, seed=2)]
    full = proc.encode({"text": text, "images": imgs})
    ids = full.input_ids.tolist()
    rows = [t * h * w for t, h, w in full.grids]
    seen = set()
    for limit in range(1, len(ids) + 2):
        expected, n_images = _release_truncation(ids, limit)
        if not expected:
            with pytest.raises(TruncationError, match=f"starts with an image of {ids.index(VE) + 1} tokens"):
                proc.truncate(full, limit, drop_images=True)
            continue
        cut = proc.truncate(full, limit, drop_images=True)
        assert cut.input_ids.tolist() == expected and cut.grids == full.grids[:n_images]
        if n_images:
            assert torch.equal(cut.patches, full.patches[: sum(rows[:n_images])])
        else:
            assert cut.patches is None
        seen.add(n_images)
    assert seen == {0, 1, 2} if text.startswith("one") else seen == {1, 2}


def test_images_over_the_limit_raise_instead_of_being_dropped(proc):
    from moca.processor import TruncationError

    item, full, before, block, after = _truncation_case(proc)
    with pytest.raises(TruncationError, match=f"1 image\\(s\\) take {len(block)} tokens .*max_length={len(block) - 1}"):
        proc.truncate(full, len(block) - 1)
    with pytest.raises(TruncationError):
        Processor.from_pretrained("tiny", max_length=len(block) - 1).encode(item)
    with pytest.raises(ValueError, match="at least 1"):
        Processor.from_pretrained("tiny", max_length=0)


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


def _checkpoint(path, preprocessor):
    """A checkpoint folder as far as the processor reads one: config.json and maybe preprocessor_config.json."""
    from moca.config import ModelConfig

    (path / "config.json").write_text(json.dumps(ModelConfig.from_name("tiny").to_hf_config()))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return str(path)


STOCK = {"min_pixels": 3136, "max_pixels": 12845056}  # Qwen2.5-VL's own preprocessor_config.json


@pytest.mark.parametrize("file, tokens, expect", [
    (STOCK, None, (256, 1024)),  # Qwen's stock 4..16384 tokens an image -> MoCa's, as the release passes them
    ({"size": {"shortest_edge": 3136, "longest_edge": 12845056}}, None, (256, 1024)),  # the same, spelled as size
    ({"min_pixels": 16 * 784, "max_pixels": 64 * 784}, None, (16, 64)),  # any other (a tiny run's own): kept
    (None, None, (256, 1024)),  # no file: MoCa's
    (STOCK, (64, 128), (64, 128)),  # chosen
])
def test_checkpoint_image_resolution_is_mocas_unless_chosen(tmp_path, file, tokens, expect):
    """Image grids against transformers' Qwen2-VL image processor given the expected min/max pixels, as the
    release's code gives them (MOCA.md §1: 256..1024 merged tokens an image)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Processor.from_pretrained(_checkpoint(tmp_path, file), image_tokens=tokens)
    ref = Qwen2VLImageProcessorPil(min_pixels=expect[0] * 784, max_pixels=expect[1] * 784)
    for w, h in ((2000, 1500), (100, 80)):  # over 1024 and under 256 tokens at MoCa's bounds, 16384 and 4 at Qwen's
        img = random_image(w, h)
        grid = tuple(int(v) for v in ref(img, return_tensors="np")["image_grid_thw"][0])
        assert proc.encode({"text": MARKER, "images": [img]}).grids == (grid,), (w, h)


def test_preset_image_resolution_and_bad_bounds():
    from engine.train import build_parser
    from moca.processor import PRESET_IMAGE_CONFIG, image_config

    assert image_config("tiny") == PRESET_IMAGE_CONFIG["tiny"]
    assert (image_config("tiny", (8, 32)).min_pixels, image_config("tiny", (8, 32)).max_pixels) == (8 * 784, 32 * 784)
    with pytest.raises(ValueError, match="min <= max"):
        image_config("tiny", (64, 16))
    with pytest.raises(SystemExit):  # the command lines refuse them when parsing
        build_parser().parse_args(["cl", "--image-tokens", "64", "16"])
    assert build_parser().parse_args(["cl", "--image-tokens", "16", "64"]).image_tokens == (16, 64)


def test_text_without_images_is_taken_literally(proc):
    """`<image>` / `<|image_N|>` name images only in an input that has images: elsewhere they are text."""
    text = "an HTML <image> tag and a <|image_1|> marker"
    assert proc.encode({"text": text}).input_ids.tolist() == proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="names 1 image"):  # the Qwen marker itself still needs its image
        proc.encode({"text": MARKER + " alone"})


class _Rows(torch.utils.data.Dataset):
    def __init__(self, parts):
        self.parts = parts

    def __len__(self):
        return 1

    def __getitem__(self, i):
        from moca.batch import cat_rows

        rows = cat_rows(self.parts)
        return rows.is_shared(), rows  # shared before the worker pickles it: sending it copies nothing


def test_cat_rows_equals_torch_cat_and_is_shared_memory_in_a_worker():
    """The packed patches: torch.cat's values (mixed dtypes promoted); built in a DataLoader worker they are
    already in shared memory, so the batch reaches the main process without a copy."""
    from moca.batch import cat_rows

    parts = [torch.randn(5, 7), torch.randn(3, 7, dtype=torch.float64), torch.randn(1, 7)]
    got = cat_rows(parts)
    assert got.dtype == torch.float64 and got.is_contiguous() and torch.equal(got, torch.cat(parts))
    assert not got.is_shared()
    ((shared, rows),) = torch.utils.data.DataLoader(_Rows(parts), batch_size=None, num_workers=1)
    assert shared and torch.equal(rows, torch.cat(parts))
