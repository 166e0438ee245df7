"""MMEB and ViDoRe v2 evaluation on fixture data sets written here in the public schemas.

Oracles: every input embedded alone through `model.embed(proc([item]))` with the prompt
rewriting done by hand in the test, and precision@1 / nDCG@5 recomputed with plain loops.
MMEB rows are built so their hits are known whatever the random weights: a query repeated
as candidate 0 is right (equal vectors: argmax-first), repeated as candidate 2 is wrong.
"""

import json
import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from engine import eval_data
from engine.evaluate import Embedder, evaluate_mmeb, evaluate_vidore, score_beir, score_mmeb_subset, summarize_mmeb
from hf_oracle import random_image

MARKER = "<|vision_start|><|image_pad|><|vision_end|>"
PHI = "<|image_1|>"
CLS = PHI + "\nRepresent the given image for classification\n"


def write_mmeb(root):
    """Two subsets plus images; returns (data dir, image dir, expected hits per subset)."""
    data, images = root / "mmeb", root / "images"
    for i, (w, h) in enumerate([(40, 30), (57, 61), (30, 90), (64, 48), (33, 33)]):
        (images / "sub").mkdir(parents=True, exist_ok=True)
        random_image(w, h, seed=10 + i).save(images / "sub" / f"{i}.png")
    img = [f"sub/{i}.png" for i in range(5)]
    subsets = {
        # image query, text labels (ImageNet-style); row 0 and 2 repeat the query as candidate 0
        "ImageNet-1K": [
            (CLS, img[0], [CLS, "tench", "goldfish", "shark"], [img[0], "", "", ""], True),
            (CLS, img[1], ["tench", "goldfish", CLS, "shark"], ["", "", img[1], ""], False),
            (CLS, img[2], [CLS, "goldfish", "tench"], [img[2], "", ""], True),
        ],
        # text query (with a stray Phi marker and no image: removed), image candidates
        "MSCOCO_t2i": [
            (PHI + "Find me an everyday image that matches the given caption: a cat.", "",
             ["<|image_1|>\nRepresent the given image.\n"] * 2 + [PHI + "Find me an everyday image that matches the given caption: a cat."],
             [img[3], img[4], ""], False),
            ("a dog", "", ["a dog", "<|image_1|>\nRepresent the given image.\n"], ["", img[3]], True),
        ],
    }
    expected = {}
    for name, rows in subsets.items():
        (data / name).mkdir(parents=True)
        table = pa.table({
            "qry_text": [r[0] for r in rows],
            "qry_img_path": [r[1] for r in rows],
            "tgt_text": [r[2] for r in rows],
            "tgt_img_path": [r[3] for r in rows],
        })
        pq.write_table(table, data / name / "test-00000-of-00001.parquet")
        expected[name] = [r[4] for r in rows]
    return data, images, expected


def oracle_text(text, has_image):
    return text.replace(PHI, MARKER) if has_image else text.replace(PHI, "")


@pytest.fixture(scope="module")
def tiny():
    embedder = Embedder("tiny", device="cpu", attn_backend="torch", batch_tokens=400)
    return embedder, *embedder.load()


@torch.no_grad()
def embed_alone(model, proc, item):
    return model.embed(proc([item]))[0]


