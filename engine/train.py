"""Training entry point: `python -m engine.train cpt|cl [...]` (MoCa's two stages, MOCA.md §2 and §3).

With no arguments, `cpt` trains the `tiny` preset on the built-in synthetic interleaved corpus on
the CPU in a few minutes and writes its run to runs/cpt-tiny/; `cl` then fine-tunes the newest
runs/cpt-tiny*/final (else `tiny`) on the synthetic pairs and writes runs/cl-tiny/ with eval.json.
With arguments either trains a real checkpoint on real data, in one process or under `torchrun`
(DDP, or FSDP2 with --parallel fsdp). Defaults are the release's (MOCA.md §2 for cpt, §3 for cl);
the embedded tiny runs override the few that only make sense at scale.
"""

import argparse
import json
import logging
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from engine import parallel
from engine.data import DEFAULT_CACHE_DIR
from engine.trainer import (METRICS, PRECISIONS, DivergedError, RunDirError, TrainConfig, Trainer, UsageError,
                            check_attn_backend, freeze, overwrite_run_dir, plot_metrics, prepare_run_dir)
from moca.processor import COUNT, POSITIVE, add_image_tokens_arg, bounded, device_arg

log = logging.getLogger("moca")

# Embedded-default overrides for the tiny preset: a CPU, a fresh random model, a small corpus. The lr is
# gentle on purpose: from random weights MLM first learns the unigram prior, and at 6e-4..2e-3 the tiny
# model gets there by writing one vector into every position (mean-pooled cosine 0.999 between
# unrelated captions), an init that contrastive learning then cannot leave in minutes.
PRESET_DEFAULTS = {
    "tiny": dict(lr=3e-4, warmup_ratio=0.05, grad_accum=1, max_steps=80, max_len=512, budget=1024, log_every=10),
}
# no max_steps: a run is --epochs (1, as the release) passes over its data
COMMON_DEFAULTS = dict(lr=2e-6, warmup_ratio=0.1, grad_accum=4, max_len=1280, budget=12800, log_every=10)

