"""MMEB and ViDoRe v2 evaluation: `python -m engine.evaluate mmeb|vidore ...` (single process or torchrun).

    python -m engine.evaluate mmeb --model CKPT --data MMEB-eval --images eval_images --output runs/mmeb
    python -m engine.evaluate vidore --model CKPT --data vidore_v2 --output runs/vidore
    torchrun --nproc-per-node 8 -m engine.evaluate mmeb ...

Every distinct input of a subset is embedded once through the packed high-throughput path
(`moca.embed.embed_items`). Key decisions: (1) under torch.distributed the unique inputs are
sharded round-robin over ranks and the vectors all-gathered, so every rank scores the same
matrix and rank 0 writes the files; (2) vectors are cached as
OUT/embeddings/<task>/<subset>-<key>.safetensors, the key a hash of the model (weights'
sizes and times, config files; or the preset), dtype, pooling, max_length, image resolution and the inputs
themselves (texts, and images by content: `eval_data.file_identity` or the bytes' hash), so a
rerun scores without re-embedding and a different model or changed images never reuse them.
Scores are fractions in [0, 1] (the table prints percentages); tie rules in engine/metrics.py.
"""

import argparse
import glob
import hashlib
import json
import logging
import math
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from engine import eval_data, parallel
from engine.metrics import ndcg_at_k, precision_at_1, recall_at_k
from moca.processor import COUNT, POSITIVE, add_image_tokens_arg, image_config

log = logging.getLogger("moca")
NDCG_KS, RECALL_KS = (5, 10), (1, 5, 10)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rank r holds rows r, r+world, ... of a (total, H) matrix -> the whole matrix on every rank."""
    rank, world = _rank_world()
    if world == 1:
        return local
    per = math.ceil(total / world)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = torch.zeros(per, local.shape[1], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(total, local.shape[1], dtype=local.dtype)
    for r, part in enumerate(parts):
        n = len(range(r, total, world))
        out[r::world] = part[:n].cpu()
    return out


class Embedder:
    """Embeds the unique inputs of one subset: cached, sharded over ranks, model loaded on first need.
    image_tokens: (min, max) merged tokens an image, else `moca.processor.image_config`'s."""

    def __init__(self, model: str = "tiny", device: str | None = None, dtype: torch.dtype | None = None,
                 batch_tokens: int = 16384, num_workers: int = 0, max_length: int | None = None,
                 pooling: str = "mean", attn_backend: str | None = None, image_tokens: tuple[int, int] | None = None):
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        self.model_name, self.device = model, device
        self.dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        self.batch_tokens, self.num_workers, self.max_length = batch_tokens, num_workers, max_length
        self.pooling, self.attn_backend, self.image_tokens = pooling, attn_backend, image_tokens
        self._loaded = None
        image = image_config(model, image_tokens)
        self.fingerprint = _sha({
            "model": self._model_identity(), "dtype": str(self.dtype), "pooling": pooling, "max_length": max_length,
            "pixels": [image.min_pixels, image.max_pixels],
        })

    def _model_identity(self):
        path = self.model_name
        if not os.path.isdir(path):
            return {"preset": path}  # presets are seeded: same name, same weights
        files = {}
        for f in sorted(glob.glob(os.path.join(path, "*"))):
            if f.endswith(".json"):
                with open(f, "rb") as fh:
                    files[os.path.basename(f)] = hashlib.sha256(fh.read()).hexdigest()
            elif f.endswith(".safetensors"):
                st = os.stat(f)
                files[os.path.basename(f)] = [st.st_size, st.st_mtime_ns]
        return {"path": os.path.abspath(path), "files": files}

    def load(self):
        if self._loaded is None:
            from moca.checkpoint import load_model
            from moca.processor import Processor

            model = load_model(self.model_name, device=self.device, dtype=self.dtype)
            model.attn_backend = self.attn_backend
            self._loaded = model, Processor.from_pretrained(self.model_name, max_length=self.max_length,
                                                            image_tokens=self.image_tokens)
        return self._loaded

    def embed(self, items: list[dict], keys: list, cache_stem: str) -> torch.Tensor:
        """(N,) inputs with their identities -> (N, H) float32 vectors, from cache_stem-<key> or computed."""
        from moca.embed import embed_items

        key = _sha({"model": self.fingerprint, "inputs": keys})
        path = f"{cache_stem}-{key[:16]}.safetensors"
        cached = self._read_cache(path, key, len(items))
        rank, world = _rank_world()
        # every rank embeds unless every rank has the cache (on CUDA under NCCL: it serves no CPU tensor)
        hits = parallel.all_reduce_sum(torch.tensor([float(cached is not None)], dtype=torch.float64))
        if hits.item() == world:
            log.info("cached: %s", path)
            return cached
        model, processor = self.load()
        local = embed_items(model, processor, items[rank::world], self.batch_tokens, pooling=self.pooling,
                            num_workers=self.num_workers, progress=rank == 0)
        vectors = gather_rows(local.to(self.device) if world > 1 and self.device.startswith("cuda") else local, len(items))
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_file({"embeddings": vectors.contiguous()}, path + ".tmp", metadata={"key": key})
            os.replace(path + ".tmp", path)
        return vectors

    @staticmethod
    def _read_cache(path: str, key: str, n: int) -> torch.Tensor | None:
        if not os.path.isfile(path):
            return None
        with safe_open(path, "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            vectors = f.get_tensor("embeddings")
        return vectors if vectors.shape[0] == n else None


def _write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, allow_nan=False)  # strict JSON: a NaN is a bug, never a score
    os.replace(path + ".tmp", path)


