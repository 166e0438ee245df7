"""Interleaved training data: sources, record validation, cached costs, packed micro-batches.

A source is random-access records `{"text": str with image markers, "images": [...]}`:
parquet / arrow files (a folder or one file; parquet read through a memory-mapped Arrow copy in the cache
folder) or an HF `save_to_disk` directory (columns `text` and `images`, a list of encoded bytes or HF Image
structs), JSONL (images as paths relative to the
file), or the built-in `synthetic` corpus. `path:count` draws `count` records from a source
(seeded, repeating it when it is smaller).

Design decisions:
* Every record is validated once, in the cost pass (text present, marker count == image count,
  every image decodes, not opening with an image longer than max_len); a bad record is skipped,
  counted and logged with where it is (`FILE:LINE` for JSONL, 1-based physical lines), never a
  crash and never a silent drop. Costs
  (text tokens + 4 x image tokens + 2 per image, capped at max_len, MOCA.md §2) are computed by
  a thread pool with a progress bar and cached on disk per source, keyed by the source's files,
  the tokenizer and the image settings; the cache also lists the image files the records name
  (size, mtime) and is recomputed when any of them changed. A record that still fails when a
  micro-batch is encoded is logged and counted once and skipped from then on; a source none of
  whose records loads any more is a `DataError`, not an endless search for a good bin.
* A record over max_len is cut by the release's rule (MOCA.md §2, `truncate_record`, CL data too): its
  first max_len tokens, less an image whose tokens would be cut and everything after it; a record losing
  images is logged by name. Embedding's rule (every image whole, text cut) would instead reject every
  document whose images alone exceed max_len (five 256-token images at 1280) and splice the text of the
  others around their images.
* The batch plan is a pure function of (seed, epoch): the costs of the shuffled records are
  packed by the C++ first-fit-decreasing packer into bins of `budget` equivalent tokens (no
  padding), and the bins are shuffled. Micro-batch k of the run is bin k of that endless
  sequence, so the data position of a run is just its step, and rank r of W with A accumulation
  steps takes bins step*W*A + a*W + r: W ranks x A steps see exactly the bins that 1 rank x W*A
  steps sees.
"""

import bisect
import functools
import glob
import hashlib
import json
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from engine import synthetic
from moca import host_ops
from moca.batch import Sample
from moca.image import image_grid, load_image
from moca.processor import IMAGE_PAD, Processor, TruncationError, normalize_markers

log = logging.getLogger("moca")
CACHE_VERSION = 5  # 4: the reference's cost, capped at max_len; 5: records whose images exceed max_len are cut
# per-source cost caches and the Arrow copies of Parquet sources (train.py's --cache-dir default)
DEFAULT_CACHE_DIR = os.environ.get("MOCA_CACHE_DIR") or os.path.expanduser("~/.cache/moca")


class RecordError(ValueError):
    """A record that cannot be trained on; the message says why."""


class DataError(RuntimeError):
    """A source that cannot feed training: its table lacks a column records need, or every record it had
    fails to load."""


def require_columns(path: str, names: list[str], *needs: tuple[str, ...]) -> None:
    """DataError unless the table `path`, with columns `names`, has a column of each group in `needs`
    (alternatives): a wrong schema is one error when the table is opened, not a bad record per row."""
    missing = [" / ".join(group) for group in needs if not set(group) & set(names)]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; its columns: {', '.join(names) or 'none'}")


# ------------------------------------------------------------------------------------ sources
class Source:
    """Random-access records. `fingerprint()` changes whenever the records may have changed."""

    name: str

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Where record i is, for messages."""
        return f"{self.name} record {i}"


class SyntheticSource(Source):
    def __init__(self, size: int, seed: int = 0):
        self.name, self.size, self.seed = f"synthetic:{size}", size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        return synthetic.record(self.seed, i)

    def fingerprint(self):
        return {"kind": "synthetic", "version": synthetic.VERSION, "seed": self.seed, "size": self.size}


def _file_stat(path: str) -> list:
    """[absolute path, size, mtime_ns], size and mtime -1 when the file is missing."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, st.st_size, st.st_mtime_ns]


