"""Truncation in the training data: CPT micro-batches and CL examples are cut by the release's rule (MOCA.md §2:
an image whose tokens would be cut goes, with all after it), through `engine.data.truncate_record`."""

import json
import logging

import pytest
import torch

from engine.data import CPTData
from hf_oracle import random_image
from moca import Processor
from moca.processor import IMAGE_MARKER

PAD, VS, VE = 151655, 151652, 151653


def test_cpt_micro_batches_cut_records_by_the_releases_rule(tmp_path, caplog, monkeypatch):
    """112x112 -> 16 image pads + vision_start/end = 18 tokens in the tiny preset; max_len 28."""
    monkeypatch.setattr("engine.data._dropped_images", False)  # as in a fresh process
    proc = Processor.from_pretrained("tiny")
    for i in range(3):
        random_image(112, 112, seed=i).save(tmp_path / f"{i}.png")
    records = [
        # the image fits whole, the tail is cut
        {"text": "a short head " + IMAGE_MARKER + " and a tail " * 5, "images": ["0.png"]},
        # the image would be cut: it goes, the text before it stays
        {"text": "many words of text " * 4 + IMAGE_MARKER + " tail", "images": ["1.png"]},
        # three images, 54 tokens alone: the first stays, the second would be cut, the rest goes with it
        {"text": "a " + IMAGE_MARKER + " b " + IMAGE_MARKER + " c " + IMAGE_MARKER + " d",
         "images": ["0.png", "1.png", "2.png"]},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    max_len = 28
    data = CPTData([str(tmp_path / "data.jsonl")], proc, max_len=max_len, budget=4096,
                   cache_dir=str(tmp_path / "cache"), workers=1, progress=False)
    assert not any(data.bad.values())  # the three-image record was a bad record under the old rule
    with caplog.at_level(logging.DEBUG, logger="moca"):
        batch = data.micro_batch(0)
    assert sorted(batch.items) == [0, 1, 2] and data.runtime_bad == 0
    got = dict(zip(batch.items, batch.samples))
    full = [proc.encode({**r, "images": [str(tmp_path / p) for p in r["images"]]}) for r in records]
    ids = [f.input_ids.tolist() for f in full]
    assert all(len(x) > max_len for x in ids)
    first_vs = [x.index(VS) for x in ids]
    assert first_vs[0] + 18 <= max_len < first_vs[1] + 18 and first_vs[1] < max_len
    second_vs = ids[2].index(VS, first_vs[2] + 1)
    assert first_vs[2] + 18 <= max_len < second_vs + 18
    expected = [(ids[0][:max_len], 1), (ids[1][: first_vs[1]], 0), (ids[2][:second_vs], 1)]
    for i, (kept, n_images) in enumerate(expected):
        assert got[i].input_ids.tolist() == kept and got[i].grids == full[i].grids[:n_images]
        if n_images:
            assert torch.equal(got[i].patches, full[i].patches[: 64 * n_images])
        else:
            assert got[i].patches is None
    dropped = [r for r in caplog.records if "image(s) dropped" in r.getMessage()]
    assert [r.levelno for r in dropped] == [logging.INFO, logging.DEBUG]  # the first at info level, then debug
    messages = " | ".join(r.getMessage() for r in dropped)
    assert "data.jsonl:2: cut at max_len=28, 1 of its 1 image(s) dropped" in messages  # FILE:LINE of the record
    assert "data.jsonl:3: cut at max_len=28, 2 of its 3 image(s) dropped" in messages


def test_cost_pass_counts_the_reference_cost_and_flags_records_truncation_would_empty(tmp_path):
    """A record's cost is the reference's (MOCA.md §2): text tokens + 4 x merged image tokens + 2 per image,
    capped at max_len, and never below the LLM tokens of the sample truncation leaves; a record that opens
    with an image over max_len is a bad record there, one with the image later is cut."""
    from engine.data import record_cost, truncate_record
    from moca.processor import TruncationError

    proc = Processor.from_pretrained("tiny")
    random_image(112, 112, seed=0).save(tmp_path / "a.png")
    rec = {"text": "words " * 40 + IMAGE_MARKER + " tail", "images": [str(tmp_path / "a.png")]}
    full = proc.encode(rec)
    n_image = sum(t * h * w for t, h, w in full.grids) // 4  # 16 merged tokens for 112 x 112
    uncapped = len(full) + 3 * n_image  # hand count: LLM tokens, each merged image token counted 4 times
    for max_len in (17, 24, 30, 400):
        kept = truncate_record(proc, full, max_len, "rec")
        assert record_cost(rec, proc, max_len) == min(max_len, uncapped) >= len(kept)
    assert uncapped < 400 and record_cost(rec, proc, 24) == 24  # both sides of the cap
    opens = {"text": IMAGE_MARKER + " tail", "images": [str(tmp_path / "a.png")]}
    assert record_cost(opens, proc, 18) == 18
    with pytest.raises(TruncationError, match="opens with an image of 18 tokens .*max_len=17"):
        record_cost(opens, proc, 17)
