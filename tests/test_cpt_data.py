"""CPT data: sources, validation of bad records, cached costs, packed micro-batches."""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine import synthetic
from engine.data import CPTData, open_source, parse_source, source_costs
from engine.masking import add_mask_token
from hf_oracle import random_image
from moca import Processor
from moca.image import ImageConfig
from moca.processor import IMAGE_MARKER

PAD, VS = 151655, 151652


@pytest.fixture(scope="module")
def proc():
    p = Processor.from_pretrained("tiny")
    add_mask_token(p.tokenizer)
    return p


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_bad_jsonl(root) -> tuple[str, dict[int, str]]:
    """12 records: 8 good, 4 bad (corrupt image bytes, missing image, marker mismatch, empty text)."""
    os.makedirs(root, exist_ok=True)
    recs, bad = [], {}
    for i in range(12):
        name = f"img{i}.png"
        with open(os.path.join(root, name), "wb") as f:
            f.write(png(random_image(60 + 13 * i, 90 - 3 * i, seed=i)))
        recs.append({"text": f"Record {i} shows {IMAGE_MARKER} some noise number {i}.", "images": [name]})
    with open(os.path.join(root, "img3.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # corrupt bytes behind a PNG signature
    bad[3] = "cannot decode"
    recs[5]["images"] = ["does_not_exist.png"]
    bad[5] = "not found"
    recs[7]["text"] = "two markers " + IMAGE_MARKER + IMAGE_MARKER + " one image"
    bad[7] = "marker"
    recs[10]["text"] = "   "
    bad[10] = "empty text"
    recs.append({"text": "plain text record without images", "images": []})
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path, bad


def expected_cost(proc, rec, max_len):
    """Oracle: the encoded sample has text + image tokens + 2 per image; cost adds 3 more per image token."""
    sample = proc.encode(rec)
    n_img_tokens = int((sample.input_ids == PAD).sum())
    return min(max_len, len(sample) + 3 * n_img_tokens)


def test_parse_source():
    assert parse_source("data/x.jsonl:500") == ("data/x.jsonl", 500)
    assert parse_source("data/x.jsonl") == ("data/x.jsonl", None)
    assert parse_source("synthetic:300") == ("synthetic:300", None)
    assert parse_source("synthetic:300:40") == ("synthetic:300", 40)


@pytest.mark.parametrize("spec", ["synthetic:abc", "synthetic:0", "synthetic:-3", "synthetic:abc:5"])
def test_bad_synthetic_spec_is_one_data_error_naming_it(proc, spec):
    from engine.data import DataError

    with pytest.raises(DataError, match=rf"^data source '{spec.removesuffix(':5')}': the synthetic one is "
                                        r"synthetic\[:N\], N >= 1 records$"):
        CPTData([spec], proc)


def test_bad_records_are_skipped_counted_and_logged(proc, tmp_path, caplog):
    path, bad = write_bad_jsonl(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="moca"):
        data = CPTData([path], proc, max_len=256, budget=600, cache_dir=str(tmp_path / "cache"), progress=False)
    reasons = data.bad[path]
    assert sorted(reasons) == sorted(bad)
    for i, why in bad.items():
        assert why in reasons[i].lower().replace("_", " ") or why in reasons[i], reasons[i]
        assert f"bad record: {path}:{i + 1}: " in caplog.text  # one record per line, no blank lines
    src = open_source(path)
    good = [i for i in range(len(src)) if i not in bad]
    assert sorted(data.items[:, 1].tolist()) == good
    for item, (_, ri) in enumerate(data.items):
        assert data.costs[item] == expected_cost(proc, src[int(ri)], 256)


def test_cost_cache_is_reused_and_keyed_by_image_settings(proc, tmp_path, caplog):
    path, _ = write_bad_jsonl(tmp_path / "src")
    cache = str(tmp_path / "cache")
    src = open_source(path)
    c1, b1 = source_costs(src, proc, 256, cache, progress=False)
    assert len(os.listdir(cache)) == 1
    with caplog.at_level(logging.INFO, logger="moca"):
        c2, b2 = source_costs(src, proc, 256, cache, progress=False)
    assert "from cache" in caplog.text and np.array_equal(c1, c2) and b1 == b2
    other = Processor(proc.tokenizer, proc.config, ImageConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28))
    c3, _ = source_costs(src, other, 256, cache, progress=False)
    assert len(os.listdir(cache)) == 2 and not np.array_equal(c1, c3)
    source_costs(src, proc, 128, cache, progress=False)  # max_len is part of the key too
    assert len(os.listdir(cache)) == 3


def test_bins_cover_each_epoch_once_within_budget(proc, tmp_path):
    data = CPTData(["synthetic:150"], proc, max_len=200, budget=700, cache_dir=str(tmp_path), progress=False)
    bins = data.epoch_bins(0)
    flat = np.concatenate(bins)
    assert sorted(flat.tolist()) == list(range(len(data)))
    for b in bins:
        assert data.costs[b].sum() <= 700 or len(b) == 1
    assert not all(np.array_equal(x, y) for x, y in zip(bins, data.epoch_bins(1)))  # reshuffled per epoch
    n0 = len(bins)
    assert np.array_equal(data.bin(n0 + 2), data.epoch_bins(1)[2])  # the endless sequence crosses epochs
    mb = data.micro_batch(3)
    assert mb.items == data.bin(3).tolist() and all(len(s) <= 200 for s in mb.samples)


def test_truncation_drops_an_image_it_would_cut(proc, tmp_path):
    rec = {"text": "word " * 40 + IMAGE_MARKER + " tail", "images": [png(random_image(112, 112))]}
    path = tmp_path / "long.jsonl"
    img = tmp_path / "a.png"
    img.write_bytes(rec["images"][0])
    path.write_text(json.dumps({"text": rec["text"], "images": ["a.png"]}) + "\n")
    full = proc.encode(rec)
    start = full.input_ids.tolist().index(VS)
    max_len = len(full) - 3  # a cut inside the image's tail: the image goes, the text before it stays (MOCA.md §2)
    data = CPTData([str(path)], proc, max_len=max_len, budget=4096, cache_dir=str(tmp_path / "c"), progress=False)
    (sample,) = data.micro_batch(0).samples
    assert torch.equal(sample.input_ids, full.input_ids[:start]) and sample.grids == () and sample.patches is None
    assert data.costs[0] == max_len  # the reference's cost, capped at max_len (MOCA.md §2)


def test_mixture_counts_are_drawn_per_source(proc, tmp_path):
    path, bad = write_bad_jsonl(tmp_path / "src")
    data = CPTData([f"{path}:20", "synthetic:50:7"], proc, max_len=256, budget=600, seed=3,
                   cache_dir=str(tmp_path / "cache"), progress=False)
    src_ids = data.items[:, 0]
    assert (src_ids == 0).sum() == 20 and (src_ids == 1).sum() == 7
    drawn = data.items[src_ids == 0, 1]
    assert not set(drawn.tolist()) & set(bad) and len(set(drawn.tolist())) == 9  # every good record, repeated


def _table_records():
    recs = [synthetic.record(1, i) for i in range(6)]
    recs[2] = {"text": recs[2]["text"] + IMAGE_MARKER, "images": recs[2]["images"]}  # marker mismatch
    return recs


def test_parquet_folder(proc, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = _table_records()
    root = tmp_path / "pq"
    root.mkdir()
    for k, part in enumerate((recs[:4], recs[4:])):
        table = pa.table({"text": [r["text"] for r in part], "images": [r["images"] for r in part]})
        pq.write_table(table, root / f"part-{k}.parquet", row_group_size=2)
    src = open_source(str(root), cache_dir=str(tmp_path / "c"))
    assert len(src) == 6 and src[5]["images"] == recs[5]["images"]
    data = CPTData([str(root)], proc, max_len=512, budget=2000, cache_dir=str(tmp_path / "c"), progress=False)
    assert list(data.bad[str(root)]) == [2] and len(data) == 5
    one = open_source(str(root / "part-1.parquet"), cache_dir=str(tmp_path / "c"))  # one file is a source too
    assert [one[i] for i in range(len(one))] == [{"text": r["text"], "images": r["images"]} for r in recs[4:]]


def test_parquet_records_are_read_without_decoding_parquet(tmp_path, monkeypatch):
    """A shuffled epoch reads records at random; one Parquet row costs its whole row group (often the whole
    file), so records come from a memory-mapped Arrow copy made once per file (and again when it changes)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    recs = _table_records()
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in recs], "images": [r["images"] for r in recs],
                             "url": [f"u{i}" for i in range(6)]}), path)
    cache = tmp_path / "c"
    src = open_source(str(path), cache_dir=str(cache))
    copies = sorted(os.listdir(cache))
    assert len(copies) == 1 and copies[0].endswith(".arrow")

    def no_parquet(*args, **kwargs):
        raise AssertionError("a record read decoded Parquet")

    with monkeypatch.context() as m:
        m.setattr(pq, "ParquetFile", no_parquet)
        m.setattr(pq, "read_table", no_parquet)
        assert [src[i] for i in (5, 0, 3)] == [{"text": recs[i]["text"], "images": recs[i]["images"]} for i in (5, 0, 3)]
        assert len(open_source(str(path), cache_dir=str(cache))) == 6  # the copy is reused
    pq.write_table(pa.table({"text": ["changed"], "images": [[]]}), path)
    assert open_source(str(path), cache_dir=str(cache))[0] == {"text": "changed", "images": []}


def test_hf_save_to_disk_layout(proc, tmp_path):
    pa = pytest.importorskip("pyarrow")

    recs = _table_records()
    root = tmp_path / "hf"
    root.mkdir()
    image_type = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # datasets' Image feature
    table = pa.table({"text": [r["text"] for r in recs],
                      "images": pa.array([[{"bytes": b, "path": None} for b in r["images"]] for r in recs], image_type)})
    with pa.OSFile(str(root / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    data = CPTData([str(root)], proc, max_len=512, budget=2000, cache_dir=str(tmp_path / "c"), progress=False)
    assert list(data.bad[str(root)]) == [2] and len(data) == 5
    sample = data.micro_batch(0).samples[0]
    assert len(sample) > 0
    img = Image.open(io.BytesIO(open_source(str(root))[0]["images"][0]["bytes"]))
    assert img.size == (synthetic.SIZE, synthetic.SIZE)


def test_text_only_record_takes_image_tags_as_text(proc):
    """Web text with an HTML `<image>` tag and no images is text, as Processor.encode (and the release) take it:
    not a bad record for a marker without an image. With an image, the alias is the image's marker."""
    from engine.data import RecordError, record_cost

    text = "HTML: <image> tag and <|image_1|>"
    n = len(proc.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert record_cost({"text": text, "images": []}, proc, 1280) == n == len(proc.encode({"text": text}).input_ids)
    image = synthetic.record(1, 0)["images"][0]
    with pytest.raises(RecordError, match="2 image marker"):
        record_cost({"text": text, "images": [image]}, proc, 1280)


def test_table_with_wrong_columns_is_one_data_error(tmp_path):
    """A table without a `text` column is one DataError when it is opened, naming the file and its columns (not a
    bad record per row after a full cost pass), and its Parquet is not copied; `images` is optional."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from engine.data import DataError

    cache = tmp_path / "c"
    pq.write_table(pa.table({"caption": ["a", "b"], "images": [[], []]}), tmp_path / "wrong.parquet")
    with pytest.raises(DataError, match=r"wrong.parquet: missing column\(s\) text; its columns: caption, images"):
        open_source(str(tmp_path / "wrong.parquet"), cache_dir=str(cache))
    assert not cache.exists() or not os.listdir(cache)
    table = pa.table({"caption": ["a"]})
    with pa.OSFile(str(tmp_path / "wrong.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pytest.raises(DataError, match=r"wrong.arrow: missing column\(s\) text; its columns: caption"):
        open_source(str(tmp_path / "wrong.arrow"))
    pq.write_table(pa.table({"text": ["only text"]}), tmp_path / "text.parquet")
    assert open_source(str(tmp_path / "text.parquet"), cache_dir=str(cache))[0] == {"text": "only text", "images": []}


def test_each_epoch_and_seed_regroups_the_records_and_bins_train_in_shuffled_order(proc, tmp_path):
    """The plan is a function of (seed, epoch): each epoch packs a new permutation of the records (other bins, not
    the same bins reordered), so does another seed, and the bins are trained shuffled, not in the packer's order
    (first-fit-decreasing opens bins largest item first); bin(i) enters epoch 1 at exactly its first bin."""
    kw = dict(max_len=200, budget=700, cache_dir=str(tmp_path), progress=False)
    data = CPTData(["synthetic:150"], proc, **kw)
    groups = lambda bins: {frozenset(b.tolist()) for b in bins}  # noqa: E731
    e0, e1 = data.epoch_bins(0), data.epoch_bins(1)
    assert groups(e0) != groups(e1)
    texts = tmp_path / "texts.jsonl"  # records that do not depend on the seed (synthetic ones do)
    texts.write_text("".join(json.dumps({"text": "word " * (1 + i * 7 % 23)}) + "\n" for i in range(60)))
    seeds = [CPTData([str(texts)], proc, seed=s, **dict(kw, budget=60)) for s in (0, 1)]
    assert np.array_equal(seeds[0].costs, seeds[1].costs)
    assert groups(seeds[0].epoch_bins(0)) != groups(seeds[1].epoch_bins(0))
    for bins in (e0, e1):
        largest = [int(data.costs[b].max()) for b in bins]
        assert len(set(largest)) > 2 and largest != sorted(largest, reverse=True)
    n0 = len(e0)
    assert np.array_equal(data.bin(n0 - 1), e0[-1]) and np.array_equal(data.bin(n0), e1[0])


def test_cost_cache_is_keyed_by_the_tokenizer(proc, tmp_path):
    """A tokenizer that splits the text differently (here: one added token for a phrase the records use) never
    reads the costs cached for another: the cached costs equal a fresh pass without a cache."""
    path, _ = write_bad_jsonl(tmp_path / "src")
    src, cache = open_source(path), str(tmp_path / "cache")
    source_costs(src, proc, 256, cache, progress=False)
    other = Processor.from_pretrained("tiny")
    add_mask_token(other.tokenizer)
    other.tokenizer.add_tokens([" some noise number"])
    fresh, _ = source_costs(src, other, 256, None, progress=False)
    assert not np.array_equal(fresh, source_costs(src, proc, 256, None, progress=False)[0])
    cached, _ = source_costs(src, other, 256, cache, progress=False)
    assert np.array_equal(cached, fresh)


def test_ranks_and_accumulation_split_the_bins_as_one_rank_does(monkeypatch):
    """W ranks x A accumulation steps see, step by step, exactly the bins that one rank with W * A accumulation steps
    sees, and the run consumes the endless sequence of bins without a gap or a repeat."""
    from types import SimpleNamespace

    from engine import cpt

    monkeypatch.setattr(cpt, "mask_batch", lambda packed, *args, **kwargs: packed)  # this test follows bin indices only
    task = cpt.CPTTask.__new__(cpt.CPTTask)
    task.seed, task.special_ids, task.mask_id, task.mlm_prob, task.mae_prob, task.merge = 0, None, 0, 0.4, 0.5, 4
    task.processor = SimpleNamespace(pack=lambda samples: samples[0])
    task.data = SimpleNamespace(micro_batch=lambda index: SimpleNamespace(samples=[index]))

    def step_bins(step, world, accum):
        return sorted(b for rank in range(world) for b in task.micro_batches(step, rank, world, accum))

    for world, accum in [(2, 1), (3, 1), (2, 2), (4, 3)]:
        steps = [step_bins(step, world, accum) for step in range(3)]
        assert steps == [step_bins(step, 1, world * accum) for step in range(3)]
        assert sorted(b for bins in steps for b in bins) == list(range(3 * world * accum))
