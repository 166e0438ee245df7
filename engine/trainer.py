"""The training loop shared by the stages: optimiser, schedule, accumulation, logging, checkpoints.

A stage is a `Task` (engine.cpt.CPTTask, engine.cl.CLTask): it owns the module, turns a step into this
rank's host micro-batches, and computes one micro-batch's loss (or, as CL's GradCache, runs its own
backward). The trainer owns everything else.

Design decisions:
* Exact resume. A step's data and masks are pure functions of (seed, step, rank), so the data
  position is the step; a checkpoint holds weights (fp32, HF layout, the MAE head in its own
  file so transformers still loads the directory), optimizer, scheduler and per-rank torch RNG
  states. Resuming from checkpoint-k and running to the end gives the losses of the
  uninterrupted run.
* No pickle: the trainer state is tensors in `trainer_state.safetensors` plus everything else in
  `trainer_state.json`, whose nested dicts/lists/tuples point at the tensors by name. That JSON is
  written last and lists every file of the checkpoint with its size: a folder counts as a
  checkpoint only when all of them are there, so a half-written or half-deleted one never does.
* One run per folder. The main rank holds an exclusive lock on `OUTPUT/.lock` (flock: the kernel drops it
  when the process ends, however it ends), so a second run on a folder in use is refused before it
  reads or deletes anything. A fresh run refuses a folder that holds a run (unless `overwrite`, which
  deletes it once the new run's model and data have loaded); a resumed one first removes what a killed
  run left (`.tmp-*`, `.trash-*`, `*.old`; never a checkpoint, even one that fails its checks: newer than
  the newest good one, it is an error), refuses settings that differ from the run's (RESUME_KEYS and the
  stage's `settings`; other data specs only warn, since folders move) and cuts metrics.jsonl back to the
  step it resumes from. Pruning renames a checkpoint to `.trash-*` before deleting it and never touches
  the one just saved.
* A non-finite loss or gradient norm stops the run (DivergedError) before the step is logged or saved.
* Host work ahead of the device: the next steps' micro-batches (decode, pack, mask) are prepared by
  `loader_workers` forked processes (a torch DataLoader over step numbers: a step's data is a pure
  function of it, so workers need no shared state and a resume starts the loader at its step; the
  records a worker finds broken come back with the batches for the run's report). A thread would share
  the GIL with the training loop, and one core prepares ~20k tokens/s of image-heavy data (measured on
  a CPU), about what an H100 trains a 3B model at. The loss normalisers are host ints summed over ranks
  with one tiny all-reduce per step, and the logged values with one more.
"""

import fcntl
import json
import logging
import math
import os
import re
import secrets
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from engine import parallel
from engine.data import DataError
from engine.parallel import DistContext

log = logging.getLogger("moca")
STATE_TENSORS, STATE_JSON, METRICS = "trainer_state.safetensors", "trainer_state.json", "metrics.jsonl"
REPORTS = ("loss_curve.png", "eval.json")  # written by the stages from a run's metrics and weights
LEGACY_STATE = "trainer_state.pt"  # a pickle written by earlier versions: recognised, never loaded
STATE_FORMAT = 2
_CHECKPOINT = re.compile(r"checkpoint-\d+|final")
LOCK = ".lock"
_held_locks: dict[str, int] = {}  # realpath of an output dir -> the open fd whose flock this process holds
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "4090": 165.0}


PRECISIONS = ("auto", "bf16", "fp32")
# TrainConfig fields that define a run's trajectory: a resume must keep them (the data and masks of a step
# are functions of seed, step and accumulation; the optimizer and schedule of the others)
RESUME_KEYS = ("max_steps", "lr", "warmup_ratio", "weight_decay", "grad_clip", "grad_accum", "seed", "precision")