# Stage 2 (MOCA.md §3): release hyper-parameters, and the embedded default's (tiny model, CPU, synthetic pairs:
# mean precision@1 0.88 after 1000 steps, about 3 min on 2 cores; the README table).
CL_DEFAULTS = dict(lr=2e-5, warmup_ratio=0.05, grad_accum=1, max_len=1280, log_every=10)  # 1 epoch: --epochs
CL_EMBEDDED = dict(lr=3e-4, warmup_ratio=0.1, grad_accum=1, max_steps=1000, max_len=512, log_every=25,
                   freeze=["embed_tokens"])


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(rank: int) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s moca[{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def _data_spec(text: str) -> str:
    """`path` or `path:count` with count >= 1."""
    _, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and int(tail) < 1:
        raise argparse.ArgumentTypeError(f"{text}: the count after ':' must be >= 1")
    return text


SHARE = bounded(float, 0.0, 1.0)


def _device(text: str) -> str:
    """--device of a training process: `device_arg`, less an index (each rank runs on cuda:LOCAL_RANK)."""
    if text.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"{text}: a training process runs on cuda:LOCAL_RANK (cuda:0 without "
                                         "torchrun): give cuda, and choose the GPUs with CUDA_VISIBLE_DEVICES")
    return device_arg(text)


def add_common_args(p: argparse.ArgumentParser, stage: str) -> None:
    """The flags both stages take; help texts give `stage`'s defaults (release, then the tiny preset's)."""
    release, tiny = (COMMON_DEFAULTS, PRESET_DEFAULTS["tiny"]) if stage == "cpt" else (CL_DEFAULTS, CL_EMBEDDED)
    g = p.add_argument_group("run")
    g.add_argument("--model", default="tiny" if stage == "cpt" else None,
                   help="preset (tiny, 3b, 7b) or an HF checkpoint directory (default: " + (
                       "tiny)" if stage == "cpt" else "the newest runs/cpt-tiny*/final, else tiny)"))
    data = "synthetic:1000" if stage == "cpt" else "synthetic:2000"
    sources = ("parquet/arrow folder or file, HF save_to_disk dir, .jsonl, or synthetic[:N]" if stage == "cpt" else
               "a subset (.jsonl, parquet/arrow folder or file), a folder of subsets, synthetic[:N] or synthetic/<task>")
    g.add_argument("--data", nargs="+", type=_data_spec, default=[data],
                   help=f"sources: {sources}; 'path:count' draws count records (default: {data})")
    g.add_argument("--output-dir", default=None, help=f"run directory (default: runs/{stage}-<model name>)")
    g.add_argument("--max-steps", type=POSITIVE, default=None,
                   help="total optimizer steps, also across a resume (default: --epochs of the data; the tiny preset's "
                        f"embedded run: {tiny['max_steps']})")
    g.add_argument("--epochs", type=bounded(float, 0.0, low_open=True), default=None,
                   help="passes over the data when --max-steps is not given (default 1, as MOCA.md's release)")
    g.add_argument("--save-every", type=COUNT, default=0, help="write checkpoint-<step>/ every N steps (0: only final/)")
    g.add_argument("--keep-last", type=POSITIVE, default=2, help="checkpoint-<step>/ directories to keep (2)")
    g.add_argument("--seed", type=COUNT, default=0,
                   help="seeds the data order" + (", the masks" if stage == "cpt" else "") + " and a fresh model (0)")
    g.add_argument("--loader-workers", type=COUNT, default=None,
                   help="processes per rank preparing the next steps' micro-batches (decode, pack, mask) while the "
                        "device runs; 0: in the training process, between steps (default: 2 on CUDA; 0 on a CPU, "
                        "which they would only take from the training)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds a run, deleting it once the model and data load")
    g.add_argument("--device", type=_device, default=None,
                   help="cpu or cuda (default: cuda when available); a rank runs on cuda:LOCAL_RANK")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    log_every = release["log_every"] if tiny["log_every"] == release["log_every"] else (
        f"{release['log_every']}; tiny: {tiny['log_every']}")
    g.add_argument("--log-every", type=POSITIVE, default=None, help=f"log a line every N steps ({log_every})")
    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=bounded(float, 0.0, low_open=True), default=None,
                   help=f"peak learning rate (MOCA.md: {release['lr']:g}; tiny: {tiny['lr']:g})")
    o.add_argument("--warmup-ratio", type=SHARE, default=None,
                   help=f"linear warm-up share of max-steps ({release['warmup_ratio']:g}; tiny: {tiny['warmup_ratio']:g})")
    o.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.0, help="AdamW's (0)")
    o.add_argument("--grad-clip", type=bounded(float, 0.0, low_open=True), default=5.0,
                   help="max global gradient norm (5.0). The gradient is that of the step's mean loss; " + (
                       "the CPT release's was about --grad-accum times larger (docs/MOCA.md §2)" if stage == "cpt" else
                       "the CL release's was W times smaller on W ranks (docs/MOCA.md §3)"))
    o.add_argument("--grad-accum", type=POSITIVE, default=None,
                   help=f"micro-batches per optimizer step and rank ({release['grad_accum']}; tiny: {tiny['grad_accum']})")
    o.add_argument("--max-len", type=POSITIVE, default=None,
                   help=f"tokens per sample ({release['max_len']}; tiny: {tiny['max_len']}); a longer one keeps its "
                        "first max-len tokens less an image that would be cut, which goes with all after it (MOCA.md §2)")
    add_image_tokens_arg(o)
    o.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere; bf16: autocast on any device; fp32")
    o.add_argument("--activation-checkpointing", action="store_true")
    o.add_argument("--compile", action="store_true", help="torch.compile every block")
    o.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="under torchrun: DDP or FSDP2 (ddp)")
    o.add_argument("--freeze", nargs="+", default=None, metavar="PREFIX",
                   help="do not train parameters whose names start with these (e.g. embed_tokens visual)"
                        + ("" if stage == "cpt" else "; tiny: embed_tokens"))
    o.add_argument("--attn-backend", choices=["triton", "torch"], default=None,
                   help="attention/loss kernels (default: Triton on GPU, torch on CPU)")


