"""CL data: marker rules, bad-record reporting, task-homogeneous global batches split over ranks,
the query's own hard negatives (skip empty, repeat the last), runtime failures replaced."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from engine.cl_data import CLData, RecordError, check_record, make_input, pick_negatives
from moca.processor import IMAGE_MARKER, Processor


@pytest.fixture(scope="module")
def processor():
    return Processor.from_pretrained("tiny")


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _rec(sub, i, n_neg, image=""):
    return {"qry": f"query {sub} {i}", "qry_image_path": image, "pos_text": f"positive {sub} {i}",
            "pos_image_path": "", "neg_text": [f"negative {sub} {i} {k}" for k in range(n_neg)],
            "neg_image_path": [""] * n_neg}


@pytest.fixture()
def subsets(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    a = [_rec("alpha", i, 1 + i % 3) for i in range(13)]
    a[2]["qry_image_path"] = "ok.png"
    a[2]["qry"] = "<|image_1|>\nquery alpha 2"
    a[4] = {**a[4], "qry": "", "qry_image_path": ""}  # empty query
    a[5] = {**a[5], "qry": "<|image_1|> query alpha 5", "qry_image_path": "missing.png"}  # no such file
    a[6] = {**a[6], "neg_image_path": ["", "", "", ""]}  # 2 neg_text vs 4 neg_image_path
    a[7]["neg_text"] = ["", "negative alpha 7 1", ""]  # empty negatives are skipped
    a[7]["neg_image_path"] = ["", "", ""]
    a[8] = {**a[8], "qry": "<|image_1|> query alpha 8", "qry_image_path": "broken.png"}  # fails when decoded
    a[9] = {**a[9], "neg_text": [], "neg_image_path": []}  # no negative in a subset that has them
    b = [_rec("beta", i, 0) for i in range(9)]  # no hard negatives anywhere
    _write(tmp_path / "alpha.jsonl", a[:3] + ["", "{not json"] + a[3:])  # a blank line 4: skipped, still a line
    _write(tmp_path / "beta.jsonl", b)
    return tmp_path


def _text(processor, sample):
    return processor.tokenizer.decode(sample.input_ids)


def test_make_input_markers():
    img = b"png"
    assert make_input("<|image_1|>\nRepresent it.", img, None) == {"text": IMAGE_MARKER + "\nRepresent it.", "images": [img]}
    assert make_input("<image> a", img, None)["text"] == IMAGE_MARKER + " a"
    assert make_input("<|image_1|>\nRepresent it.", "", None) == {"text": "\nRepresent it.", "images": []}
    assert make_input(IMAGE_MARKER + "x", None, None) == {"text": "x", "images": []}
    assert make_input("<|image_1|>", "", None) is None  # nothing left: an empty side
    assert make_input("", img, None) == {"text": "", "images": [img]}
    with pytest.raises(RecordError, match="2 image marker"):
        make_input("<|image_1|> and <|image_2|>", img, None)
    with pytest.raises(RecordError, match="0 image marker"):
        make_input("text without a marker", img, None)


def test_pick_negatives():
    assert pick_negatives(["a", "b", "c"], 2) == ["a", "b"]
    assert pick_negatives(["a"], 3) == ["a", "a", "a"]
    assert pick_negatives(["a", "b"], 4) == ["a", "b", "b", "b"]  # fewer than r: the LAST one repeats (MOCA.md §3)
    assert pick_negatives(["a", "b"], 0) == []
    with pytest.raises(RecordError):
        pick_negatives([], 2)
    ex = check_record({"qry": "q", "pos_text": "p", "neg_text": ["", "n1", "", "n3"], "neg_image_path": ""}, None)
    assert [n["text"] for n in ex.negatives] == ["n1", "n3"]


def test_negatives_stored_as_list_text_as_the_release():
    """MoCa-CL-Pairs / mmE5 store neg_text and neg_image_path as the text of a Python list (the release eval()s it)."""
    ex = check_record({"qry": "q", "pos_text": "p", "neg_text": "['n1', '', 'n3']", "neg_image_path": "['', '', '']"}, None)
    assert [n["text"] for n in ex.negatives] == ["n1", "n3"]
    ex = check_record({"qry": "q", "pos_text": "p", "neg_text": "'n1'", "neg_image_path": None}, None)
    assert [n["text"] for n in ex.negatives] == ["n1"]
    ex = check_record({"qry": "q", "pos_text": "p", "neg_text": "[not a list] of words", "neg_image_path": ""}, None)
    assert [n["text"] for n in ex.negatives] == ["[not a list] of words"]  # any other string: one negative


def test_bad_records_reported(subsets, processor, caplog):
    with caplog.at_level(logging.WARNING, logger="moca"):
        data = CLData([str(subsets / "alpha.jsonl"), str(subsets / "beta.jsonl")], processor, global_batch=4)
    # alpha's line 3 is the broken JSON, so record k >= 3 of the list above is index k + 1
    bad = data.bad["alpha"]
    assert sorted(bad) == [3, 5, 6, 7, 10]
    assert "invalid JSON" in bad[3] and "empty query" in bad[5] and "image file not found" in bad[6]
    assert "neg_text" in bad[7] and "no hard negative" in bad[10]
    assert data.bad["beta"] == {} and data.ratios == [2, 0]
    alpha = subsets / "alpha.jsonl"
    for i, line in zip([3, 5, 6, 7, 10], [5, 7, 8, 9, 12]):  # record i >= 3 is on line i + 2 (blank line 4)
        assert f"bad record: {alpha}:{line}: " in caplog.text
    assert data.num_bad == 5
    assert len(data.good[0]) == 14 - 5 and len(data.good[1]) == 9


def _decode_batch(processor, rb):
    return ([_text(processor, s) for s in rb.queries], [_text(processor, s) for s in rb.positives],
            [[_text(processor, s) for s in negs] for negs in rb.negatives])


def test_global_batches_one_subset_own_negatives_rank_slices(subsets, processor):
    specs = [str(subsets / "alpha.jsonl"), str(subsets / "beta.jsonl") + ":17"]
    data = CLData(specs, processor, global_batch=4, negative_ratio=2, seed=3)
    epoch = data.epoch(0)
    # per-subset counts: alpha all 9 good -> 2 batches, beta 17 drawn -> 4 batches
    assert sorted(si for si, _ in epoch) == [0, 0, 1, 1, 1, 1]
    seen_subsets = set()
    for k in range(len(epoch) + 3):  # into the next epoch too
        full = data.rank_batch(k, 0, 1)
        halves = [data.rank_batch(k, r, 2) for r in range(2)]
        assert full.indices == halves[0].indices + halves[1].indices
        q, p, n = _decode_batch(processor, full)
        for h in halves:
            assert h.subset == full.subset
        assert _decode_batch(processor, halves[0])[0] + _decode_batch(processor, halves[1])[0] == q
        sub = full.subset
        seen_subsets.add(sub)
        for i, (qt, pt, nts) in enumerate(zip(q, p, n)):
            j = full.indices[i] - (1 if sub == "alpha" and full.indices[i] > 3 else 0)  # position in the list
            assert qt.endswith(f"query {sub} {j}") and pt == f"positive {sub} {j}"
            if sub == "beta":
                assert nts == []
            elif j == 7:  # negatives "", "... 1", "": the empty ones skipped, the one left repeated
                assert nts == ["negative alpha 7 1"] * 2
            else:  # 1 + j % 3 negatives: the first two, or the only one repeated
                assert nts == [f"negative alpha {j} {k}" for k in ((0, 0) if j % 3 == 0 else (0, 1))]
    assert seen_subsets == {"alpha", "beta"}
    again = CLData(specs, processor, global_batch=4, negative_ratio=2, seed=3)
    assert [again.global_batch_at(k)[1].tolist() for k in range(8)] == [data.global_batch_at(k)[1].tolist() for k in range(8)]


def test_runtime_failure_replaced(subsets, processor, caplog):
    data = CLData([str(subsets / "alpha.jsonl")], processor, global_batch=9, negative_ratio=1)
    assert 9 in data.good[0].tolist()  # broken.png exists: it passes validation, fails when decoded
    with caplog.at_level(logging.WARNING, logger="moca"):
        rb = data.rank_batch(0)
    assert len(rb.queries) == 9 and 9 not in rb.indices
    assert data.runtime_bad == 1 and data.num_bad == len(data.bad["alpha"]) + 1
    assert f"bad record: {subsets / 'alpha.jsonl'}:11: " in caplog.text and "replaced" in caplog.text
    img = rb.queries[rb.indices.index(2)]  # the record with a real image: marker rewritten, patches there
    assert img.grids and (img.input_ids == processor.image_token_id).sum() == img.num_patches // 4


def test_max_per_subset_caps_subsets_given_without_a_count(subsets, processor):
    """The release drew up to 50k records a subset (MOCA.md §3): a cap samples (no repeats) a larger subset,
    leaves a smaller one whole, and does not touch a subset given with :count."""
    beta = str(subsets / "beta.jsonl")  # 9 good records, no hard negatives
    capped = CLData([beta], processor, global_batch=2, max_per_subset=6, seed=5)
    for e in range(3):
        drawn = np.concatenate([b for _, b in capped.epoch(e)])
        assert len(drawn) == 6 and len(set(drawn.tolist())) == 6  # 3 batches of distinct records
        assert sorted(drawn.tolist()) == capped.good[0].tolist() == list(range(6))  # the release's first 6, every epoch
    assert capped.counts == [6]
    assert CLData([beta], processor, global_batch=2, max_per_subset=50).counts == [9]  # smaller: whole
    assert CLData([beta + ":17"], processor, global_batch=2, max_per_subset=6).counts == [17]  # counted: as asked
    with pytest.raises(ValueError, match="max_per_subset"):
        CLData([beta], processor, global_batch=2, max_per_subset=0)


def test_upsampled_subset_never_repeats_a_record_inside_a_batch(subsets, processor):
    """beta:40 draws its 9 records over 5 permutations; batches of 4 straddle them (9 is not a multiple of 4),
    and a record twice in one batch would be its own in-batch negative. Every record still comes 4 or 5 times."""
    beta = str(subsets / "beta.jsonl")
    data = CLData([beta + ":40"], processor, global_batch=4, seed=3)
    for e in range(3):
        batches = [b.tolist() for _, b in data.epoch(e)]
        assert len(batches) == 10 and all(len(set(b)) == 4 for b in batches)
        counts = np.bincount(np.concatenate(batches))
        assert sorted(set(counts[counts > 0].tolist())) == [4, 5] and counts.sum() == 40


def test_count_above_a_small_subset_warns_of_repeats_in_a_batch(subsets, processor, caplog):
    beta = str(subsets / "beta.jsonl")  # 9 good records
    with caplog.at_level(logging.WARNING, logger="moca"):
        CLData([beta + ":24"], processor, global_batch=12)
    assert "repeated to fill global batches" in caplog.text


def test_draw_fills_a_straddling_batch_with_records_it_does_not_hold():
    from engine.cl_data import _draw

    rng = np.random.default_rng(0)
    for n, count, batch in ((5, 50, 4), (7, 70, 7), (6, 61, 5), (3, 12, 4)):
        draw = _draw(np.arange(n), count, batch, rng).tolist()
        assert len(draw) == count
        for k in range(0, count, batch):
            chunk = draw[k:k + batch]
            assert len(set(chunk)) == min(len(chunk), n)  # distinct whenever the subset has enough records
        for p in range(count // n):  # each pass of n draws is still a permutation of the subset (reordered)
            assert sorted(draw[p * n:(p + 1) * n]) == list(range(n))


def _write_table(path, records):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: [r[k] for r in records] for k in records[0]}), path)


def _mmeb_train(root):
    """MMEB-train's public layout: one folder per subset holding the `original`, `diverse_instruction` and legacy
    `train` shards of the same pairs, image paths `images/<subset>/...` from the root, zips beside them."""
    sizes = {"A-OKVQA": 10, "CIRR": 6}
    for sub, n in sizes.items():
        for split in ("original", "diverse_instruction", "train"):
            recs = [{"qry": f"<|image_1|> {split} {sub} {i}" if sub == "A-OKVQA" else f"{split} {sub} {i}",
                     "qry_image_path": f"images/{sub}/Train/{i}.png" if sub == "A-OKVQA" else "",
                     "pos_text": f"positive {sub} {i}", "pos_image_path": "", "neg_text": "", "neg_image_path": ""}
                    for i in range(n)]
            _write_table(root / sub / f"{split}-00000-of-00001.parquet", recs)
    (root / "images" / "A-OKVQA" / "Train").mkdir(parents=True)
    for i in range(sizes["A-OKVQA"]):
        Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(root / "images" / "A-OKVQA" / "Train" / f"{i}.png")
    (root / "images_zip").mkdir()
    (root / "images_zip" / "A-OKVQA.zip").write_bytes(b"zip")
    return sizes


def test_folder_of_subsets_is_one_subset_per_child(tmp_path, processor, caplog):
    """`--data mmeb-train/`: a subset per child folder (images/ and images_zip/ skipped), the `original` split
    only, images found from the root, a count or the cap per subset, every global batch one subset's."""
    from engine.cl_data import open_subsets

    root = tmp_path / "mmeb-train"
    sizes = _mmeb_train(root)
    with caplog.at_level(logging.INFO, logger="moca"):
        found = open_subsets(str(root) + "/")
    assert [(s.name, len(s), c) for s, c in found] == [(k, n, None) for k, n in sizes.items()]
    assert all(s.files == [str(root / s.name / "original-00000-of-00001.parquet")] for s, _ in found)
    assert "2 subsets: A-OKVQA, CIRR" in caplog.text
    assert [c for _, c in open_subsets(f"{root}:4")] == [4, 4]
    assert all(s.image_root == str(tmp_path / "x") for s, _ in open_subsets(str(root), str(tmp_path / "x")))
    data = CLData([str(root)], processor, global_batch=3, max_per_subset=8, seed=1)
    assert data.num_bad == 0 and data.counts == [8, 6]  # the cap is per subset
    for k in range(len(data.epoch(0))):
        rb = data.rank_batch(k)
        queries = [_text(processor, q) for q in rb.queries]
        assert len(queries) == 3 and all(f"original {rb.subset} " in q for q in queries), queries
        assert all(bool(q.grids) == (rb.subset == "A-OKVQA") for q in rb.queries)