@dataclass
class TrainConfig:
    """What the Trainer runs: steps are optimizer steps (each `grad_accum` micro-batches per rank); lr, warm-up
    share, weight decay and the global-norm clip as HF Trainer's flags (defaults: CPT's release values,
    MOCA.md §2)."""

    output_dir: str
    max_steps: int
    lr: float = 2e-6
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    grad_accum: int = 4
    save_every: int = 0  # 0: only final/
    keep_last: int = 2
    seed: int = 0
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16": autocast on any device; "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    parallel: str = "ddp"
    log_every: int = 10
    progress: bool = True
    # processes preparing the next steps' micro-batches; 0: in this process, between steps; None: 2 on CUDA, else 0
    loader_workers: int | None = None
    # the stage's settings that decide each step's batches and loss (batch size, temperature, masking
    # probabilities, max_len, ...): like RESUME_KEYS, a resume refuses other values
    settings: dict = field(default_factory=dict)
    data: list = field(default_factory=list)  # the data specs: a resume on other ones warns (folders move)


class _Steps(Dataset):
    """Step -> (this rank's micro-batches, the task's loader_state, None), or (None, None, the DataError) when the
    data fails: the main process raises it as it is."""

    def __init__(self, task: "Task", rank: int, world: int, accum: int):
        self.task, self.rank, self.world, self.accum = task, rank, world, accum

    def __getitem__(self, step: int):
        try:
            return self.task.micro_batches(step, self.rank, self.world, self.accum), self.task.loader_state(), None
        except DataError as e:
            return None, None, e


