"""Evaluation data sets in their public layouts -> unique model inputs plus the index structure to score them.

MMEB-eval: DIR/<subset>/test-*.parquet with `qry_text`, `qry_img_path`, `tgt_text` (list),
`tgt_img_path` (list); candidate 0 is the right one; image paths relative to an image root.
ViDoRe v2: DIR/<dataset>/{corpus,queries,qrels}/*.parquet in the BEIR layout; the queries' optional
`language` column (the multilingual sets: each query in 4 languages) is kept for per-language scores.
Key decision: every distinct (text, image) input of a subset is embedded once; rows refer to
inputs by index. An input's key (what the embedding cache is keyed by) names an image by its
content: the bytes' SHA-256 for inline images, absolute path + size + mtime for files
(`file_identity`), so images changed in place or read from another folder are embedded afresh.
Phi-3-V's `<|image_N|>` becomes the Qwen marker when the row has an image and is removed when it has
none (MOCA.md §4). Missing image files are an error that names the path
(checked for the whole subset before anything is embedded): a skipped row or candidate would
silently change what precision@1 means, so none is skipped.
"""

import glob
import hashlib
import math
import os
import re
from dataclasses import dataclass, field

from moca.processor import IMAGE_MARKER

_PHI3V_MARKER = re.compile(r"<\|image_\d+\|>")
DOCUMENT_PROMPT = IMAGE_MARKER + "\nRepresent the given document image."

MMEB_GROUPS = {  # meta-task -> (in-distribution subsets, out-of-distribution subsets)
    "Classification": (
        ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
        ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    ),
    "VQA": (
        ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
        ["ScienceQA", "VizWiz", "GQA", "TextVQA"],
    ),
    "Retrieval": (
        ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"],
        ["OVEN", "FashionIQ", "EDIS", "Wiki-SS-NQ"],
    ),
    "Visual Grounding": (["MSCOCO"], ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]),
}
MMEB_SUBSETS = {
    name: (task, split)
    for task, (ind, ood) in MMEB_GROUPS.items()
    for split, names in (("IND", ind), ("OOD", ood))
    for name in names
}


class EvalDataError(ValueError):
    """A data set that does not match its layout, or names files that do not exist."""


def read_parquet(files: list[str], columns: list[str], optional: tuple[str, ...] = ()) -> dict[str, list]:
    """Concatenate `columns` of parquet `files` -> {column: python list}; an `optional` column is
    returned only when every file has it."""
    import pyarrow.parquet as pq

    out = {c: [] for c in [*columns, *optional]}
    for f in files:
        table = pq.read_table(f)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise EvalDataError(f"{f}: missing column(s) {missing}; has {table.column_names}")
        for c in list(out):
            if c in table.column_names:
                out[c].extend(table.column(c).to_pylist())
            else:
                del out[c]
    return out


def file_identity(path: str) -> tuple[str, int, int]:
    """(absolute path, size, mtime in ns): changes when the file is overwritten or another folder is used."""
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


@dataclass
class Inputs:
    """Unique model inputs of one subset, with a (text, image keys) identity for each."""

    items: list = field(default_factory=list)  # {"text", "images"} dicts for moca.embed
    keys: list = field(default_factory=list)  # hashable identity per item (what the cache is keyed by)
    _index: dict = field(default_factory=dict)

    def add(self, key, item) -> int:
        if key not in self._index:
            self._index[key] = len(self.items)
            self.items.append(item)
            self.keys.append(key)
        return self._index[key]


@dataclass
class MMEBSubset:
    name: str
    inputs: Inputs
    queries: list[int]  # (R,) input index of each row's query
    candidates: list[list[int]]  # R lists of input indices, the right one first


def mmeb_text(text: str | None, has_image: bool) -> str:
    text = text or ""
    return _PHI3V_MARKER.sub(IMAGE_MARKER if has_image else "", text)


def mmeb_subsets(data: str) -> list[str]:
    """Subset folders of DIR that hold test-*.parquet, sorted."""
    return sorted(d for d in os.listdir(data) if glob.glob(os.path.join(data, d, "test-*.parquet")))