def test_folder_of_jsonl_subsets(subsets, processor):
    """A folder of .jsonl files is a subset per file, a count applying to each."""
    from engine.cl_data import open_subsets

    (subsets / "notes.txt").write_text("not data")
    found = open_subsets(f"{subsets}:5")
    assert [(s.name, len(s), c) for s, c in found] == [("alpha", 14, 5), ("beta", 9, 5)]
    data = CLData([str(subsets)], processor, global_batch=4, negative_ratio=0)
    for k in range(len(data.epoch(0))):
        rb = data.rank_batch(k)
        assert all(f"query {rb.subset} " in _text(processor, q) for q in rb.queries)


def test_folder_with_tables_in_it_stays_one_subset(tmp_path):
    from engine.cl_data import open_subsets

    root = tmp_path / "pairs"
    for k, n in ((0, 3), (1, 2)):
        _write_table(root / f"part-{k}.parquet", [{"qry": f"q{k} {i}", "pos_text": "p"} for i in range(n)])
    _write_table(root / "more" / "part-2.parquet", [{"qry": "q2", "pos_text": "p"}])
    (found, count), = open_subsets(str(root))
    assert (found.name, len(found), count, found.image_root) == ("pairs", 6, None, str(root))


def test_table_with_wrong_columns_is_one_data_error(tmp_path):
    """A table that cannot form a query and a positive is one DataError naming the file and its columns, not a
    bad record per row; an image-only positive (no pos_text column) is a valid schema."""
    from engine.cl_data import open_subsets
    from engine.data import DataError

    bad = tmp_path / "captions" / "part-0.parquet"
    _write_table(bad, [{"caption": f"c{i}", "url": "u"} for i in range(50)])
    with pytest.raises(DataError, match=r"part-0.parquet: missing column\(s\) qry / qry_image_path, "
                                        r"pos_text / pos_image_path; its columns: caption, url"):
        open_subsets(str(bad.parent))
    ok = tmp_path / "i2i" / "part-0.parquet"
    _write_table(ok, [{"qry_image_path": "a.png", "pos_image_path": "b.png"}])
    assert len(open_subsets(str(ok.parent))[0][0]) == 1