class Task:
    """What a stage provides. `module` is the unwrapped nn.Module that is trained."""

    module: nn.Module
    part_names: tuple[str, ...] = ()

    def micro_batches(self, step: int, rank: int, world: int, accum: int) -> list:
        raise NotImplementedError

    def counts(self, mbs: list) -> torch.Tensor:
        """(K,) float64 host counts summed over ranks before the step (the loss normalisers)."""
        raise NotImplementedError

    def loss(self, module: nn.Module, mb, totals: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss to backpropagate, (len(part_names),) detached parts whose sum over the step's
        micro-batches and ranks is the step's value of each part)."""
        raise NotImplementedError

    def backward(self, module: nn.Module, mb, totals: torch.Tensor, world: int) -> torch.Tensor:
        """Forward and backward of one micro-batch -> its parts (see `loss`). A stage that runs its
        own passes (CL's GradCache) overrides this instead of `loss`."""
        loss, parts = self.loss(module, mb, totals, world)
        loss.backward()
        return parts

    def stats(self, mbs: list) -> dict[str, float]:
        """Host numbers of this rank's micro-batches, summed over ranks: at least `tokens` and `flops`."""
        raise NotImplementedError

    def save(self, path: str, model_state: dict | None, extra_files: dict) -> None:
        raise NotImplementedError

    def loader_state(self):
        """What a data-loader worker process learned that the main process must know (CPT, CL: the records that
        failed when encoded, for the run's report); None when nothing."""
        return None

    def merge_loader_state(self, state) -> None:
        pass


def freeze(model: nn.Module, prefixes: list[str] | tuple[str, ...]) -> int:
    """Stop training every parameter whose name starts with one of `prefixes` -> how many tensors.

    A prefix that names no parameter is an error (a typo must not train the whole model).
    """
    named = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(n.startswith(prefix) for n in named):
            roots = sorted({n.split(".")[0] for n in named})
            raise UsageError(f"--freeze {prefix!r} matches no parameter (top-level modules: {', '.join(roots)})")
    hit = [p for n, p in named.items() if n.startswith(tuple(prefixes))]
    for p in hit:
        p.requires_grad_(False)
    return len(hit)


def full_model_from_state(config, state: dict) -> nn.Module:
    """A full CPU MoCaModel from a gathered (FSDP) state dict whose model keys start with "model."."""
    from moca.model import MoCaModel

    with torch.device("meta"):
        model = MoCaModel(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    return model


class RunDirError(RuntimeError):
    """The output folder does not fit the request (a fresh run into a folder holding a run, a
    resume from a checkpoint that cannot be loaded)."""


class LegacyCheckpointError(RunDirError):
    """A checkpoint whose trainer state is the pickle of earlier versions: never loaded, never deleted."""


class UsageError(ValueError):
    """A flag that does not fit the model or the data (e.g. a --freeze prefix naming no parameter)."""


def check_attn_backend(attn_backend: str, device: str | None) -> None:
    """UsageError for --attn-backend triton where Triton cannot run: a CPU `device` (None: cuda when available)
    without Triton's interpreter."""
    from kernels._backend import interpreter_enabled

    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if attn_backend == "triton" and not cuda and not interpreter_enabled():
        raise UsageError("--attn-backend triton: the Triton kernels need a CUDA device; use a GPU, or set "
                         "TRITON_INTERPRET=1 to run them in Triton's CPU interpreter (slow)")


class DivergedError(RuntimeError):
    """A step's loss or gradient norm is not finite: the run stops before anything of it is saved."""


# ------------------------------------------------------------------ state as safetensors + JSON
def encode_state(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """Nested dicts / lists / tuples of tensors and scalars -> a JSON-able skeleton; each tensor
    goes into `tensors` under its path and the skeleton holds {"tensor": path} in its place."""
    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise ValueError(f"two tensors of the trainer state share the name {prefix!r}")
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"tensor": prefix}
    sub = lambda k: f"{prefix}/{k}" if prefix else str(k)  # noqa: E731
    if isinstance(obj, dict):  # keys kept with their type (the optimizer's param ids are ints)
        return {"dict": [[k, encode_state(v, sub(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [encode_state(v, sub(i), tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{prefix}: a {type(obj).__name__} cannot be stored in a checkpoint (tensors and scalars only)")


def decode_state(skel, tensors: dict[str, torch.Tensor]):
    """Inverse of `encode_state`."""
    if not isinstance(skel, dict):
        return skel
    (kind, v), = skel.items()
    if kind == "tensor":
        return tensors[v]
    if kind == "dict":
        return {k: decode_state(x, tensors) for k, x in v}
    items = [decode_state(x, tensors) for x in v]
    return tuple(items) if kind == "tuple" else items


def checkpoint_info(path: str) -> dict:
    """The trainer_state.json of a complete checkpoint; RunDirError says what is wrong otherwise."""
    state = os.path.join(path, STATE_JSON)
    if os.path.exists(os.path.join(path, LEGACY_STATE)) and not os.path.exists(os.path.join(path, STATE_TENSORS)):
        raise LegacyCheckpointError(f"{path} holds a {LEGACY_STATE} (a pickle, written by an older version): "
                                    "it is never loaded")
    try:
        with open(state) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path}: incomplete checkpoint ({STATE_JSON}: {e})") from e
    if info.get("format") != STATE_FORMAT:
        raise RunDirError(f"{path}: {STATE_JSON} format {info.get('format')}, expected {STATE_FORMAT}")
    files = info.get("files")
    if not isinstance(files, dict):
        raise RunDirError(f"{path}: {STATE_JSON} lists no files")
    for name, size in files.items():
        f = os.path.join(path, name)
        if not os.path.isfile(f) or os.path.getsize(f) != size:
            raise RunDirError(f"{path}: incomplete checkpoint ({name} missing or not {size} bytes)")
    return info


def _checkpoints(output_dir: str) -> tuple[list[tuple[int, str]], dict[str, RunDirError]]:
    """-> ([(step, path)] of the complete checkpoints sorted by step, {path: why} of the others)."""
    good, bad = [], {}
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    for name in names:
        path = os.path.join(output_dir, name)
        if _CHECKPOINT.fullmatch(name) and os.path.isdir(path):
            try:
                good.append((checkpoint_info(path)["step"], path))
            except RunDirError as e:
                bad[path] = e
    return sorted(good), bad


def find_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint in output_dir with the highest step (final/ included), or None.

    A checkpoint that fails its checks (changed files, another format, a legacy pickle) is never deleted:
    older than the newest complete one it is skipped with a warning; newer, it is an error, since resuming
    from an older one would silently lose its steps."""
    good, bad = _checkpoints(output_dir)
    newest = good[-1] if good else None
    for path, why in sorted(bad.items()):
        if isinstance(why, LegacyCheckpointError):
            raise LegacyCheckpointError(f"--resume: {why}; move it away (or start afresh with --overwrite)")
        name = os.path.basename(path)
        step = math.inf if name == "final" else int(name.split("-")[1])
        if newest is None or step > newest[0]:
            since = f"than {newest[1]}" if newest else "than any complete checkpoint"
            raise RunDirError(f"--resume: {why}; it is newer {since}: move it away to resume from there "
                              "(nothing was deleted)")
        log.warning("--resume: skipping %s (older than %s)", why, newest[1])
    return newest[1] if newest else None


def _remove(path: str) -> None:
    """Rename to a .trash-* name, then delete: a kill halfway leaves a name nothing reads."""
    # pid and a random token: a leftover of a killed run with the same pid (a container's pid 1) is no clash
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    _delete(trash)


def _delete(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _leftovers(output_dir: str) -> list[str]:
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if n.startswith((".tmp-", ".trash-")) or n.endswith(".old"))


def run_artifacts(output_dir: str) -> list[str]:
    """Names in output_dir that a training run writes and reads back: checkpoints, metrics, leftovers."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if _CHECKPOINT.fullmatch(n) or n == METRICS) + _leftovers(output_dir)


def overwrite_run_dir(output_dir: str, ctx: DistContext) -> None:
    """--overwrite: delete the run output_dir holds (its artifacts and the reports made from them), called
    once the new run's model and data have loaded, so that a typo in a flag deletes nothing."""
    if ctx.is_main:
        names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
        gone = run_artifacts(output_dir) + sorted(n for n in names if n in REPORTS)
        for name in gone:
            _remove(os.path.join(output_dir, name))
        if gone:
            log.warning("--overwrite: deleted the previous run in %s (%s)", output_dir, ", ".join(gone))
    parallel.barrier()


def clean_run_dir(output_dir: str) -> None:
    """Remove what a killed run left: temp and trash folders, `X.old` (put back as X when X is gone: a save
    was killed between its two renames). Checkpoints are never touched: ours appear by one rename of a
    finished folder, so one that fails its checks was changed by someone else (`find_checkpoint` says so)."""
    for name in _leftovers(output_dir):
        path = os.path.join(output_dir, name)
        live = path[: -len(".old")] if name.endswith(".old") else None
        if live and not os.path.exists(live):
            os.rename(path, live)
        else:
            _delete(path)
        log.info("removed leftover %s", path)


def lock_run_dir(output_dir: str) -> None:
    """Take (or keep) this process's exclusive lock on output_dir, creating the folder.

    Raises RunDirError naming the holder's pid when another process holds it, or when output_dir is a file.
    The lock lives as long as the process; taking it again in the same process is a no-op."""
    key = os.path.realpath(output_dir)
    if key in _held_locks:
        return
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunDirError(f"--output-dir {output_dir} is a file, not a folder")
    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(os.path.join(output_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunDirError(f"{output_dir} is in use by another run (pid {holder}, its {LOCK}): "
                          "wait for it to end or choose another --output-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[key] = fd


def prepare_run_dir(output_dir: str, resume: bool, overwrite: bool, ctx: DistContext) -> str | None:
    """-> the checkpoint to resume from, or None for a fresh start.

    The main rank first locks the folder (`lock_run_dir`). A fresh run refuses a folder that holds a run
    unless `overwrite` (the caller deletes that run with `overwrite_run_dir` once its model and data have
    loaded); a resumed one cleans the leftovers of a killed run first."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    refused = None
    if ctx.is_main:
        try:
            lock_run_dir(output_dir)
        except RunDirError as e:
            refused = e
    # every rank learns of the refusal (the others would wait at the barrier below for ever)
    if parallel.all_reduce_sum(torch.tensor([float(refused is not None)], dtype=torch.float64)).item():
        raise refused or RunDirError(f"{output_dir} is in use by another run (the main rank's log names it)")
    held = run_artifacts(output_dir)
    if held and not (resume or overwrite):
        raise RunDirError(f"{output_dir} already holds a run ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}): "
                          "pass --resume to continue it or --overwrite to delete it and start afresh")
    if ctx.is_main and resume:
        clean_run_dir(output_dir)
    parallel.barrier()
    return find_checkpoint(output_dir) if resume else None


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's torch generators (the only global RNGs the loop draws from: data and masks use
    their own seeded generators)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (devices, bytes)
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    # clones: torch.set_rng_state reads a view's storage from its start (a row > 0 segfaults, torch 2.13)
    torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and torch.cuda.is_available():  # the devices this process sees (maybe fewer than the saver)
        for device, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.clone(), device)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


class Trainer:
    """Runs `task` for cfg.max_steps optimizer steps: AdamW, HF's linear warm-up/decay schedule, bf16 autocast
    per cfg.precision, grad clip, checkpoints (module docstring). ValueError for an unknown cfg.precision."""

    def __init__(self, task: Task, cfg: TrainConfig, ctx: DistContext):
        self.task, self.cfg, self.ctx = task, cfg, ctx
        module = task.module
        if cfg.activation_checkpointing:
            parallel.apply_activation_checkpointing(module)
        if cfg.compile:
            parallel.apply_compile(module)
        self.module = parallel.wrap(module, ctx, cfg.parallel)
        decay, no_decay = [], []
        for name, p in task.module.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = all(p.device.type in ("cuda", "cpu") for p in decay + no_decay) and not parallel.is_fsdp(self.module)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)
        warmup = max(1, math.ceil(cfg.warmup_ratio * cfg.max_steps)) if cfg.warmup_ratio > 0 else 0
        # the reference's flags' schedule (HF Trainer's linear one): lr 0 at the first update, peak after `warmup`
        # steps; its DeepSpeed config in fact ran WarmupDecayLR's log warm-up (docs/MOCA.md §2)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, cfg.max_steps)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        if cfg.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
        # bf16 autocast on CPU is the GPU's dtype regime under the interpreter (the dtype-flow tests).
        self.autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
        self.pin_memory = ctx.device.type == "cuda"
        self.peak_flops = _peak_flops(ctx.device)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, path: str) -> None:
        """Optimizer, scheduler, RNG and position from `path` (the weights were loaded by the task)."""
        info = checkpoint_info(path)
        saved = info.get("config", {})
        changed = [f"{k} {saved[k]!r} -> {getattr(self.cfg, k)!r}" for k in RESUME_KEYS
                   if k in saved and saved[k] != getattr(self.cfg, k)]
        now = json.loads(json.dumps(self.cfg.settings))  # as the checkpoint holds them (tuples as lists)
        changed += [f"{k} {v!r} -> {now.get(k)!r}" for k, v in saved.get("settings", {}).items() if now.get(k) != v]
        if changed:
            raise RunDirError(f"--resume: {path} belongs to a run with other settings ({'; '.join(changed)}): "
                              "resuming would not continue it; pass that run's flags (its trainer_state.json "
                              "'config'), or start a new run from its weights with --model")
        if saved.get("data", self.cfg.data) != self.cfg.data:
            log.warning("--resume: %s trained on %s, this run reads %s: the steps after the resume see other data "
                        "than the uninterrupted run's (fine if only the files moved)", path, saved["data"], self.cfg.data)
        if info["world_size"] != self.ctx.world:
            log.warning("--resume: %s was saved by %d ranks, resumed on %d: each step's data differs from the "
                        "uninterrupted run's", path, info["world_size"], self.ctx.world)
        state = decode_state(info["state"], load_file(os.path.join(path, STATE_TENSORS)))
        parallel.load_optimizer_state(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rank = self.ctx.rank if self.ctx.rank < info["world_size"] else 0
        _set_rng_state({k: v[rank] for k, v in state["rng"].items()})
        self.step, self.tokens_seen, self.elapsed = info["step"], info["tokens"], info["elapsed"]
        log.info("resumed from %s at step %d", path, self.step)

    def save(self, name: str) -> str:
        path = os.path.join(self.cfg.output_dir, name)
        model_state, optim_state = parallel.full_state_dicts(self.module, self.optimizer)
        rng = {k: parallel.all_gather(v) for k, v in _rng_state().items()}  # (world, ...) each
        if self.ctx.is_main:
            tensors: dict[str, torch.Tensor] = {}
            skel = encode_state({"optimizer": optim_state, "scheduler": self.scheduler.state_dict(), "rng": rng},
                                "", tensors)
            info = {"format": STATE_FORMAT, "step": self.step, "tokens": self.tokens_seen, "elapsed": self.elapsed,
                    "world_size": self.ctx.world, "config": asdict(self.cfg), "state": skel}

            def write_info(p: str) -> None:  # last file written: it lists the others, so it marks completion
                folder = os.path.dirname(p)
                info["files"] = {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}
                with open(p, "w") as f:
                    json.dump(info, f, indent=1)

            extra = {STATE_TENSORS: lambda p: save_file(tensors, p), STATE_JSON: write_info}
            self.task.save(path, model_state, extra)
            if name.startswith("checkpoint-"):
                self._prune(keep=path)
            log.info("saved %s", path)
        parallel.barrier()
        return path

    def _prune(self, keep: str) -> None:
        """Delete the oldest checkpoint-<step>/ beyond keep_last, never `keep` (the one just saved)."""
        found = [p for _, p in _checkpoints(self.cfg.output_dir)[0] if os.path.basename(p).startswith("checkpoint-")]
        for path in found[: max(0, len(found) - self.cfg.keep_last)]:
            if path != keep:
                _remove(path)

    def _truncate_metrics(self, step: int) -> None:
        """metrics.jsonl keeps the rows of steps <= `step` (none for a fresh start). A row cut short (a kill or a
        full disk mid-write) is dropped with a warning; the file is replaced in one rename."""
        path = os.path.join(self.cfg.output_dir, METRICS)
        if not os.path.exists(path):
            return
        kept = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line) if line.strip() else None
                except ValueError:
                    row = None
                    log.warning("%s:%d: dropping an unreadable row (cut short?): %r", path, n, line[:80])
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ the loop
    def _loader(self) -> DataLoader:
        """Steps self.step.. of this rank, prepared by `loader_workers` forked processes (pinned by the loader's
        thread on CUDA), at most 2 steps ahead of the device."""
        workers = self.cfg.loader_workers
        if workers is None:
            workers = 2 if self.ctx.device.type == "cuda" else 0
        if workers:  # the cost pass used the tokenizer's thread pool; forked workers must not inherit it
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return DataLoader(_Steps(self.task, self.ctx.rank, self.ctx.world, self.cfg.grad_accum),
                          sampler=range(self.step, self.cfg.max_steps), batch_size=None, num_workers=workers,
                          prefetch_factor=max(1, 2 // workers) if workers else None, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(self.cfg.seed))  # not the global RNG's draw

    def train_step(self, mbs: list) -> dict:
        task, ctx = self.task, self.ctx
        totals = parallel.all_reduce_sum(task.counts(mbs))
        parts = 0.0
        for a, mb in enumerate(mbs):
            mb = mb.to(ctx.device, non_blocking=True)
            autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
            with parallel.no_grad_sync(self.module, last=a == len(mbs) - 1), autocast:
                p = task.backward(self.module, mb, totals, ctx.world)
            parts = parts + p  # stays on the device: one transfer per step, below
        grad_norm = torch.nn.utils.clip_grad_norm_(self.task.module.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = task.stats(mbs)
        parts = parts.double().cpu()
        reduced = parallel.all_reduce_sum(torch.cat([parts, torch.tensor(list(stats.values()), dtype=torch.float64)]))
        out = dict(zip(task.part_names, reduced[: len(parts)].tolist()))
        out.update(zip(stats, reduced[len(parts):].tolist()))
        out["lr"], out["grad_norm"] = lr, float(grad_norm)
        return out

    def fit(self) -> list[dict]:
        cfg, ctx = self.cfg, self.ctx
        if ctx.is_main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            self._truncate_metrics(self.step)  # the rows of the steps this run is about to (re)do go
        history = []
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and ctx.is_main),
                   desc=getattr(self.task, "name", "cpt"), dynamic_ncols=True)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        steps = iter(self._loader())
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                mbs, state, error = next(steps)
                if error is not None:  # a DataError in a loader worker: one line, not the worker's traceback
                    raise error
                self.task.merge_loader_state(state)
                m = self.train_step(mbs)
                bad = {k: m[k] for k in (*self.task.part_names, "grad_norm") if not math.isfinite(m[k])}
                if bad:  # the same on every rank (all-reduced); stop before a NaN reaches a checkpoint
                    raise DivergedError(
                        f"step {self.step + 1}: {', '.join(f'{k} = {v}' for k, v in bad.items())}; stopped, "
                        f"nothing of this step saved (the last checkpoint in {cfg.output_dir}, if any, is intact: "
                        "lower --lr or check the data, then --resume or --overwrite)")
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                dt = time.perf_counter() - t0
                self.step += 1
                self.tokens_seen += int(m["tokens"])
                self.elapsed += dt
                rec = {"step": self.step, **{k: m[k] for k in self.task.part_names}, "lr": m["lr"],
                       "grad_norm": m["grad_norm"], "tokens": int(m["tokens"]), "samples": int(m.get("samples", 0)),
                       "tokens_total": self.tokens_seen, "tokens_per_s": m["tokens"] / dt, "step_s": dt}
                if self.peak_flops:
                    rec["mfu"] = m["flops"] / dt / (self.peak_flops * ctx.world)
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
                history.append(rec)
                if ctx.is_main:
                    with open(os.path.join(cfg.output_dir, METRICS), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix_str(" ".join(
                        [f"{k}={rec[k]:.3f}" for k in self.task.part_names]
                        + [f"lr={rec['lr']:.2e}", f"tok/s={rec['tokens_per_s']:.0f}"]))
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                        log.info("step %d/%d %s lr=%.3e grad_norm=%.3f tokens=%d tok/s=%.0f%s", self.step, cfg.max_steps,
                                 " ".join(f"{k}={rec[k]:.4f}" for k in self.task.part_names), rec["lr"],
                                 rec["grad_norm"], rec["tokens"], rec["tokens_per_s"],
                                 f" mfu={rec['mfu']:.3f} peak_mem={rec['peak_mem_gib']:.2f}GiB" if "mfu" in rec else "")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save(f"checkpoint-{self.step}")
        finally:
            steps = None  # shuts the loader's workers down, also when the run stops on an error
        bar.close()
        self.save("final")
        return history


def plot_metrics(metrics_path: str, png_path: str, names: tuple[str, ...], size=(9.0, 3.0)) -> None:
    """One panel per loss in `names` (their scales differ by orders of magnitude) against the optimizer step,
    stacked; `size` is one panel's (width, height) in inches at 100 dpi. Drawn with matplotlib's object API
    (no pyplot state, no display needed)."""
    from matplotlib.figure import Figure

    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    names = [n for n in names if rows and n in rows[0]]
    if not names:
        return
    fig = Figure(figsize=(size[0], size[1] * len(names)), dpi=100, layout="constrained")
    steps = [r["step"] for r in rows]
    for ax, name in zip(fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0], names):
        vals = [r[name] for r in rows]
        ax.plot(steps, vals, marker="." if len(rows) == 1 else None)
        ax.set_title(f"{name}  (first {vals[0]:.4g}, last {vals[-1]:.4g})", loc="left", fontsize="medium")
        ax.grid(alpha=0.3)
    ax.set_xlabel("optimizer step")
    fig.savefig(png_path)
