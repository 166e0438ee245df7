"""Truncation in the training data (#13 item 10): CPT micro-batches keep every image whole and
cut text, through the same `Processor.truncate` that CL data (`engine.cl_data`) calls."""

import json

import pytest
import torch

from engine.data import CPTData
from hf_oracle import random_image
from moca import Processor
from moca.processor import IMAGE_MARKER

PAD, VS, VE = 151655, 151652, 151653


def test_cpt_micro_batches_keep_whole_images_and_cut_text(tmp_path):
    proc = Processor.from_pretrained("tiny")
    records = []
    for i in range(4):  # 112x112 -> 16 image pads + vision_start/end = 18 tokens in the tiny preset
        random_image(112, 112, seed=i).save(tmp_path / f"{i}.png")
        text = f"record {i}: " + "many words of text " * 10 + IMAGE_MARKER + " and a tail " * 5
        records.append({"text": text, "images": [f"{i}.png"]})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    max_len = 18 + 6
    data = CPTData([str(tmp_path / "data.jsonl")], proc, max_len=max_len, budget=4096,
                   cache_dir=str(tmp_path / "cache"), workers=1, progress=False)
    batch = data.micro_batch(0)
    assert sorted(batch.items) == [0, 1, 2, 3] and data.runtime_bad == 0
    for sample, item in zip(batch.samples, batch.items):
        full = proc.encode({"text": records[item]["text"], "images": [str(tmp_path / f"{item}.png")]})
        ids = full.input_ids.tolist()
        first = ids.index(PAD)
        # the text before the image is cut to 6 tokens; the image comes whole; the tail goes
        assert sample.input_ids.tolist() == ids[:6] + [VS] + [PAD] * 16 + [VE]
        assert ids[first - 1] == VS and ids[first + 16] == VE and len(ids) > max_len
        assert sample.grids == full.grids and torch.equal(sample.patches, full.patches)


def test_cost_pass_counts_the_reference_cost_and_flags_images_over_max_len(tmp_path):
    """A record's cost is the reference's (MOCA.md §2): text tokens + 4 x merged image tokens + 2 per image,
    capped at max_len, and never below the LLM tokens of the sample `Processor.truncate` leaves; images alone
    over max_len are a bad record there."""
    from engine.data import record_cost
    from moca.processor import TruncationError

    proc = Processor.from_pretrained("tiny")
    random_image(112, 112, seed=0).save(tmp_path / "a.png")
    rec = {"text": "words " * 40 + IMAGE_MARKER + " tail", "images": [str(tmp_path / "a.png")]}
    full = proc.encode(rec)
    n_image = sum(t * h * w for t, h, w in full.grids) // 4  # 16 merged tokens for 112 x 112
    uncapped = len(full) + 3 * n_image  # hand count: LLM tokens, each merged image token counted 4 times
    for max_len in (24, 30, 400):
        assert record_cost(rec, proc, max_len) == min(max_len, uncapped) >= len(proc.truncate(full, max_len))
    assert uncapped < 400 and record_cost(rec, proc, 24) == 24  # both sides of the cap
    with pytest.raises(TruncationError, match="max_length=17"):  # the image's 18 tokens do not fit
        record_cost(rec, proc, 17)
