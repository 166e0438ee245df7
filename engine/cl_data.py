"""Contrastive training data: MMEB-train-style subsets -> task-homogeneous global batches.

A subset is random-access records `qry`, `qry_image_path`, `pos_text`, `pos_image_path`,
`neg_text`, `neg_image_path` (the last two lists, the text of a Python list as the release's data
stores them, or one string) from a .jsonl file, a folder of parquet / arrow files (pyarrow), or the
built-in `synthetic` tasks. A folder with no .parquet / .arrow file directly in it is a folder of
subsets (MMEB-train's layout, `mmeb-train/A-OKVQA/*.parquet`, ...):
each child `*.jsonl` and each child folder holding .parquet / .arrow files is a subset named after it;
other children (`images/`) are skipped. In a subset folder holding HF shards of several splits
(MMEB-train: `original-`, `diverse_instruction-` and a legacy `train-00000-of-00001.parquet`, the same
pairs three times) only the `original` split (else `train`) is read, as VLM2Vec's `--split_name
original`: the same pair twice in a batch would be its own in-batch negative.
Image paths are relative to an image root: --image-root, else the folder given (for a subset of a
folder of subsets too: MMEB-train's paths are `images/<subset>/...` from its root, VLM2Vec's
`--image_dir MMEB-train`), or a file's folder; in-memory images (bytes, HF dicts) pass through.
`path:count` draws `count` records of a subset per epoch (seeded, repeating it when smaller), of each
subset of a folder of subsets; a subset without a count gives all its records, or its first
`max_per_subset` good ones (the same every epoch) when it has more: the release read `train[:50000]`
of each subset (MOCA.md §3).

Design decisions:
* Every record is validated once, when its subset is opened (query and positive not empty,
  marker/image agreement, image files present, negative lists aligned). A bad record is
  skipped, counted and logged with where it is (`FILE:LINE` for JSONL, 1-based physical lines),
  never a crash, never a silent drop; one that still fails when it is encoded (an undecodable
  image, a side that opens with an image longer than max_len) is logged the same way, once, and
  replaced by the next record of its subset, so every rank keeps an equal slice.
* A query, positive or negative longer than max_len is cut by the release's rule, as CPT records
  (`engine.data.truncate_record`, MOCA.md §2): its first max_len tokens, less an image whose tokens
  would be cut and everything after it; a side losing an image is logged, naming it.
* Phi-3-V `<|image_N|>` (and `<image>`) markers become the Qwen marker when the side has an
  image and are removed when it has none (MOCA.md §4).
* Task-homogeneous batches (MOCA.md §3): the plan of an epoch is a pure function of (seed,
  epoch): each subset's draw is shuffled and cut into full GLOBAL batches of `global_batch`
  records, and the batches of all subsets are shuffled together. Global batch k is one
  subset's; rank r of W takes its r-th slice. The data position of a run is therefore the
  global-batch index (exact resume), and W ranks see exactly what one process sees.
* `negative_ratio` hard negatives per query, the query's own: empty ones skipped, the last
  repeated when fewer. An image negative with an empty text gets the positive's text (its
  instruction), as the release does. A subset none of whose records has a negative trains without
  hard negatives; in a subset that has them, a record without any is reported as bad.
"""

import ast
import bisect
import glob
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np

from engine import cl_synthetic
from engine.data import DataError, require_columns, truncate_record
from moca.batch import Sample
from moca.processor import IMAGE_MARKER, IMAGE_PAD, Processor, normalize_markers

log = logging.getLogger("moca")
FIELDS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
_ANY_MARKER = re.compile(r"<image>|<\|image_\d+\|>|" + re.escape(IMAGE_MARKER))
_TABLES = (".parquet", ".arrow")
_SHARD = re.compile(r"(.+)-\d{5}-of-\d{5}\.(?:parquet|arrow)$")  # HF hub shard name: SPLIT-00000-of-00001
SPLITS = ("original", "train")  # the split read from a folder of several, the first found


class RecordError(ValueError):
    """A record that cannot be trained on; the message says why."""