def test_mmeb_scores_cache_and_oracle(tiny, tmp_path, monkeypatch, capsys):
    embedder, model, proc = tiny
    data, images, expected = write_mmeb(tmp_path)
    out = tmp_path / "out"
    scores = evaluate_mmeb(embedder, str(data), str(images), str(out))

    on_disk = json.loads((out / "scores.json").read_text())
    assert on_disk == json.loads(json.dumps(scores))
    p_cls, p_t2i = 2 / 3, 1 / 2
    assert scores["subsets"]["ImageNet-1K"] == {"precision@1": pytest.approx(p_cls), "n": 3}
    assert scores["subsets"]["MSCOCO_t2i"] == {"precision@1": pytest.approx(p_t2i), "n": 2}
    assert scores["meta_tasks"]["Classification"] == {"precision@1": pytest.approx(p_cls), "n_subsets": 1}
    assert scores["meta_tasks"]["Retrieval"] == {"precision@1": pytest.approx(p_t2i), "n_subsets": 1}
    assert scores["meta_tasks"]["VQA"] == {"precision@1": None, "n_subsets": 0}
    assert scores["splits"]["IND"]["precision@1"] == pytest.approx((p_cls + p_t2i) / 2)
    assert scores["overall"] == pytest.approx((p_cls + p_t2i) / 2) and scores["complete"] is False
    assert "ImageNet-1K" in capsys.readouterr().out

    # the cached vectors are each unique input embedded alone, and rows score as the loop oracle says
    for name in expected:
        subset = eval_data.load_mmeb_subset(str(data), name, str(images))
        (cache,) = (out / "embeddings" / "mmeb").glob(f"{name}-*.safetensors")
        vectors = load_file(cache)["embeddings"]
        single = torch.stack([embed_alone(model, proc, it) for it in subset.inputs.items])
        assert (vectors - single).abs().max().item() <= 1e-5
        assert score_mmeb_subset(vectors, subset).tolist() == expected[name]
        table = pq.read_table(data / name / "test-00000-of-00001.parquet").to_pylist()
        for row, hit in zip(table, expected[name]):
            q = embed_alone(model, proc, {"text": oracle_text(row["qry_text"], bool(row["qry_img_path"])),
                                          "images": [str(images / row["qry_img_path"])] if row["qry_img_path"] else []})
            sims = [float(q @ embed_alone(model, proc, {"text": oracle_text(t, bool(i)), "images": [str(images / i)] if i else []}))
                    for t, i in zip(row["tgt_text"], row["tgt_img_path"])]
            assert (max(range(len(sims)), key=lambda j: (sims[j], -j)) == 0) == hit

    # a rerun scores from the cache without loading or running the model
    fresh = Embedder("tiny", device="cpu", attn_backend="torch")
    monkeypatch.setattr(Embedder, "load", lambda self: pytest.fail("re-embedded despite the cache"))
    assert evaluate_mmeb(fresh, str(data), str(images), str(out)) == scores
    # another model (here: another dtype), or another image resolution, does not reuse those vectors
    for other in (Embedder("tiny", device="cpu", dtype=torch.float64, attn_backend="torch"),
                  Embedder("tiny", device="cpu", attn_backend="torch", image_tokens=(8, 32))):
        with pytest.raises(pytest.fail.Exception, match="re-embedded"):
            evaluate_mmeb(other, str(data), str(images), str(out), subsets=["MSCOCO_t2i"])


def _cached_vectors(out, name):
    (cache,) = (out / "embeddings" / "mmeb").glob(f"{name}-*.safetensors")
    return load_file(cache)["embeddings"]


def test_mmeb_cache_is_keyed_on_image_content(tiny, tmp_path):
    """Another --images folder with the same names, or images overwritten in place: embedded afresh."""
    embedder, model, proc = tiny
    data, images, _ = write_mmeb(tmp_path)
    out = tmp_path / "out"

    def fresh(images_dir):
        subset = eval_data.load_mmeb_subset(str(data), "MSCOCO_t2i", str(images_dir))
        return torch.stack([embed_alone(model, proc, it) for it in subset.inputs.items])

    evaluate_mmeb(embedder, str(data), str(images), str(out), subsets=["MSCOCO_t2i"])
    first = _cached_vectors(out, "MSCOCO_t2i")
    assert (first - fresh(images)).abs().max().item() <= 1e-5

    other = tmp_path / "other-images"
    for i, (w, h) in enumerate([(40, 30), (57, 61), (30, 90), (64, 48), (33, 33)]):
        (other / "sub").mkdir(parents=True, exist_ok=True)
        random_image(w, h, seed=90 + i).save(other / "sub" / f"{i}.png")
    for images_dir in (other, images):
        if images_dir is images:  # overwrite in place: same names, same sizes in pixels, new content
            for f in (other / "sub").iterdir():
                (images / "sub" / f.name).write_bytes(f.read_bytes())
        before = set((out / "embeddings" / "mmeb").iterdir())
        evaluate_mmeb(embedder, str(data), str(images_dir), str(out), subsets=["MSCOCO_t2i"])
        (new_cache,) = set((out / "embeddings" / "mmeb").iterdir()) - before  # a new key, not a stale hit
        vectors = load_file(new_cache)["embeddings"]
        expected = fresh(images_dir)
        assert (vectors - expected).abs().max().item() <= 1e-5
        assert (expected - first).abs().max().item() > 1e-2  # the images did change what is embedded