def _files_fingerprint(files: list[str]) -> list:
    return [_file_stat(f) for f in files]


class JsonlSource(Source):
    """One .jsonl file or a folder of them; line offsets are indexed once, records read on demand."""

    def __init__(self, path: str):
        self.name = path
        self.files = sorted(glob.glob(os.path.join(path, "*.jsonl"))) if os.path.isdir(path) else [path]
        self.index: list[tuple[int, int, int]] = []  # (file, byte offset, 1-based line) per record
        for fi, f in enumerate(self.files):
            with open(f, "rb") as fh:
                offset = 0
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        self.index.append((fi, offset, line_no))
                    offset += len(line)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        fi, offset, _ = self.index[i]
        with open(self.files[fi], "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"invalid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise RecordError(f"a record is a JSON object, got {type(rec).__name__}")
        base = os.path.dirname(os.path.abspath(self.files[fi]))
        images = rec.get("images") or []
        if not isinstance(images, list):
            raise RecordError("'images' must be a list of paths")
        rec["images"] = [os.path.join(base, p) if isinstance(p, str) else p for p in images]
        return rec

    def fingerprint(self):
        return {"kind": "jsonl", "files": _files_fingerprint(self.files)}

    def where(self, i):
        fi, _, line = self.index[i]
        return f"{self.files[fi]}:{line}"


class TableSource(Source):
    """Parquet / Arrow files (a folder, or one file) or an HF `save_to_disk` directory (pyarrow needed).

    Records are read at random (a shuffled epoch), and one row of a Parquet file costs decoding its whole row
    group (often the whole file): each Parquet file is therefore copied once, streamed, into a memory-mapped
    Arrow file in `cache_dir` (keyed on its path, size and mtime), as HF datasets does; Arrow files are
    mapped where they are."""

    def __init__(self, path: str, cache_dir: str | None = None):
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"reading {path} needs pyarrow (pip install pyarrow)") from e
        self.name = path
        self.files = self._list_files(path)
        if not self.files:
            raise FileNotFoundError(f"{path}: no .parquet or .arrow files")
        cache_dir = cache_dir or DEFAULT_CACHE_DIR
        self.tables = [f if f.endswith(".arrow") else _arrow_copy(f, cache_dir) for f in self.files]
        self.offsets = [0]
        for f, t in zip(self.files, self.tables):
            table = _arrow_table(t)
            require_columns(f, table.column_names, ("text",))  # `images` is optional: text-only records
            self.offsets.append(self.offsets[-1] + table.num_rows)

    @staticmethod
    def _list_files(path: str) -> list[str]:
        if os.path.isfile(path):
            return [path] if path.endswith((".parquet", ".arrow")) else []
        state = os.path.join(path, "state.json")
        if os.path.exists(state):  # HF Dataset.save_to_disk
            with open(state) as f:
                return [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
        splits = os.path.join(path, "dataset_dict.json")
        if os.path.exists(splits):  # HF DatasetDict.save_to_disk: every split
            with open(splits) as f:
                names = json.load(f)["splits"]
            return [f for s in names for f in TableSource._list_files(os.path.join(path, s))]
        return sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
                      + glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True))

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, i):
        fi = bisect.bisect_right(self.offsets, i) - 1
        row = _arrow_table(self.tables[fi]).slice(i - self.offsets[fi], 1).to_pylist()[0]
        return {"text": row.get("text"), "images": row.get("images") or []}

    def fingerprint(self):
        return {"kind": "table", "files": _files_fingerprint(self.files)}

    def where(self, i):
        fi = bisect.bisect_right(self.offsets, i) - 1
        return f"{self.files[fi]} row {i - self.offsets[fi]}"