# ---------------------------------------------------------------------------------- subsets
class Subset:
    """Random-access raw records of one task. `image_root` resolves relative image paths."""

    name: str
    image_root: str | None = None
    trusted = False  # records built in code skip the validation pass

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Where record i is, for messages."""
        return f"subset {self.name} record {i}"


class JsonlSubset(Subset):
    def __init__(self, path: str, image_root: str | None = None):
        self.name, self.path = os.path.splitext(os.path.basename(path))[0], path
        self.image_root = image_root or os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            numbered = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
        self.line_numbers = [n for n, _ in numbered]  # 1-based physical lines, blank ones counted
        self.lines = [line for _, line in numbered]

    def where(self, i):
        return f"{self.path}:{self.line_numbers[i]}"

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        try:
            rec = json.loads(self.lines[i])
        except json.JSONDecodeError as e:
            raise RecordError(f"invalid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise RecordError(f"a record is a JSON object, got {type(rec).__name__}")
        return rec


class TableSubset(Subset):
    """Parquet / Arrow files of a folder (or one file); the record columns are held in memory."""

    def __init__(self, path: str, image_root: str | None = None):
        try:
            import pyarrow.parquet as pq
            import pyarrow as pa
        except ImportError as e:
            raise RuntimeError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        self.name = os.path.basename(os.path.normpath(path))
        self.image_root = image_root or (path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
        files = [path] if os.path.isfile(path) else _one_split(path, sorted(
            glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
            + glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True)))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet or .arrow files")
        self.columns = {c: [] for c in FIELDS}
        self.files, self.offsets = files, [0]
        for f in files:
            if f.endswith(".parquet"):
                table = pq.read_table(f)
            else:
                with pa.memory_map(f) as src:
                    try:
                        table = pa.ipc.open_file(src).read_all()
                    except pa.ArrowInvalid:
                        src.seek(0)
                        table = pa.ipc.open_stream(src).read_all()
            require_columns(f, table.column_names, ("qry", "qry_image_path"), ("pos_text", "pos_image_path"))
            n = table.num_rows
            self.offsets.append(self.offsets[-1] + n)
            for c in FIELDS:
                self.columns[c].extend(table.column(c).to_pylist() if c in table.column_names else [None] * n)

    def __len__(self):
        return len(self.columns["qry"])

    def __getitem__(self, i):
        return {c: v[i] for c, v in self.columns.items()}

    def where(self, i):
        fi = bisect.bisect_right(self.offsets, i) - 1
        return f"{self.files[fi]} row {i - self.offsets[fi]}"


def parse_spec(spec: str) -> tuple[str, int | None]:
    """`path` or `path:count` -> (path, count or None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return spec, None


def _one_split(folder: str, files: list[str]) -> list[str]:
    """The files of one split when `files` are HF shards (`SPLIT-00000-of-00001.parquet`) of several: the
    first of SPLITS there (logged), else all of them (a warning)."""
    splits: dict[str, list[str]] = {}
    for f in files:
        m = _SHARD.match(os.path.basename(f))
        splits.setdefault(m.group(1) if m else "", []).append(f)
    if len(splits) < 2:
        return files
    keep = next((s for s in SPLITS if s in splits), None)
    if keep is None:
        log.warning("%s: files of splits %s: reading them all (give one split's file to read one)", folder, sorted(splits))
        return files
    log.info("%s: files of splits %s: reading %r", folder, sorted(splits), keep)
    return splits[keep]


def _has_tables(folder: str, recursive: bool) -> bool:
    if not recursive:
        return any(f.endswith(_TABLES) for f in os.listdir(folder))
    return any(f.endswith(_TABLES) for _, _, names in os.walk(folder) for f in names)


def open_subsets(spec: str, image_root: str | None = None, seed: int = 0) -> list[tuple[Subset, int | None]]:
    """One spec -> [(subset, count)]. `synthetic[:N]` is the four built-in tasks (N records each,
    default 2000); `synthetic/<task>[:N]` one of them. A .jsonl or table file, or a folder with .parquet /
    .arrow files directly in it (or an HF DatasetDict), is one subset; another folder is a folder of
    subsets (module docstring), `count` applying to each, the image root defaulting to the folder.
    FileNotFoundError when there is no data; DataError for another `synthetic...` spec."""
    path, count = parse_spec(spec)
    if path == "synthetic" or path.startswith(("synthetic/", "synthetic:")):
        tasks = cl_synthetic.TASKS if path == "synthetic" else (path.partition("/")[2],)
        if path.startswith("synthetic:") or not set(tasks) <= set(cl_synthetic.TASKS) or count == 0:
            raise DataError(f"data source {spec!r}: the synthetic ones are synthetic[:N] and synthetic/<task>[:N], "
                            f"N >= 1 records, <task> one of {', '.join(cl_synthetic.TASKS)}")
        return [(cl_synthetic.SyntheticSubset(t, count or 2000, seed), None) for t in tasks]
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source {path!r} does not exist")
    if path.endswith(".jsonl"):
        return [(JsonlSubset(path, image_root), count)]
    if os.path.isfile(path) or _has_tables(path, False) or os.path.exists(os.path.join(path, "dataset_dict.json")):
        return [(TableSubset(path, image_root), count)]
    subsets: list[Subset] = []
    for name in sorted(os.listdir(path)):
        child = os.path.join(path, name)
        if name.endswith(".jsonl") and os.path.isfile(child):
            subsets.append(JsonlSubset(child, image_root or path))
        elif os.path.isdir(child) and _has_tables(child, True):
            subsets.append(TableSubset(child, image_root or path))
    if not subsets:
        raise FileNotFoundError(f"{path}: no .parquet, .arrow or .jsonl files")
    log.info("%s: %d subsets: %s", path, len(subsets), ", ".join(s.name for s in subsets))
    return [(s, count) for s in subsets]


# ------------------------------------------------------------------------------- validation
def make_input(text, image, image_root: str | None) -> dict | None:
    """One side of a record -> {"text", "images"} for Processor.encode, or None when empty.

    image: "" / None (no image), a path (relative to image_root), or bytes / dict / PIL image.
    """
    if text is not None and not isinstance(text, str):
        raise RecordError(f"text must be a string, got {type(text).__name__}")
    text = text or ""
    if image is None or (isinstance(image, str) and not image.strip()):
        text = _ANY_MARKER.sub("", text)  # a marker without an image is removed (MOCA.md §4)
        return {"text": text, "images": []} if text.strip() else None
    if isinstance(image, str):
        image = image if os.path.isabs(image) or image_root is None else os.path.join(image_root, image)
        if not os.path.isfile(image):
            raise RecordError(f"image file not found: {image}")
    text = normalize_markers(text)
    n = text.count(IMAGE_PAD)
    if n != 1 and (n or text.strip()):
        raise RecordError(f"one image but {n} image marker(s) in {text[:60]!r}")
    return {"text": text, "images": [image]}


def _as_list(v) -> list:
    """A negatives column -> list. The release's data (MoCa-CL-Pairs, mmE5) stores these columns as the text of
    a Python list, "['a', 'b']", which its dataset eval()s (src/dataset.py filter_hard_negtives): such a string
    is read as that list (literally, never executed); any other string is one value."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, str):
        s = v.strip()
        if s[0] + s[-1] in ("[]", "()", "''", '""'):
            try:
                parsed = ast.literal_eval(s)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                parsed = None
            if isinstance(parsed, str):
                return [parsed] if parsed.strip() else []
            if isinstance(parsed, (list, tuple)) and all(isinstance(x, str) for x in parsed):
                return list(parsed)
        return [v]
    if isinstance(v, (bytes, dict)):
        return [v]
    return list(v)


@dataclass
class Example:
    query: dict
    positive: dict
    negatives: list[dict]  # the record's non-empty hard negatives, in order


def check_record(rec: dict, image_root: str | None) -> Example:
    """Raw record -> Example; raises RecordError with the reason."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record is a dict, got {type(rec).__name__}")
    query = make_input(rec.get("qry"), rec.get("qry_image_path"), image_root)
    if query is None:
        raise RecordError("empty query (no text, no image)")
    positive = make_input(rec.get("pos_text"), rec.get("pos_image_path"), image_root)
    if positive is None:
        raise RecordError("empty positive (no text, no image)")
    texts, images = _as_list(rec.get("neg_text")), _as_list(rec.get("neg_image_path"))
    if texts and images and len(texts) != len(images):
        raise RecordError(f"{len(texts)} neg_text but {len(images)} neg_image_path")
    n = max(len(texts), len(images))
    texts, images = texts or [None] * n, images or [None] * n
    negatives = []
    for k, (t, img) in enumerate(zip(texts, images)):
        if not (t or "").strip() and _has_image(img):
            t = _negative_prompt(texts, rec.get("pos_text"))
        try:
            neg = make_input(t, img, image_root)
        except RecordError as e:
            raise RecordError(f"negative {k}: {e}") from e
        if neg is not None:
            negatives.append(neg)
    return Example(query, positive, negatives)