def test_image_negative_without_text_gets_the_positive_prompt():
    """The release gives an image hard negative with an empty neg_text the positive's text (its instruction)."""
    img = b"png"
    pos = "<|image_1|>\nRepresent the given image."
    ex = check_record({"qry": "q", "pos_text": pos, "pos_image_path": img, "neg_text": ["", ""],
                       "neg_image_path": [img, img]}, None)
    assert [n["text"] for n in ex.negatives] == [IMAGE_MARKER + "\nRepresent the given image."] * 2
    assert ex.negatives[0]["images"] == [img]


def test_long_inputs_are_cut_by_the_releases_rule(tmp_path, processor, caplog, monkeypatch):
    """max_len cuts a query, positive or negative as CPT records (engine.data.truncate_record, MOCA.md §2): an image
    that would be cut goes with all after it, the text before it stays; a record losing an image is logged by name."""
    monkeypatch.setattr("engine.data._dropped_images", False)  # as in a fresh process
    Image.new("RGB", (112, 112), (20, 120, 200)).save(tmp_path / "doc.png")  # 16 pads + vision_start/end
    long_query = "a question in many words " * 4
    recs = [_rec("gamma", i, 1) for i in range(2)]
    recs[0].update(qry=long_query + "<|image_1|>", qry_image_path="doc.png")  # the image straddles max_len
    recs[1].update(pos_text="<|image_1|> a page", pos_image_path="doc.png")  # fits whole
    _write(tmp_path / "gamma.jsonl", recs)
    max_len = 30
    data = CLData([str(tmp_path / "gamma.jsonl")], processor, global_batch=2, negative_ratio=1, max_len=max_len)
    with caplog.at_level(logging.INFO, logger="moca"):
        batch = data.rank_batch(0)
    by_record = dict(zip(batch.indices, zip(batch.queries, batch.positives)))
    full = processor.encode({"text": long_query + IMAGE_MARKER, "images": [str(tmp_path / "doc.png")]})
    start = full.input_ids.tolist().index(151652)
    assert start < max_len < len(full)
    query, _ = by_record[0]
    assert query.input_ids.tolist() == full.input_ids[:start].tolist() and query.grids == () and query.patches is None
    _, positive = by_record[1]
    assert positive.grids == ((1, 8, 8),) and len(positive) < max_len
    assert f"{tmp_path / 'gamma.jsonl'}:1 query: cut at max_len=30, 1 of its 1 image(s) dropped" in caplog.text


@pytest.mark.parametrize("records", [3, 0], ids=["too-few", "empty-file"])
def test_too_few_records_for_a_global_batch_is_one_data_error(tmp_path, processor, records):
    """An empty subset (no record, no bad record) is counted like any small one, not an IndexError."""
    from engine.data import DataError

    _write(tmp_path / "pairs.jsonl", [_rec("a", i, 1) for i in range(records)])
    with pytest.raises(DataError, match=r"^no subset of \[.*pairs.jsonl'\] has the 4 usable records of one global "
                                        r"batch \(--batch-size x ranks; the log gives each subset's count\)$"):
        CLData([str(tmp_path / "pairs.jsonl")], processor, global_batch=4)


@pytest.mark.parametrize("spec", ["synthetic/foo", "synthetic/t2i/x:8", "synthetic:abc", "synthetic:0"])
def test_bad_synthetic_spec_is_one_data_error_naming_it(processor, spec):
    from engine.data import DataError

    with pytest.raises(DataError, match=rf"^data source '{spec}': the synthetic ones are synthetic\[:N\] and "
                                        r"synthetic/<task>\[:N\], N >= 1 records, <task> one of t2i, i2t, vqa, cls$"):
        CLData([spec], processor, global_batch=4)