def _arrow_copy(path: str, cache_dir: str) -> str:
    """The memory-mappable Arrow copy of Parquet file `path` (its `text` and `images` columns) in cache_dir,
    written once (streamed a row batch at a time, then renamed into place) and reused while the file's path,
    size and mtime stay the same. DataError, before any copying, when it has no `text` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir, f"arrow-{os.path.splitext(os.path.basename(path))[0]}-{key}.arrow")
    if os.path.exists(out):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    pf = pq.ParquetFile(path)
    require_columns(path, pf.schema_arrow.names, ("text",))
    columns = [c for c in ("text", "images") if c in pf.schema_arrow.names]
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    tmp = f"{out}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    log.info("copying %s (%d rows) to a memory-mapped Arrow file in %s", path, pf.metadata.num_rows, cache_dir)
    try:
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in pf.iter_batches(batch_size=1024, columns=columns):
                writer.write_batch(batch)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


@functools.lru_cache(maxsize=16)
def _arrow_table(path: str):
    """Memory-mapped Arrow table: HF writes the IPC stream format, others the file format."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def open_source(path: str, seed: int = 0, cache_dir: str | None = None) -> Source:
    """The source at `path`: `synthetic[:N]`, JSONL (a file or a folder of them), or Parquet / Arrow tables
    (Parquet copied to Arrow in `cache_dir`, default DEFAULT_CACHE_DIR). FileNotFoundError if nothing is there;
    DataError for a `synthetic:` spec whose count is not a number >= 1."""
    if path == "synthetic" or path.startswith("synthetic:"):
        n = path.partition(":")[2] or "2000"
        if not n.isdecimal() or int(n) < 1:
            raise DataError(f"data source {path!r}: the synthetic one is synthetic[:N], N >= 1 records")
        return SyntheticSource(int(n), seed)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source {path!r} does not exist")
    if path.endswith(".jsonl") or (os.path.isdir(path) and glob.glob(os.path.join(path, "*.jsonl"))):
        return JsonlSource(path)
    return TableSource(path, cache_dir)