def test_mmeb_prompt_rewriting_and_dedup(tmp_path):
    data, images, _ = write_mmeb(tmp_path)
    t2i = eval_data.load_mmeb_subset(str(data), "MSCOCO_t2i", str(images))
    cap = "Find me an everyday image that matches the given caption: a cat."
    # the query (no image) loses its marker, and equals candidate 2 of that row
    assert t2i.inputs.items[t2i.queries[0]] == {"text": cap, "images": []}
    assert t2i.candidates[0][2] == t2i.queries[0]
    assert t2i.inputs.items[t2i.candidates[0][0]] == {
        "text": MARKER + "\nRepresent the given image.\n", "images": [os.path.join(str(images), "sub/3.png")]}
    cls = eval_data.load_mmeb_subset(str(data), "ImageNet-1K", str(images))
    # 3 queries (image + prompt) + tench/goldfish/shark; queries repeated as candidates embed once
    assert len(cls.inputs.items) == 3 + 3 and cls.candidates[0][0] == cls.queries[0]


def test_mmeb_missing_image_is_an_error_naming_the_path(tiny, tmp_path, monkeypatch):
    embedder = tiny[0]
    data, images, _ = write_mmeb(tmp_path)
    os.remove(images / "sub" / "4.png")
    monkeypatch.setattr(Embedder, "load", lambda self: pytest.fail("embedded before checking the images"))
    with pytest.raises(eval_data.EvalDataError, match=r"MSCOCO_t2i.*1 image file\(s\) missing.*sub/4\.png \(row 0 candidate 1\)"):
        evaluate_mmeb(embedder, str(data), str(images), str(tmp_path / "out"), subsets=["MSCOCO_t2i"])
    assert not (tmp_path / "out" / "scores.json").exists()


def write_vidore(root):
    ds = root / "vidore" / "synthetic_v2"
    pages = []
    for i, (w, h) in enumerate([(60, 80), (45, 70), (80, 56), (50, 50), (70, 90)]):
        path = root / f"page{i}.png"
        random_image(w, h, seed=40 + i).save(path)
        pages.append({"bytes": path.read_bytes(), "path": f"page{i}.png"})
    tables = {
        "corpus": pa.table({"corpus-id": [10, 11, 12, 13, 14], "image": pages}),
        "queries": pa.table({"query-id": ["q1", "q2", "q3", "q4"],
                             "query": ["What was the revenue in 2021?", "board members", "emissions scope 3", "no qrels"]}),
        # graded; q3 is judged but has nothing relevant; q4 has no qrels at all (not scored)
        "qrels": pa.table({"query-id": ["q1", "q1", "q1", "q2", "q3"], "corpus-id": [12, 10, 14, 11, 13],
                           "score": [2, 1, 1, 1, 0]}),
    }
    for part, table in tables.items():
        (ds / part).mkdir(parents=True)
        pq.write_table(table, ds / part / "test-00000-of-00001.parquet")
    return root / "vidore", pages


def test_vidore_ndcg_against_loop_oracle(tiny, tmp_path):
    embedder, model, proc = tiny
    data, pages = write_vidore(tmp_path)
    scores = evaluate_vidore(embedder, str(data), str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == json.loads(json.dumps(scores))

    doc = [embed_alone(model, proc, {"text": MARKER + "\nRepresent the given document image.", "images": [p["bytes"]]})
           for p in pages]
    qrels = {"q1": {12: 2, 10: 1, 14: 1}, "q2": {11: 1}, "q3": {13: 0}}
    texts = {"q1": "What was the revenue in 2021?", "q2": "board members", "q3": "emissions scope 3"}
    ndcg, recall1 = [], []
    for qid, rels in qrels.items():
        q = embed_alone(model, proc, {"text": texts[qid]})
        sims = [float(q @ d) for d in doc]
        ranked = sorted(range(10, 15), key=lambda c: (-sims[c - 10], [-b for b in str(c).encode()]))  # trec_eval ties
        dcg = sum(rels.get(c, 0) / math.log2(r + 2) for r, c in enumerate(ranked[:5]))
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(sorted(rels.values(), reverse=True)[:5]))
        ndcg.append(dcg / idcg if idcg else 0.0)
        n_rel = sum(1 for g in rels.values() if g > 0)
        recall1.append((rels.get(ranked[0], 0) > 0) / n_rel if n_rel else 0.0)
    got = scores["datasets"]["synthetic_v2"]
    assert got["ndcg@5"] == pytest.approx(sum(ndcg) / 3, abs=1e-5)
    assert got["recall@1"] == pytest.approx(sum(recall1) / 3, abs=1e-9)
    assert (got["n_queries"], got["n_pages"], got["unjudged_queries"]) == (3, 5, 1)
    assert scores["mean_ndcg@5"] == got["ndcg@5"]