def _mean(values):
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------- MMEB
def score_mmeb_subset(vectors: torch.Tensor, subset: eval_data.MMEBSubset, rows_per_chunk: int = 32) -> torch.Tensor:
    """(N, H) unique-input vectors -> (R,) bool precision@1 hits, cosine scores in float32."""
    counts = torch.tensor([len(c) for c in subset.candidates])
    cand = torch.zeros(len(subset.candidates), int(counts.max()), dtype=torch.int64)
    for r, c in enumerate(subset.candidates):
        cand[r, : len(c)] = torch.tensor(c)
    queries = torch.tensor(subset.queries)
    hits = []
    for s in range(0, len(queries), rows_per_chunk):
        q = vectors[queries[s : s + rows_per_chunk]]  # (r, H)
        t = vectors[cand[s : s + rows_per_chunk]]  # (r, C, H)
        hits.append(precision_at_1(torch.einsum("rh,rch->rc", q, t), counts[s : s + rows_per_chunk]))
    return torch.cat(hits)


def summarize_mmeb(subsets: dict[str, dict]) -> dict:
    """Per-subset precision@1 -> means per meta-task, IND/OOD and overall (unweighted over MMEB's subsets;
    others are listed, in no mean)."""
    unknown = sorted(set(subsets) - set(eval_data.MMEB_SUBSETS))
    if unknown:
        log.warning("subsets not in MMEB's 36 are scored but left out of every mean: %s", unknown)

    def group(names):
        vals = [subsets[n]["precision@1"] for n in names if n in subsets]
        return {"precision@1": _mean(vals), "n_subsets": len(vals)}

    tasks = {t: group(ind + ood) for t, (ind, ood) in eval_data.MMEB_GROUPS.items()}
    splits = {s: group([n for n, (_, sp) in eval_data.MMEB_SUBSETS.items() if sp == s]) for s in ("IND", "OOD")}
    return {
        "subsets": subsets,
        "meta_tasks": tasks,
        "splits": splits,
        "overall": _mean([v["precision@1"] for n, v in subsets.items() if n in eval_data.MMEB_SUBSETS]),
        "complete": set(eval_data.MMEB_SUBSETS) <= set(subsets),
    }


def evaluate_mmeb(embedder: Embedder, data: str, images: str, output: str, subsets: list[str] | None = None) -> dict:
    """MMEB: precision@1 of every subset under `data` (or `subsets`), its meta-task / IND / OOD / overall means
    (VLM2Vec's protocol), written to OUTPUT/scores.json by rank 0 and returned. EvalDataError for no subsets or
    malformed ones."""
    names = subsets or eval_data.mmeb_subsets(data)
    if not names:
        raise eval_data.EvalDataError(f"{data}: no MMEB subset folders with test-*.parquet")
    results = {}
    for name in names:
        subset = eval_data.load_mmeb_subset(data, name, images)
        vectors = embedder.embed(subset.inputs.items, subset.inputs.keys, os.path.join(output, "embeddings", "mmeb", name))
        hits = score_mmeb_subset(vectors, subset)
        results[name] = {"precision@1": hits.double().mean().item(), "n": hits.numel()}
        log.info("%s: precision@1 %.4f over %d rows (%d unique inputs)", name, results[name]["precision@1"],
                 hits.numel(), len(subset.inputs.items))
    scores = summarize_mmeb(results)
    if _rank_world()[0] == 0:
        _write_json(os.path.join(output, "scores.json"), scores)
        print(format_mmeb(scores))
    return scores