def _has_image(image) -> bool:
    return image is not None and not (isinstance(image, str) and not image.strip())


def _negative_prompt(texts: list, pos_text) -> str | None:
    """The text of an image hard negative whose own text is empty, as the release (src/dataset.py __getitem__):
    the positive's text when all the record's negative texts are the same (all empty, say), else another negative's
    non-empty text (the release picks one at random; here the first). So the negative carries the positive's
    instruction ("<|image_1|>\nRepresent the given image.") instead of being a bare image the model tells apart by
    its prompt. None (a bare image) when that text has no image marker."""
    if len({x or "" for x in texts}) <= 1:
        fill = pos_text
    else:
        fill = next((x for x in texts if isinstance(x, str) and x.strip()), None)
    return fill if isinstance(fill, str) and _ANY_MARKER.search(fill) else None


def pick_negatives(negatives: list, ratio: int) -> list:
    """The first `ratio` negatives, the last one repeated when there are fewer."""
    if ratio == 0:
        return []
    if not negatives:
        raise RecordError("no hard negative")
    return (negatives + [negatives[-1]] * ratio)[:ratio]


# ------------------------------------------------------------------------------- the mixture
@dataclass
class RankBatch:
    """This rank's slice of one global batch, encoded: b queries, b positives, b x r negatives."""

    subset: str
    indices: list[int]  # record indices in the subset (after any runtime replacement)
    queries: list[Sample]
    positives: list[Sample]
    negatives: list[list[Sample]]  # (b, r)

    @property
    def num_negatives(self) -> int:
        return len(self.negatives[0]) if self.negatives else 0