def add_cpt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cpt data and objective")
    g.add_argument("--budget", type=POSITIVE, default=None, help="equivalent tokens per micro-batch (12800; tiny: 1024)")
    g.add_argument("--max-items", type=COUNT, default=0, help="most samples per micro-batch (0: no limit)")
    g.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                   help="where per-source cost caches and the Arrow copies of Parquet sources live "
                        "(default $MOCA_CACHE_DIR or ~/.cache/moca)")
    g.add_argument("--workers", type=POSITIVE, default=min(16, os.cpu_count() or 1),
                   help="threads of the cost pass (the CPUs, at most 16)")
    g.add_argument("--mlm-prob", type=SHARE, default=0.4, help="share of non-special tokens masked (0.4)")
    g.add_argument("--mae-prob", type=SHARE, default=0.5, help="share of image tokens (2x2 patches) masked (0.5)")
    g.add_argument("--mae-weight", type=bounded(float, 0.0), default=0.1, help="loss = MLM + w * MAE (0.1)")
    g.add_argument("--no-mlm", action="store_true", help="switch the MLM loss off")
    g.add_argument("--no-mae", action="store_true", help="switch the MAE loss off")


def resolve_defaults(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    preset = PRESET_DEFAULTS.get(args.model, {}) if not os.path.isdir(args.model) else {}
    fill(args, {**COMMON_DEFAULTS, **preset})
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{stage}-{os.path.basename(os.path.normpath(args.model))}")
    return args


def fill(args: argparse.Namespace, defaults: dict) -> None:
    """Each default where its flag was not given; a default step count only when --epochs was not given either."""
    if args.epochs is not None and args.max_steps is not None:
        raise SystemExit("moca: give --max-steps or --epochs, not both")
    for k, v in defaults.items():
        if getattr(args, k) is None and not (k == "max_steps" and args.epochs is not None):
            setattr(args, k, v)


def resolve_steps(args: argparse.Namespace, micro_batches: int, per_step: int) -> None:
    """--max-steps, else --epochs (default 1) over an epoch of `micro_batches`, `per_step` of them an optimizer
    step (the last step may reach into the next epoch)."""
    if args.max_steps is None:
        epochs = 1.0 if args.epochs is None else args.epochs
        args.max_steps = max(1, math.ceil(epochs * micro_batches / per_step))
        log.info("%g epoch(s): %d micro-batches an epoch, %d a step -> %d optimizer steps", epochs, micro_batches,
                 per_step, args.max_steps)


# Per stage, the flags that decide each step's batches and loss: a resume refuses other values (TrainConfig.settings)
SETTINGS = {
    "cpt": ("max_len", "image_tokens", "budget", "max_items", "mlm_prob", "mae_prob", "mae_weight", "no_mlm", "no_mae",
            "freeze"),
    "cl": ("max_len", "image_tokens", "batch_size", "negative_ratio", "temperature", "max_per_subset", "freeze"),
}


def train_config(args: argparse.Namespace, out: str, stage: str) -> TrainConfig:
    """The loop settings, from the common flags, plus the stage's `SETTINGS` and data specs."""
    return TrainConfig(
        output_dir=out, max_steps=args.max_steps, lr=args.lr, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
        save_every=args.save_every, keep_last=args.keep_last, seed=args.seed, precision=args.precision,
        activation_checkpointing=args.activation_checkpointing, compile=args.compile, parallel=args.parallel,
        log_every=args.log_every, progress=not args.no_progress, loader_workers=args.loader_workers,
        settings={k: getattr(args, k) for k in SETTINGS[stage]}, data=list(args.data),
    )


def start_point(args: argparse.Namespace, out: str, ctx) -> str | None:
    """The checkpoint to resume from (--resume), or None: see `prepare_run_dir`. CheckpointError for a --model
    that is neither a preset nor a folder, before the run folder is made (a resume only needs it when there is
    nothing to resume)."""
    from moca.checkpoint import check_model_name

    if not args.resume:
        check_model_name(args.model)
    resume_dir = prepare_run_dir(out, args.resume, args.overwrite, ctx)
    if args.resume and resume_dir is None:
        log.info("--resume: no checkpoint in %s, starting fresh", out)
        check_model_name(args.model)
    return resume_dir


def check_same_data(plan: list[np.ndarray], ctx) -> None:
    """Ranks slice one epoch plan that each computes from its own view of the data; a rank that sees other
    files (no shared filesystem, a different --image-root) would train other records and, with another step
    count, hang the others at the end. DataError on every rank when the plans differ."""
    key = b"|".join(np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in plan)
    if ctx.world > 1 and not parallel.same_on_all_ranks(key):
        from engine.data import DataError

        raise DataError("the ranks read different data (records, files or image roots differ between them): every "
                        "rank must see the same --data, on a filesystem they share")


def run_cpt(args: argparse.Namespace) -> list[dict]:
    from engine.cpt import MAE_HEAD_FILE, CPTTask, MAEHead
    from engine.data import CPTData
    from engine.masking import add_mask_token
    from moca.checkpoint import load_model
    from moca.embed import writable_folder
    from moca.processor import Processor

    ctx = parallel.init_distributed(args.device)
    setup_logging(ctx.rank)
    args = resolve_defaults(args, "cpt")
    out = args.output_dir
    writable_folder(args.cache_dir, "--cache-dir (default $MOCA_CACHE_DIR or ~/.cache/moca)")
    resume_dir = start_point(args, out, ctx)
    source = resume_dir or args.model
    log.info("cpt: model=%s data=%s output=%s world=%d device=%s", source, " ".join(args.data), out, ctx.world,
             ctx.device)

    processor = Processor.from_pretrained(source, image_tokens=args.image_tokens)
    mask_id = add_mask_token(processor.tokenizer)
    model = load_model(source, device=ctx.device, dtype=torch.float32, seed=args.seed).train()
    model.attn_backend = args.attn_backend
    if args.freeze:
        log.info("frozen: %d parameter tensors under %s", freeze(model, args.freeze), " ".join(args.freeze))
    head = MAEHead(model, torch.Generator().manual_seed(args.seed + 1))
    head_file = os.path.join(source, MAE_HEAD_FILE) if os.path.isdir(source) else None
    if head_file and os.path.exists(head_file):
        head.load_state_dict(load_file(head_file, device=str(ctx.device)))
    log.info("<|mask|> id %d; MAE head from %s", mask_id, head_file if head_file and os.path.exists(head_file)
             else f"layer {model.config.num_hidden_layers // 2}")

    def build_data():
        return CPTData(args.data, processor, max_len=args.max_len, budget=args.budget, max_items=args.max_items,
                       seed=args.seed, cache_dir=args.cache_dir, workers=args.workers,
                       progress=ctx.is_main and not args.no_progress)

    data = build_data() if ctx.is_main else None  # rank 0 fills the cost cache, the others then read it
    parallel.barrier()
    data = data or build_data()
    plan = data.epoch_bins(0)
    check_same_data(plan, ctx)
    if args.overwrite:
        overwrite_run_dir(out, ctx)
    resolve_steps(args, len(plan), ctx.world * args.grad_accum)
    task = CPTTask(model, processor, data, head, seed=args.seed, mlm_prob=0.0 if args.no_mlm else args.mlm_prob,
                   mae_prob=0.0 if args.no_mae else args.mae_prob, mae_weight=args.mae_weight)
    trainer = Trainer(task, train_config(args, out, "cpt"), ctx)
    if resume_dir:
        trainer.resume(resume_dir)
    history = trainer.fit()
    if ctx.is_main:
        report(out, task.part_names, data)
    return history


def report(out: str, names: tuple[str, ...], data) -> None:
    metrics = os.path.join(out, METRICS)
    png = os.path.join(out, "loss_curve.png")
    plot_metrics(metrics, png, names)
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    k = max(1, min(5, len(rows) // 4))
    mean = lambda rs, n: sum(r[n] for r in rs) / len(rs)  # noqa: E731
    bad = sum(len(b) for b in data.bad.values()) + data.runtime_bad
    print(f"moca cpt: {rows[-1]['step']} steps, {rows[-1]['tokens_total']} tokens, {len(data)} records "
          f"({bad} bad records skipped, see the log)")
    for n in names:
        print(f"  {n:9s} first {k} steps {mean(rows[:k], n):.4f} -> last {k} steps {mean(rows[-k:], n):.4f}")
    print(f"wrote {os.path.join(out, 'final')}/ (HF checkpoint + tokenizer with <|mask|> + mae_head.safetensors + trainer state)")
    print(f"wrote {metrics}")
    print(f"wrote {png}")




def add_cl_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cl data and objective")
    g.add_argument("--batch-size", type=POSITIVE, default=None,
                   help="queries per device and micro-batch (24; the embedded run, without --model: 16)")
    g.add_argument("--negative-ratio", type=COUNT, default=2, help="hard negatives per query (2)")
    g.add_argument("--temperature", type=bounded(float, 0.0, low_open=True), default=0.03, help="InfoNCE's tau (0.03)")
    g.add_argument("--grad-cache-chunk", type=COUNT, default=0, help="GradCache chunk in samples (0: off)")
    g.add_argument("--image-root", default=None, help="root of relative image paths (default: the folder given to --data; a file's folder)")
    g.add_argument("--max-per-subset", type=COUNT, default=50000,
                   help="records drawn from a subset given without :count, its first ones when it has more "
                        "(MOCA.md: the release's 50000; 0: all)")


def newest_cpt_run(root: str = "runs") -> str | None:
    """final/ of the newest embedded-default CPT run under root (runs/cpt-tiny*), or None."""
    import glob

    finals = [f for f in glob.glob(os.path.join(root, "cpt-tiny*", "final")) if os.path.isfile(os.path.join(f, "config.json"))]
    return max(finals, key=os.path.getmtime) if finals else None


def run_cl(args: argparse.Namespace) -> list[dict]:
    from engine import cl_synthetic
    from engine.cl import CLTask
    from engine.cl_data import CLData
    from moca.checkpoint import load_model
    from moca.processor import Processor

    ctx = parallel.init_distributed(args.device)
    setup_logging(ctx.rank)
    embedded = args.model is None
    if embedded:
        args.model = newest_cpt_run() or "tiny"
    fill(args, CL_EMBEDDED if embedded or args.model in PRESET_DEFAULTS else CL_DEFAULTS)
    if args.batch_size is None:
        args.batch_size = 16 if embedded else 24
    out = args.output_dir or os.path.join("runs", "cl-tiny" if embedded else f"cl-{os.path.basename(os.path.normpath(args.model))}")
    resume_dir = start_point(args, out, ctx)
    source = resume_dir or args.model
    log.info("cl: model=%s data=%s output=%s world=%d device=%s", source, " ".join(args.data), out, ctx.world,
             ctx.device)
    processor = Processor.from_pretrained(source, image_tokens=args.image_tokens)
    model = load_model(source, device=ctx.device, dtype=torch.float32, seed=args.seed).train()
    model.attn_backend = args.attn_backend
    if args.freeze:
        log.info("frozen: %d parameter tensors under %s", freeze(model, args.freeze), " ".join(args.freeze))
    data = CLData(args.data, processor, global_batch=args.batch_size * ctx.world, negative_ratio=args.negative_ratio,
                  image_root=args.image_root, max_len=args.max_len, seed=args.seed,
                  max_per_subset=args.max_per_subset or None)
    plan = data.epoch(0)
    check_same_data([rows for _, rows in plan] + [np.asarray([si for si, _ in plan])], ctx)
    if args.overwrite:
        overwrite_run_dir(out, ctx)
    resolve_steps(args, len(plan), args.grad_accum)  # a micro-batch: one global batch over the ranks
    synthetic = all(d.startswith("synthetic") for d in args.data)
    eval_path = os.path.join(out, "eval.json")
    evals = {}
    if resume_dir and synthetic and os.path.isfile(eval_path):  # the "before" of the run being resumed
        with open(eval_path) as f:
            evals = {k: v for k, v in json.load(f).items() if k == "before"}

    def evaluate(when, sharded=False):
        if ctx.is_main and synthetic:
            subsets, images = cl_synthetic.eval_set()
            # a sharded (FSDP) model cannot run on one rank: its gathered weights are in final/
            net = model
            if sharded:
                net = load_model(os.path.join(out, "final"), device=ctx.device)
                net.attn_backend = model.attn_backend
            evals[when] = cl_synthetic.evaluate(net.eval(), processor, subsets, images)
            model.train()
            log.info("synthetic eval %s: mean precision@1 %.3f %s", when, evals[when]["mean_precision@1"],
                     " ".join(f"{t}={v:.2f}" for t, v in evals[when]["tasks"].items()))
            os.makedirs(out, exist_ok=True)
            with open(eval_path + ".tmp", "w") as f:  # written as soon as known: a resumed run keeps "before"
                json.dump(evals, f, indent=2)
            os.replace(eval_path + ".tmp", eval_path)
        parallel.barrier()

    if not resume_dir:
        evaluate("before")
    task = CLTask(model, processor, data, chunk=args.grad_cache_chunk, temperature=args.temperature)
    trainer = Trainer(task, train_config(args, out, "cl"), ctx)
    if resume_dir:
        trainer.resume(resume_dir)
    history = trainer.fit()
    evaluate("after", sharded=parallel.is_fsdp(trainer.module))
    if ctx.is_main:
        plot_metrics(os.path.join(out, METRICS), os.path.join(out, "loss_curve.png"), task.part_names)
        print(f"moca cl: {trainer.step} steps from {args.model}; {data.num_bad} bad records skipped (see the log)")
        if evals:
            print(f"{'task':8s} " + " ".join(f"{w:>8s}" for w in evals))
            for t in cl_synthetic.TASKS:
                print(f"{t:8s} " + " ".join(f"{e['tasks'][t]:8.3f}" for e in evals.values()))
            print(f"{'mean':8s} " + " ".join(f"{e['mean_precision@1']:8.3f}" for e in evals.values()))
            print(f"wrote {eval_path}")
        print(f"wrote {os.path.join(out, 'final')}/ (HF embedding checkpoint + tokenizer + trainer state)")
    return history


STAGES = {"cpt": (add_cpt_args, run_cpt), "cl": (add_cl_args, run_cl)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (add_args, _) in STAGES.items():
        sp = sub.add_parser(name, help={"cpt": "continual pre-training (MLM + MAE), MOCA.md §2",
                                         "cl": "contrastive fine-tuning (InfoNCE), MOCA.md §3"}[name])
        add_common_args(sp, name)
        add_args(sp)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_attn_backend(args.attn_backend, args.device)
    try:
        return STAGES[args.stage][1](args)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    from engine.data import DataError
    from moca.embed import run_cli

    # bad flags, data or folders (and a diverged run): one line, no traceback
    run_cli(main, "moca", errors=(RunDirError, DivergedError, UsageError, DataError))