def format_mmeb(scores: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:6.2f}"  # noqa: E731
    lines = [f"{'subset':<20} {'task':<17} {'split':<5} {'P@1':>6} {'n':>6}"]
    for name, s in scores["subsets"].items():
        task, split = eval_data.MMEB_SUBSETS.get(name, ("?", "?"))
        lines.append(f"{name:<20} {task:<17} {split:<5} {pct(s['precision@1'])} {s['n']:>6}")
    lines.append("")
    for group in ("meta_tasks", "splits"):
        for name, s in scores[group].items():
            lines.append(f"{name:<20} {pct(s['precision@1'])}  ({s['n_subsets']} subsets)")
    lines.append(f"{'overall':<20} {pct(scores['overall'])}" + ("" if scores["complete"] else "  (not all 36 subsets)"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- ViDoRe
def score_beir(query_vectors: torch.Tensor, page_vectors: torch.Tensor, ds: eval_data.BeirDataset,
               languages: list[str] | None = None) -> dict:
    """(Q, H) judged queries and (D, H) pages -> mean nDCG@k / recall@k over the judged queries.

    Tied scores rank by corpus-id, descending as strcmp orders them: trec_eval's rule, so pytrec_eval (MTEB,
    ViDoRe) gives the same numbers when pages coincide. With a `language` column (ViDoRe v2's multilingual
    sets) each language is scored on its own queries and the data set's score is the mean over languages,
    as MTEB scores its language subsets; `languages` keeps only those. Raises EvalDataError when the
    `languages` asked for are not in the data set."""
    order = sorted(range(len(ds.corpus_ids)), key=lambda j: ds.corpus_ids[j].encode(), reverse=True)
    scores = (query_vectors @ page_vectors.T)[:, order]  # (Q, D), columns in trec_eval's tie order
    column = {ds.corpus_ids[j]: c for c, j in enumerate(order)}
    relevance = torch.zeros(scores.shape, dtype=torch.float64)
    for i, qid in enumerate(ds.query_ids):
        for cid, rel in ds.qrels[qid].items():
            relevance[i, column[cid]] = rel
    per_query = {f"ndcg@{k}": ndcg_at_k(scores, relevance, k) for k in NDCG_KS}
    per_query.update({f"recall@{k}": recall_at_k(scores, relevance, k) for k in RECALL_KS})
    if ds.languages is None:
        if languages:
            raise eval_data.EvalDataError(f"{ds.name}: --languages given, but its queries have no language column")
        return {m: v.mean().item() for m, v in per_query.items()}
    found = sorted(set(ds.languages))
    wanted = languages or found
    if set(wanted) - set(found):
        raise eval_data.EvalDataError(f"{ds.name}: no queries in {sorted(set(wanted) - set(found))}; it has {found}")
    by_language = {}
    for lang in wanted:
        rows = torch.tensor([i for i, q in enumerate(ds.languages) if q == lang])
        by_language[lang] = {m: v[rows].mean().item() for m, v in per_query.items()}
        by_language[lang]["n_queries"] = len(rows)
    out = {m: _mean([r[m] for r in by_language.values()]) for m in per_query}
    out["languages"] = by_language
    return out


def evaluate_vidore(embedder: Embedder, data: str, output: str, datasets: list[str] | None = None,
                    languages: list[str] | None = None) -> dict:
    """ViDoRe (BEIR layout): nDCG@5/@10 and recall@1/5/10 of every data set under `data` (`score_beir`), their
    mean nDCG@5, written to OUTPUT/scores.json by rank 0 and returned. EvalDataError for no data sets,
    malformed ones, or `languages` a data set lacks."""
    names = datasets or eval_data.beir_datasets(data)
    if not names:
        raise eval_data.EvalDataError(f"{data}: no data set folders with corpus/, queries/, qrels/")
    results = {}
    for name in names:
        ds = eval_data.load_beir(data, name)
        if languages and ds.languages is None:  # before anything is embedded
            raise eval_data.EvalDataError(f"{name}: --languages given, but its queries have no language column")
        stem = os.path.join(output, "embeddings", "vidore", name)
        pages = embedder.embed(ds.pages.items, ds.pages.keys, stem + "-corpus")
        queries = embedder.embed(ds.queries.items, ds.queries.keys, stem + "-queries")
        results[name] = score_beir(queries[torch.tensor(ds.query_index, dtype=torch.int64)], pages, ds, languages)
        n_queries = sum(r["n_queries"] for r in results[name]["languages"].values()) if ds.languages else len(ds.query_ids)
        results[name].update(n_queries=n_queries, n_pages=len(ds.corpus_ids), unjudged_queries=ds.unjudged_queries)
        log.info("%s: nDCG@5 %.4f over %d queries, %d pages", name, results[name]["ndcg@5"], n_queries, len(ds.corpus_ids))
    scores = {"datasets": results, "mean_ndcg@5": _mean([r["ndcg@5"] for r in results.values()])}
    if _rank_world()[0] == 0:
        _write_json(os.path.join(output, "scores.json"), scores)
        print(format_vidore(scores))
    return scores


def format_vidore(scores: dict) -> str:
    metrics = [f"ndcg@{k}" for k in NDCG_KS] + [f"recall@{k}" for k in RECALL_KS]
    width = max(12, *(len(n) for n in scores["datasets"]))
    lines = [f"{'dataset':<{width}} " + " ".join(f"{m:>9}" for m in metrics) + f" {'queries':>8} {'pages':>6}"]
    for name, r in scores["datasets"].items():
        lines.append(f"{name:<{width}} " + " ".join(f"{100 * r[m]:9.2f}" for m in metrics)
                     + f" {r['n_queries']:>8} {r['n_pages']:>6}")
        for lang, lr in r.get("languages", {}).items():
            lines.append(f"{'  ' + lang:<{width}} " + " ".join(f"{100 * lr[m]:9.2f}" for m in metrics)
                         + f" {lr['n_queries']:>8}")
    lines.append(f"{'mean nDCG@5':<{width}} {100 * scores['mean_ndcg@5']:9.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- CLI
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m engine.evaluate", description="MMEB / ViDoRe v2 evaluation.")
    sub = p.add_subparsers(dest="task", required=True)
    for task in ("mmeb", "vidore"):
        s = sub.add_parser(task)
        s.add_argument("--model", default="tiny", help="a preset (tiny, 3b, 7b) or an HF checkpoint directory")
        s.add_argument("--data", required=True, help="folder of the data set's local copy (public layout)")
        if task == "mmeb":
            s.add_argument("--images", required=True, help="folder the image paths in the parquet files start from")
            s.add_argument("--subsets", nargs="+", default=None, help="subset folders to score (default: all found)")
        else:
            s.add_argument("--datasets", nargs="+", default=None, help="data set folders to score (default: all found)")
            s.add_argument("--languages", nargs="+", default=None,
                           help="score only queries in these languages (the queries' `language` column, e.g. english); "
                                "default: every language, each scored alone, the data set's score their mean (MTEB's)")
        s.add_argument("--output", required=True, help="folder for scores.json and the embedding cache")
        s.add_argument("--batch-tokens", type=POSITIVE, default=16384, help="token budget per micro-batch")
        s.add_argument("--num-workers", type=COUNT, default=None,
                       help="DataLoader processes decoding images (default: 4 on CUDA; 0 on a CPU, which they would "
                            "only take from the model)")
        s.add_argument("--max-length", type=POSITIVE, default=None,
                   help="tokens per input (default: no limit); a longer one has its text cut from the end, its "
                   "images kept whole, and one whose images alone exceed it is an error")
        add_image_tokens_arg(s)
        s.add_argument("--pooling", choices=["mean", "last"], default="mean")
        s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="default: bfloat16 on CUDA, float32 on CPU")
        s.add_argument("--attn-backend", choices=["auto", "triton", "torch"], default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.trainer import check_attn_backend
    from moca.checkpoint import check_model_name
    from moca.embed import writable_folder

    # user errors before anything is read, embedded or written; the output folder is made here
    check_model_name(args.model)
    check_attn_backend(args.attn_backend, None)
    for flag, folder in (("--data", args.data), ("--images", getattr(args, "images", None))):
        if folder is not None and not os.path.isdir(folder):
            raise eval_data.EvalDataError(f"{flag} {folder}: no such folder")
    writable_folder(args.output, "--output")

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        embedder = Embedder(
            args.model, dtype=getattr(torch, args.dtype) if args.dtype else None, batch_tokens=args.batch_tokens,
            num_workers=args.num_workers if args.num_workers is not None else (4 if torch.cuda.is_available() else 0),
            max_length=args.max_length, pooling=args.pooling,
            attn_backend=None if args.attn_backend == "auto" else args.attn_backend, image_tokens=args.image_tokens,
        )
        if args.task == "mmeb":
            return evaluate_mmeb(embedder, args.data, args.images, args.output, args.subsets)
        return evaluate_vidore(embedder, args.data, args.output, args.datasets, args.languages)
    finally:
        if distributed:
            parallel.shutdown()


if __name__ == "__main__":
    from moca.embed import run_cli

    from engine.trainer import UsageError

    run_cli(main, "engine.evaluate", errors=(eval_data.EvalDataError, UsageError))  # a user error: one line