def _draw(good: np.ndarray, count: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """`count` record indices: permutations of `good` back to back (as many as `count` needs). Where a batch
    straddles two permutations it is filled with records it does not hold yet (when `good` has that many),
    so an upsampled subset never meets itself as an in-batch negative."""
    draw: list[int] = []
    for _ in range(-(-count // len(good))):
        perm = rng.permutation(good).tolist()
        if r := len(draw) % batch:
            held = set(draw[-r:])
            fresh = [x for x in perm if x not in held][: batch - r]
            taken = set(fresh)
            perm = fresh + [x for x in perm if x not in taken]
        draw += perm
    return np.asarray(draw[:count], dtype=np.int64)


class CLData:
    """The subsets as one endless, deterministic sequence of task-homogeneous global batches. DataError when no
    subset has the usable records of one global batch."""

    def __init__(self, specs: list[str], processor: Processor, global_batch: int, negative_ratio: int = 2,
                 image_root: str | None = None, max_len: int = 1280, seed: int = 0, max_per_subset: int | None = None):
        if global_batch < 1:
            raise ValueError("global_batch must be >= 1")
        if max_per_subset is not None and max_per_subset < 1:
            raise ValueError(f"max_per_subset must be >= 1 (or None: no cap), got {max_per_subset}")
        self.max_per_subset = max_per_subset
        self.processor, self.global_batch, self.max_len, self.seed = processor, global_batch, max_len, seed
        self.subsets: list[Subset] = []
        self.good: list[np.ndarray] = []  # per subset: indices of valid records
        self.counts: list[int] = []  # per subset: records drawn per epoch
        self.ratios: list[int] = []  # per subset: hard negatives per query
        self.bad: dict[str, dict[int, str]] = {}
        self.broken: set[tuple[int, int]] = set()  # (subset, record) of records that failed when encoded
        for spec in specs:
            for sub, count in open_subsets(spec, image_root, seed):
                self._add(sub, count, negative_ratio)
        if not any(c >= global_batch for c in self.counts):
            raise DataError(f"no subset of {specs} has the {global_batch} usable records of one global batch "
                            "(--batch-size x ranks; the log gives each subset's count)")
        self._epochs: dict[int, list[tuple[int, np.ndarray]]] = {}

    def _add(self, sub: Subset, count: int | None, negative_ratio: int) -> None:
        bad: dict[int, str] = {}
        n_negs = np.zeros(len(sub), dtype=np.int64)
        if sub.trusted:
            n_negs[:] = negative_ratio
        else:
            for i in range(len(sub)):
                try:
                    n_negs[i] = len(check_record(sub[i], sub.image_root).negatives)
                except Exception as e:  # whatever a record does wrong, it is reported, never fatal
                    bad[i] = f"{type(e).__name__}: {e}"
        ok = np.asarray([i not in bad for i in range(len(sub))], dtype=bool)  # bool even when empty
        ratio = negative_ratio if (n_negs[ok] > 0).any() else 0
        if ratio:
            for i in np.flatnonzero(ok & (n_negs == 0)).tolist():
                bad[i] = "RecordError: no hard negative, though other records of the subset have them"
        for i, why in sorted(bad.items()):
            log.warning("bad record: %s: %s", sub.where(i), why)
        good = np.asarray([i for i in range(len(sub)) if i not in bad], dtype=np.int64)
        if count is None or not len(good):
            if self.max_per_subset and len(good) > self.max_per_subset:
                good = good[: self.max_per_subset]  # the release's `train[:50000]`: the same first records every epoch
            count = len(good)
        log.info("subset %s: %d records, %d good, %d bad; drawing %d per epoch (%d global batches), %d hard negatives",
                 sub.name, len(sub), len(good), len(bad), count, count // self.global_batch, ratio)
        if count < self.global_batch:
            log.warning("subset %s: %d records are fewer than one global batch (%d): not used",
                        sub.name, count, self.global_batch)
        elif len(good) < self.global_batch:
            log.warning("subset %s: %d good records repeated to fill global batches of %d: a batch holds the same "
                        "record twice, its positive then an in-batch negative of itself", sub.name, len(good),
                        self.global_batch)
        self.subsets.append(sub)
        self.good.append(good)
        self.counts.append(count)
        self.ratios.append(ratio)
        self.bad[sub.name] = bad

    @property
    def runtime_bad(self) -> int:
        """Records that failed when encoded (after validation), each counted once."""
        return len(self.broken)

    @property
    def num_bad(self) -> int:
        return sum(len(b) for b in self.bad.values()) + self.runtime_bad

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        """[(subset, (global_batch,) record indices)] of epoch e, in training order."""
        if e not in self._epochs:
            batches = []
            for si, (good, count) in enumerate(zip(self.good, self.counts)):
                if count < self.global_batch:
                    continue
                draw = _draw(good, count, self.global_batch, np.random.default_rng([self.seed, e, si]))
                batches += [(si, draw[k : k + self.global_batch])
                            for k in range(0, count - self.global_batch + 1, self.global_batch)]
            order = np.random.default_rng([self.seed, e, len(self.good)]).permutation(len(batches))
            self._epochs[e] = [batches[j] for j in order]
        return self._epochs[e]

    def global_batch_at(self, index: int) -> tuple[int, np.ndarray]:
        """Global batch number `index` of the endless sequence of epochs."""
        e = 0
        while index >= len(self.epoch(e)):
            index -= len(self.epoch(e))
            e += 1
        return self.epoch(e)[index]

    def _encode(self, item: dict, where: str) -> Sample:
        return truncate_record(self.processor, self.processor.encode(item), self.max_len, where)

    def _example(self, si: int, i: int) -> tuple[Sample, Sample, list[Sample]]:
        sub = self.subsets[si]
        ex = check_record(sub[i], sub.image_root)
        negs = pick_negatives(ex.negatives, self.ratios[si])
        encoded: dict[int, Sample] = {}  # a repeated negative is encoded once
        where = sub.where(i)
        for k, n in enumerate(negs):
            if id(n) not in encoded:
                encoded[id(n)] = self._encode(n, f"{where} negative {k}")
        return (self._encode(ex.query, f"{where} query"), self._encode(ex.positive, f"{where} positive"),
                [encoded[id(n)] for n in negs])

    def rank_batch(self, index: int, rank: int = 0, world: int = 1) -> RankBatch:
        """Rank `rank`'s slice of global batch `index`, encoded."""
        if self.global_batch % world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {world} ranks")
        si, idx = self.global_batch_at(index)
        b = self.global_batch // world
        good = self.good[si]
        out = RankBatch(self.subsets[si].name, [], [], [], [])
        for i in idx[rank * b : (rank + 1) * b].tolist():
            pos = int(np.searchsorted(good, i))
            for k in range(len(good)):
                j = int(good[(pos + k) % len(good)])
                if (si, j) in self.broken:
                    continue
                try:
                    q, p, n = self._example(si, j)
                    break
                except Exception as e:  # reported, replaced by the subset's next record
                    self.broken.add((si, j))
                    log.warning("bad record: %s: %s: %s (skipped at load time, replaced)",
                                self.subsets[si].where(j), type(e).__name__, e)
            else:
                raise DataError(f"subset {self.subsets[si].name}: none of its {len(good)} records can be encoded any more")
            out.indices.append(j)
            out.queries.append(q)
            out.positives.append(p)
            out.negatives.append(n)
        return out