def test_vidore_layout_errors(tmp_path):
    data, _ = write_vidore(tmp_path)
    ds = data / "synthetic_v2"
    pq.write_table(pa.table({"query-id": ["q1"], "corpus-id": [99], "score": [1]}), ds / "qrels" / "test-00000-of-00001.parquet")
    with pytest.raises(eval_data.EvalDataError, match="corpus-id 99"):
        eval_data.load_beir(str(data), "synthetic_v2")
    os.remove(ds / "qrels" / "test-00000-of-00001.parquet")
    with pytest.raises(eval_data.EvalDataError, match="no qrels/"):
        eval_data.load_beir(str(data), "synthetic_v2")


def test_vidore_page_files_are_keyed_on_content(tmp_path):
    data, pages = write_vidore(tmp_path)
    ds = data / "synthetic_v2"
    for p in pages:  # corpus cells that name files (beside the corpus) instead of holding bytes
        (ds / p["path"]).write_bytes(p["bytes"])
    table = pa.table({"corpus-id": [10, 11, 12, 13, 14], "image": [{"bytes": None, "path": p["path"]} for p in pages]})
    pq.write_table(table, ds / "corpus" / "test-00000-of-00001.parquet")
    keys = eval_data.load_beir(str(data), "synthetic_v2").pages.keys
    random_image(60, 80, seed=99).save(ds / "page0.png")  # same name and size in pixels, new content
    again = eval_data.load_beir(str(data), "synthetic_v2").pages.keys
    assert again[0] != keys[0] and again[1:] == keys[1:]


def beir(corpus_ids, qrels, languages=None):
    """A BeirDataset for score_beir alone (no files): qrels {qid: {cid: grade}}, one query per key."""
    qids = list(qrels)
    return eval_data.BeirDataset("t", corpus_ids, eval_data.Inputs(), qids, eval_data.Inputs(), list(range(len(qids))),
                                 qrels, 0, languages)


def test_vidore_ties_rank_like_trec_eval():
    """Byte-identical pages embed to one vector. trec_eval (pytrec_eval: MTEB, ViDoRe) ranks tied scores by
    document id, descending as strcmp compares them: "9" above "2", and "9" above "10"."""
    pages = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # ids below: 2 and 9 (or 10 and 9) tie
    query = torch.tensor([[0.0, 1.0]])
    got = score_beir(query, pages, beir(["5", "2", "9"], {"q": {"9": 1.0}}))
    assert got["recall@1"] == 1.0 and got["ndcg@5"] == 1.0  # 9 first; corpus order would put 2 first
    got = score_beir(query, pages, beir(["5", "9", "10"], {"q": {"10": 1.0}}))
    assert got["recall@1"] == 0.0 and got["ndcg@5"] == pytest.approx(1 / math.log2(3))  # "9" > "10": 10 second