def load_mmeb_subset(data: str, name: str, images: str) -> MMEBSubset:
    files = sorted(glob.glob(os.path.join(data, name, "test-*.parquet")))
    if not files:
        raise EvalDataError(f"MMEB subset {name!r}: no test-*.parquet in {os.path.join(data, name)}")
    cols = read_parquet(files, ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"])
    inputs, queries, candidates, missing, identity = Inputs(), [], [], {}, {}

    def add(text, img, where):
        path = os.path.join(images, img) if img else None
        if path is not None and path not in identity:
            identity[path] = file_identity(path) if os.path.isfile(path) else None
            if identity[path] is None:
                missing[path] = where
        item = {"text": mmeb_text(text, bool(img)), "images": [path] if path else []}
        if not item["text"] and not path:
            raise EvalDataError(f"MMEB subset {name!r}, {where}: neither text nor image")
        return inputs.add((item["text"], identity[path] if path else ""), item)

    if not cols["qry_text"]:
        raise EvalDataError(f"MMEB subset {name!r}: no rows in {', '.join(files)}")
    for r, (qt, qi, tts, tis) in enumerate(zip(*(cols[c] for c in ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")))):
        for column, cell in (("tgt_text", tts), ("tgt_img_path", tis)):
            if cell is not None and not (isinstance(cell, (list, tuple)) and all(isinstance(x, (str, type(None))) for x in cell)):
                raise EvalDataError(f"MMEB subset {name!r}, row {r}: {column} must be a list of strings, got "
                                    f"{type(cell).__name__} {cell!r:.60}")
        for column, cell in (("qry_text", qt), ("qry_img_path", qi)):
            if cell is not None and not isinstance(cell, str):
                raise EvalDataError(f"MMEB subset {name!r}, row {r}: {column} must be a string, got "
                                    f"{type(cell).__name__} {cell!r:.60}")
        tts, tis = list(tts or []), list(tis or [])
        if not tts and not tis:
            raise EvalDataError(f"MMEB subset {name!r}, row {r}: no candidates")
        if tts and tis and len(tts) != len(tis):
            raise EvalDataError(f"MMEB subset {name!r}, row {r}: {len(tts)} tgt_text but {len(tis)} tgt_img_path")
        n = max(len(tts), len(tis))
        tts, tis = tts or [""] * n, tis or [""] * n
        queries.append(add(qt, qi, f"row {r} query"))
        candidates.append([add(t, i, f"row {r} candidate {c}") for c, (t, i) in enumerate(zip(tts, tis))])
    if missing:
        path, where = next(iter(missing.items()))
        raise EvalDataError(
            f"MMEB subset {name!r}: {len(missing)} image file(s) missing under {images!r}, "
            f"first: {path} ({where})"
        )
    return MMEBSubset(name, inputs, queries, candidates)


@dataclass
class BeirDataset:
    name: str
    corpus_ids: list[str]
    pages: Inputs  # one input per corpus page, corpus order
    query_ids: list[str]  # queries that have qrels, in query-file order
    queries: Inputs  # plain-text queries, parallel to query_ids (duplicates embedded once)
    query_index: list[int]  # (Q,) input index of each query
    qrels: dict[str, dict[str, float]]  # query-id -> corpus-id -> graded relevance
    unjudged_queries: int  # queries without any qrels: not scored
    languages: list[str] | None = None  # (Q,) each query's `language` cell, when the queries have that column


def _parquet_files(folder: str, part: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, part, "*.parquet")))
    if not files:
        raise EvalDataError(f"{folder}: no {part}/*.parquet")
    return files


def _page_image(image, folder: str, cid):
    """The corpus `image` cell (HF Image struct, raw bytes or a path) -> something load_image takes."""
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return {"bytes": image["bytes"]}
        image = image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, str) and image:
        path = image if os.path.isabs(image) else os.path.join(folder, image)
        if not os.path.isfile(path):
            raise EvalDataError(f"{folder}: corpus-id {cid!r}: image file missing: {path}")
        return path
    raise EvalDataError(f"{folder}: corpus-id {cid!r} has no image")


def _image_identity(img):
    """A page image's cache identity: its bytes' SHA-256, or `file_identity` for a path."""
    if isinstance(img, str):
        return file_identity(img)
    return hashlib.sha256(img["bytes"] if isinstance(img, dict) else img).hexdigest()


def load_beir(data: str, name: str) -> BeirDataset:
    folder = os.path.join(data, name)
    corpus = read_parquet(_parquet_files(folder, "corpus"), ["corpus-id", "image"])
    queries = read_parquet(_parquet_files(folder, "queries"), ["query-id", "query"], optional=("language",))
    qrels_cols = read_parquet(_parquet_files(folder, "qrels"), ["query-id", "corpus-id", "score"])

    corpus_ids = [str(c) for c in corpus["corpus-id"]]
    if len(set(corpus_ids)) != len(corpus_ids):
        raise EvalDataError(f"{folder}: duplicate corpus-id values")
    pages = Inputs()
    for cid, image in zip(corpus_ids, corpus["image"]):
        img = _page_image(image, folder, cid)
        pages.add(("page", cid, _image_identity(img)), {"text": DOCUMENT_PROMPT, "images": [img]})
    qrels: dict[str, dict[str, float]] = {}
    known = set(corpus_ids)
    for row, (qid, cid, score) in enumerate(zip(qrels_cols["query-id"], qrels_cols["corpus-id"], qrels_cols["score"])):
        if str(cid) not in known:
            raise EvalDataError(f"{folder}: qrels name corpus-id {cid!r}, which is not in the corpus")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise EvalDataError(f"{folder}: qrels row {row} (query-id {qid!r}, corpus-id {cid!r}): score must be "
                                f"a finite number, got {score!r}")
        qrels.setdefault(str(qid), {})[str(cid)] = float(score)
    query_text, language = {}, {}
    for row, (qid, text) in enumerate(zip(queries["query-id"], queries["query"])):
        if str(qid) in query_text:
            raise EvalDataError(f"{folder}: duplicate query-id {qid!r}")
        query_text[str(qid)] = text
        if "language" in queries:
            language[str(qid)] = str(queries["language"][row])
    unknown = sorted(set(qrels) - set(query_text))
    if unknown:
        raise EvalDataError(f"{folder}: qrels name query-id(s) not in queries, e.g. {unknown[0]!r}")
    q_inputs, query_ids, query_index = Inputs(), [], []
    for qid, text in query_text.items():
        if qid not in qrels:
            continue
        if not text:
            raise EvalDataError(f"{folder}: query-id {qid!r} has an empty query")
        query_ids.append(qid)
        query_index.append(q_inputs.add(("query", text), {"text": text}))
    if not query_ids:
        raise EvalDataError(f"{folder}: no query has qrels ({len(query_text)} queries, {len(qrels_cols['score'])} "
                            "qrels rows): nothing to score")
    return BeirDataset(name, corpus_ids, pages, query_ids, q_inputs, query_index, qrels, len(query_text) - len(query_ids),
                       [language[q] for q in query_ids] if language else None)


def beir_datasets(data: str) -> list[str]:
    return sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d, "corpus")))