def parse_source(spec: str) -> tuple[str, int | None]:
    """`path` or `path:count` -> (path, count or None). `synthetic:N` is a source name, not a count."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head and head != "synthetic":
        return head, int(tail)
    return spec, None


# ------------------------------------------------------------------------------- validation
def check_record(rec: dict, processor: Processor) -> tuple[str, list[tuple[int, int, int]]]:
    """-> (text with Qwen markers, image grids); raises RecordError with the reason."""
    if not isinstance(rec, dict):
        raise RecordError(f"a record is a dict, got {type(rec).__name__}")
    text, images = rec.get("text"), rec.get("images") or []
    if not isinstance(text, str) or not text.strip():
        raise RecordError("empty text")
    text = normalize_markers(text) if images else text  # as Processor.encode: no images, an `<image>` is text
    if text.count(IMAGE_PAD) != len(images):
        raise RecordError(f"{text.count(IMAGE_PAD)} image marker(s) but {len(images)} image(s)")
    grids = []
    for k, img in enumerate(images):
        try:
            im = load_image(img)
            grids.append(image_grid(im.width, im.height, processor.image_config))
        except (ValueError, TypeError, OSError) as e:
            raise RecordError(f"image {k}: {e}") from e
    return text, grids


def record_cost(rec: dict, processor: Processor, max_len: int) -> int:
    """The reference's cost of a record (MOCA.md §2): text tokens + 4 x merged image tokens (the vision
    tower's patch work) + 2 per image, capped at max_len. Image tokens are counted at the resolution the
    model sees (256..1024 an image once resized); the release counts them at the original size
    (ceil(W/28) x ceil(H/28)), which misjudges every image its processor resizes. The cost is never below
    the LLM tokens the truncated sample keeps (at most max_len), so a bin's LLM tokens stay within the
    budget. TruncationError for a record that truncation would leave empty (`Processor.truncate` with
    drop_images, as CPTData cuts: one that opens with an image longer than max_len), so the cost pass
    reports it instead of the batch."""
    text, grids = check_record(rec, processor)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    merge = processor.config.vision.spatial_merge_size**2
    image_tokens = [t * h * w // merge for t, h, w in grids]
    if ids[:2] == [processor.vision_start_id, processor.image_token_id] and image_tokens[0] + 2 > max_len:
        raise TruncationError(f"the record opens with an image of {image_tokens[0] + 2} tokens (grid {grids[0]}), "
                              f"more than max_len={max_len}: nothing would be left")
    return min(max_len, len(ids) - 3 * len(grids) + sum(4 * n + 2 for n in image_tokens))


_dropped_images = False  # whether this process has cut an image off a record yet


def truncate_record(processor: Processor, sample: Sample, max_len: int, where: str) -> Sample:
    """A training record's sample cut to max_len by the release's rule (`Processor.truncate` with drop_images:
    an image whose tokens would be cut goes, with all after it), as CPT and CL data take it. A record that loses
    images is logged, naming it (`where`): at info level the first time in a process, then at debug level."""
    global _dropped_images
    if len(sample) <= max_len:
        return sample
    cut = processor.truncate(sample, max_len, drop_images=True)
    if len(cut.grids) < len(sample.grids):
        log.log(logging.DEBUG if _dropped_images else logging.INFO,
                "%s: cut at max_len=%d, %d of its %d image(s) dropped (the release's truncation; any later ones are "
                "logged at debug level)", where, max_len, len(sample.grids) - len(cut.grids), len(sample.grids))
        _dropped_images = True
    return cut


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def _image_files(rec) -> list[str]:
    """The image paths a raw record names (in-memory images have no file)."""
    images = rec.get("images") if isinstance(rec, dict) else None
    return [p for p in images if isinstance(p, str)] if isinstance(images, list) else []


def source_costs(source: Source, processor: Processor, max_len: int, cache_dir: str | None,
                 workers: int = 8, progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
    """-> (costs (N,) int64 with -1 for bad records, {index: reason} of the bad ones), cached on disk.

    The cache file is named by the source's files, tokenizer, image settings and max_len, and holds
    the (path, size, mtime) of every image file the records name: a change to any recomputes."""
    key = hashlib.sha256(json.dumps({
        "version": CACHE_VERSION, "source": source.fingerprint(), "tokenizer": _tokenizer_fingerprint(processor.tokenizer),
        "image": processor.image_config.to_dict(), "merge": processor.config.vision.spatial_merge_size, "max_len": max_len,
    }, sort_keys=True).encode()).hexdigest()[:20]
    cache = None
    if cache_dir:
        stem = "".join(c if c.isalnum() else "_" for c in os.path.basename(os.path.normpath(source.name)))[-40:]
        cache = os.path.join(cache_dir, f"costs-{stem}-{key}.json")
        if os.path.exists(cache):
            with open(cache) as f:
                data = json.load(f)
            changed = next((p for p, *st in data["images"] if _file_stat(p) != [p, *st]), None)
            if changed is None:
                log.info("costs of %s: %d records from cache %s", source.name, len(data["costs"]), cache)
                return np.asarray(data["costs"], dtype=np.int64), {int(k): v for k, v in data["bad"].items()}
            log.info("cost cache %s is stale (%s changed since): recomputing", cache, changed)

    def one(i: int) -> tuple[int, str | None, list]:
        files = []
        try:
            rec = source[i]
            files = [_file_stat(p) for p in _image_files(rec)]  # before reading them: a later change shows
            return record_cost(rec, processor, max_len), None, files
        except Exception as e:  # whatever a record does wrong, it is reported, never fatal
            return -1, f"{type(e).__name__}: {e}", files

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(one, range(len(source)), chunksize=16), total=len(source),
                            desc=f"costs {source.name}", disable=not progress, mininterval=1.0))
    costs = np.asarray([c for c, _, _ in results], dtype=np.int64)
    bad = {i: why for i, (_, why, _) in enumerate(results) if why is not None}
    if cache:
        images = sorted({tuple(st) for _, _, files in results for st in files})
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"source": source.name, "costs": costs.tolist(), "bad": bad, "images": images}, f)
        os.replace(tmp, cache)
    return costs, bad


# ------------------------------------------------------------------------------- the mixture
@dataclass
class MicroBatch:
    """Host-side samples of one micro-batch and the items they came from."""

    samples: list[Sample]
    items: list[int]  # indices into CPTData's item table
    cost: int


class CPTData:
    """The mixture of sources as one endless, deterministic sequence of packed micro-batches."""

    def __init__(self, specs: list[str], processor: Processor, max_len: int = 1280, budget: int = 12800,
                 max_items: int = 0, seed: int = 0, cache_dir: str | None = None, workers: int = 8,
                 progress: bool = True):
        self.processor, self.max_len, self.budget, self.max_items, self.seed = processor, max_len, budget, max_items, seed
        self.sources: list[Source] = []
        items, costs = [], []
        self.bad: dict[str, dict[int, str]] = {}
        self._usable: list[int] = []  # per source: distinct records drawn
        for si, spec in enumerate(specs):
            path, count = parse_source(spec)
            src = open_source(path, seed, cache_dir)
            c, bad = source_costs(src, processor, max_len, cache_dir, workers, progress)
            self.sources.append(src)
            self.bad[src.name] = bad
            for i, why in sorted(bad.items()):
                log.warning("bad record: %s: %s", src.where(i), why)
            good = np.flatnonzero(c >= 0)
            log.info("source %s: %d records, %d good, %d bad%s", src.name, len(c), len(good), len(bad),
                     f", drawing {count}" if count is not None else "")
            if not len(good):
                raise DataError(f"source {src.name}: none of its {len(c)} records is usable (see the warnings above)")
            if count is not None:
                rng = np.random.default_rng([seed, si])
                reps = -(-count // len(good))
                good = np.concatenate([rng.permutation(good) for _ in range(reps)])[:count]
            items.append(np.stack([np.full(len(good), si), good], 1))
            costs.append(c[good])
            self._usable.append(len(np.unique(good)))
        self.items = np.concatenate(items).astype(np.int64)  # (N, 2) [source, record]
        self.costs = np.concatenate(costs)
        if not len(self.items):
            raise ValueError(f"no usable records in {specs}")
        self._epochs: list[list[np.ndarray]] = []
        self._starts = [0]  # global bin index at which each planned epoch starts
        self.broken: set[tuple[int, int]] = set()  # (source, record) of records that failed when encoded
        self._broken_per_source = [0] * len(self.sources)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def runtime_bad(self) -> int:
        """Records that failed when encoded (after the cost pass), each counted once."""
        return len(self.broken)

    def epoch_bins(self, epoch: int) -> list[np.ndarray]:
        """Item indices of every bin of `epoch`, in training order."""
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            perm = np.random.default_rng([self.seed, e, 0]).permutation(len(self.items))
            order, offsets = host_ops.pack_bins(torch.from_numpy(self.costs[perm]), self.budget, self.max_items)
            order, offsets = perm[order.numpy()], offsets.tolist()
            bins = [order[a:b] for a, b in zip(offsets, offsets[1:])]
            shuffle = np.random.default_rng([self.seed, e, 1]).permutation(len(bins))
            self._epochs.append([bins[j] for j in shuffle])
            self._starts.append(self._starts[-1] + len(bins))
        return self._epochs[epoch]

    def bin(self, index: int) -> np.ndarray:
        """Bin number `index` of the endless sequence of epochs."""
        epoch = 0
        while True:
            bins = self.epoch_bins(epoch)
            if index < self._starts[epoch + 1]:
                return bins[index - self._starts[epoch]]
            epoch += 1

    def micro_batch(self, index: int) -> MicroBatch:
        """Encode bin `index`; a record that fails now is logged and skipped, now and in every later
        bin (then the next bin if none is left); DataError once a source has no record left."""
        while True:
            samples, kept = [], []
            for item in self.bin(index).tolist():
                si, ri = (int(x) for x in self.items[item])
                if (si, ri) in self.broken:
                    continue
                src = self.sources[si]
                try:
                    samples.append(truncate_record(self.processor, self.processor.encode(src[ri]), self.max_len,
                                                   src.where(ri)))
                    kept.append(item)
                except Exception as e:
                    self.broken.add((si, ri))
                    self._broken_per_source[si] += 1
                    log.warning("bad record: %s: %s: %s (skipped at load time)", src.where(ri), type(e).__name__, e)
                    if self._broken_per_source[si] == self._usable[si]:
                        raise DataError(f"source {src.name}: none of its {self._usable[si]} records loads any more "
                                        f"(the last, {src.where(ri)}: {type(e).__name__}: {e}); did its files change "
                                        "after the cost pass?") from e
            if samples:
                return MicroBatch(samples, kept, int(self.costs[kept].sum()))
            index += 1