def test_vidore_languages_scored_alone_and_averaged():
    """ViDoRe v2's multilingual sets: each query in 4 languages. MTEB scores each language on its own queries
    and the task as their mean, which differs from pooling all queries when the counts differ."""
    pages = torch.eye(3)
    queries = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # each query finds page i first
    # en: q0 right (nDCG 1), q1 relevant page ranked 3rd (tied, id order 2, 1, 0: page 0 last)
    # fr: q2 relevant page ranked 2nd
    qrels = {"q0": {"0": 1.0}, "q1": {"0": 1.0}, "q2": {"1": 1.0}}
    ds = beir(["0", "1", "2"], qrels, languages=["english", "english", "french"])
    got = score_beir(queries, pages, ds)
    en, fr = (1 + 1 / math.log2(4)) / 2, 1 / math.log2(3)
    assert got["languages"]["english"]["ndcg@5"] == pytest.approx(en)
    assert got["languages"]["french"]["ndcg@5"] == pytest.approx(fr)
    assert got["ndcg@5"] == pytest.approx((en + fr) / 2)  # not the pooled (1 + 1/log2(4) + 1/log2(3)) / 3
    assert [got["languages"][lang]["n_queries"] for lang in ("english", "french")] == [2, 1]
    only = score_beir(queries, pages, ds, languages=["english"])
    assert list(only["languages"]) == ["english"] and only["ndcg@5"] == pytest.approx(en)
    with pytest.raises(eval_data.EvalDataError, match=r"no queries in \['german'\]"):
        score_beir(queries, pages, ds, languages=["german"])
    with pytest.raises(eval_data.EvalDataError, match="no language column"):
        score_beir(queries, pages, beir(["0", "1", "2"], qrels), languages=["english"])


def test_vidore_language_column_is_read_and_filtered(tiny, tmp_path, monkeypatch):
    embedder = tiny[0]
    data, _ = write_vidore(tmp_path)
    queries = data / "synthetic_v2" / "queries" / "test-00000-of-00001.parquet"
    table = pq.read_table(queries)
    pq.write_table(table.append_column("language", pa.array(["english", "french", "english", "french"])), queries)
    ds = eval_data.load_beir(str(data), "synthetic_v2")
    assert ds.languages == ["english", "french", "english"]  # q4 has no qrels: not scored
    scores = evaluate_vidore(embedder, str(data), str(tmp_path / "out"), languages=["english"])
    got = scores["datasets"]["synthetic_v2"]
    assert list(got["languages"]) == ["english"] and got["n_queries"] == 2
    pq.write_table(table, queries)  # no language column: --languages is refused before any embedding
    monkeypatch.setattr(Embedder, "embed", lambda *a: pytest.fail("embedded before checking the languages"))
    with pytest.raises(eval_data.EvalDataError, match="no language column"):
        evaluate_vidore(embedder, str(data), str(tmp_path / "out2"), languages=["english"])


def test_empty_and_malformed_eval_data_are_named_errors(tmp_path):
    data, _ = write_vidore(tmp_path)
    qrels = data / "synthetic_v2" / "qrels" / "test-00000-of-00001.parquet"
    table = pq.read_table(qrels)
    pq.write_table(table.slice(0, 0), qrels)  # no qrels rows: every metric would be NaN
    with pytest.raises(eval_data.EvalDataError, match="no query has qrels"):
        eval_data.load_beir(str(data), "synthetic_v2")
    pq.write_table(pa.table({"query-id": ["q1"], "corpus-id": [10], "score": pa.array([None], pa.int64())}), qrels)
    with pytest.raises(eval_data.EvalDataError, match=r"qrels row 0 \(query-id 'q1', corpus-id 10\): score must be a finite"):
        eval_data.load_beir(str(data), "synthetic_v2")

    mmeb, images, _ = write_mmeb(tmp_path)
    path = mmeb / "MSCOCO_t2i" / "test-00000-of-00001.parquet"
    rows = pq.read_table(path)
    pq.write_table(rows.slice(0, 0), path)
    with pytest.raises(eval_data.EvalDataError, match="'MSCOCO_t2i': no rows"):
        eval_data.load_mmeb_subset(str(mmeb), "MSCOCO_t2i", str(images))
    # one candidate given as a plain string would be split into single-character candidates
    pq.write_table(pa.table({"qry_text": ["a dog"], "qry_img_path": [""], "tgt_text": ["goldfish"],
                             "tgt_img_path": [None]}), path)
    with pytest.raises(eval_data.EvalDataError, match="row 0: tgt_text must be a list of strings, got str 'goldfish'"):
        eval_data.load_mmeb_subset(str(mmeb), "MSCOCO_t2i", str(images))


def test_mmeb_ragged_candidate_lists_score_only_their_own_candidates():
    """Rows with fewer candidates than the longest are padded inside score_mmeb_subset; the padding must never
    compete. Row 0 (2 candidates) has a query equal to input 0, which a padded slot pointing at input 0 would
    match exactly (cosine 1 > 0.8): by hand, both rows are hits."""
    from engine.eval_data import Inputs, MMEBSubset

    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    subset = MMEBSubset("ragged", Inputs(), queries=[0, 1], candidates=[[3, 1], [2, 3, 0]])
    # row 0: q=(1,0) -> right 0.8, wrong 0.0; row 1: q=(0,1) -> right 0.8, wrong 0.6 and 0.0
    assert score_mmeb_subset(vectors, subset).tolist() == [True, True]


def test_mmeb_means_leave_out_subsets_not_in_mmeb():
    subsets = {"ImageNet-1K": {"precision@1": 0.5, "n": 2}, "MSCOCO_t2i": {"precision@1": 0.25, "n": 4},
               "MyOwnSet": {"precision@1": 1.0, "n": 3}}
    got = summarize_mmeb(subsets)
    assert got["overall"] == pytest.approx(0.375) and got["complete"] is False
    assert got["meta_tasks"]["Classification"] == {"precision@1": 0.5, "n_subsets": 1}
    assert got["splits"]["IND"] == {"precision@1": pytest.approx(0.375), "n_subsets": 2}
    assert got["subsets"]["MyOwnSet"]["precision@1"] == 1.0  # still listed


@pytest.mark.parametrize("args, message", [
    (["--data", "{tmp}/nope"], "--data {tmp}/nope: no such folder"),
    (["--subsets", "Nope"], "MMEB subset 'Nope': no test-*.parquet in {tmp}/mmeb/Nope"),
    (["--output", "{tmp}/afile"], "--output: {tmp}/afile is a file, not a folder"),
], ids=["missing-data", "unknown-subset", "output-is-a-file"])
def test_cli_user_errors_are_one_line(tmp_path, args, message):
    import subprocess
    import sys

    write_mmeb(tmp_path)
    (tmp_path / "afile").write_text("")
    base = {"--data": "{tmp}/mmeb", "--images": "{tmp}/images", "--output": "{tmp}/out"}
    base.update(zip(args[::2], args[1::2]))
    argv = [x.format(tmp=tmp_path) for kv in base.items() for x in kv]
    run = subprocess.run([sys.executable, "-m", "engine.evaluate", "mmeb", "--num-workers", "0", *argv],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines() == ["engine.evaluate: " + message.format(tmp=tmp_path)]


@pytest.mark.parametrize("task", ["mmeb", "vidore"])
def test_cli_output_is_checked_before_the_model_loads(tmp_path, monkeypatch, task):
    import moca.checkpoint
    from engine.evaluate import main

    data = write_mmeb(tmp_path)[0] if task == "mmeb" else write_vidore(tmp_path)[0]
    (tmp_path / "afile").write_text("scores")
    monkeypatch.setattr(moca.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    monkeypatch.setattr(Embedder, "load", lambda self: pytest.fail("embedded before checking --output"))
    images = ["--images", str(tmp_path / "images")] if task == "mmeb" else []
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        main([task, "--data", str(data), *images, "--output", str(tmp_path / "afile"), "--num-workers", "0"])
    assert (tmp_path / "afile").read_text() == "scores" and not list(tmp_path.rglob("*.safetensors"))


def test_cli_triton_on_a_cpu_without_its_interpreter_is_refused_first(tmp_path, monkeypatch):
    import engine.evaluate as ev
    from engine.trainer import UsageError

    data = write_mmeb(tmp_path)[0]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(ev.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ev.Embedder, "__init__", lambda *a, **k: pytest.fail("built the embedder first"))
    with pytest.raises(UsageError, match="^--attn-backend triton: the Triton kernels need a CUDA device"):
        ev.main(["mmeb", "--data", str(data), "--images", str(tmp_path / "images"), "--output", str(tmp_path / "o"),
                 "--attn-backend", "triton"])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cuda, flag, workers", [(False, [], 0), (True, [], 4), (False, ["--num-workers", "3"], 3)])
def test_cli_decode_workers_default_to_4_on_cuda_and_0_on_a_cpu(tmp_path, monkeypatch, cuda, flag, workers):
    """On a CPU, workers would only take cores from the model; on CUDA they keep the device fed."""
    import engine.evaluate as ev

    data = write_mmeb(tmp_path)[0]
    seen = {}

    class Stop(Exception):
        pass

    def record(self, *args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(ev.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(ev.Embedder, "__init__", record)
    with pytest.raises(Stop):
        ev.main(["mmeb", "--data", str(data), "--images", str(tmp_path / "images"), "--output", str(tmp_path / "o"),
                 *flag])
    assert seen["num_workers"] == workers


def test_mmeb_cache_is_keyed_on_max_length_pooling_and_weights_changed_in_place(tiny, tmp_path, monkeypatch):
    """Vectors embedded under another --max-length or pooling, or by a checkpoint whose weights were rewritten in
    place (same file names and sizes, new values), are never scored: the subset is embedded afresh, and with the
    new weights the vectors are each input embedded alone by the new model."""
    from moca.checkpoint import load_model, save_model

    embedder, model, proc = tiny
    data, images, _ = write_mmeb(tmp_path)
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    save_model(model, str(ckpt), processor=proc)
    evaluate_mmeb(embedder, str(data), str(images), str(out), subsets=["MSCOCO_t2i"])  # the preset's cache
    first = _cached_vectors(out, "MSCOCO_t2i")
    evaluate_mmeb(Embedder(str(ckpt), device="cpu", attn_backend="torch"), str(data), str(images), str(out),
                  subsets=["MSCOCO_t2i"])  # and the checkpoint's
    save_model(load_model("tiny", seed=1), str(ckpt), processor=proc)  # retrained: same files, same sizes
    with monkeypatch.context() as m:
        m.setattr(Embedder, "load", lambda self: pytest.fail("re-embedded despite the cache"))
        for other in (Embedder("tiny", device="cpu", attn_backend="torch", max_length=12),
                      Embedder("tiny", device="cpu", attn_backend="torch", pooling="last"),
                      Embedder(str(ckpt), device="cpu", attn_backend="torch")):
            with pytest.raises(pytest.fail.Exception, match="re-embedded"):
                evaluate_mmeb(other, str(data), str(images), str(out), subsets=["MSCOCO_t2i"])
    before = set((out / "embeddings" / "mmeb").iterdir())
    evaluate_mmeb(Embedder(str(ckpt), device="cpu", attn_backend="torch"), str(data), str(images), str(out),
                  subsets=["MSCOCO_t2i"])
    (new_cache,) = set((out / "embeddings" / "mmeb").iterdir()) - before
    retrained = load_model(str(ckpt))
    subset = eval_data.load_mmeb_subset(str(data), "MSCOCO_t2i", str(images))
    expected = torch.stack([embed_alone(retrained, proc, it) for it in subset.inputs.items])
    assert (load_file(new_cache)["embeddings"] - expected).abs().max().item() <= 1e-5
    assert (expected - first).abs().max().item() > 1e-2


def test_mmeb_subset_of_several_parquet_shards_reads_every_row_in_shard_order(tmp_path):
    """A subset split into test-0000k-of-0000n.parquet files (as HF writes large ones) is every row of every shard,
    in shard order."""
    root = tmp_path / "mmeb" / "VisDial"
    root.mkdir(parents=True)
    rows = [(f"question {i}", [f"answer {i}", f"wrong {i}"]) for i in range(5)]
    for k, part in enumerate((rows[:2], rows[2:])):
        pq.write_table(pa.table({"qry_text": [q for q, _ in part], "qry_img_path": [""] * len(part),
                                 "tgt_text": [t for _, t in part], "tgt_img_path": [["", ""]] * len(part)}),
                       root / f"test-{k:05d}-of-00002.parquet")
    subset = eval_data.load_mmeb_subset(str(tmp_path / "mmeb"), "VisDial", str(tmp_path))
    items = subset.inputs.items
    assert [items[q]["text"] for q in subset.queries] == [q for q, _ in rows]
    assert [[items[c]["text"] for c in cands] for cands in subset.candidates] == [t for _, t in rows]
