"""Everything torch.distributed and everything applied to the model from outside it.

One process = one device, started by `torchrun` (or a single plain process). Data parallelism
is DDP (with `find_unused_parameters`: a micro-batch without images leaves the vision tower and
the MAE head out of the graph) or FSDP2 `fully_shard` per decoder layer / vision block / MAE
layer plus the root, for 3B/7B. Activation checkpointing and torch.compile are applied per
block by replacing the block's `forward` on the instance, so parameter names (and with them the
HF checkpoint names) stay as they are. Model code never calls `dist.*`.
"""

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger("moca")


@dataclass
class DistContext:
    """This process's place in the job (torchrun's RANK, WORLD_SIZE, LOCAL_RANK) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistContext:
    """Join the torchrun group when WORLD_SIZE is set (NCCL on GPU, gloo on CPU); else one process."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return DistContext(rank, world, local, dev)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small float64 CPU tensor over ranks (identity in one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    backend = dist.get_backend()
    t = values.to("cuda") if backend == "nccl" else values.clone()
    dist.all_reduce(t)
    return t.cpu()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group (if any) without the gloo teardown deadlock: a gloo worker thread
    frees a finished collective's work, whose thread-local state can hold Python objects, only once it gets
    the GIL, while the group's destructor joins those threads holding the GIL. Destroying the group (or
    dropping the DDP reducer that holds it last) right after a collective then hangs for good, as a CI run
    of a two-rank DDP test did (~1 run in 13 on a 2-core machine; py-spy: ~ProcessGroupGloo joining a thread
    that waits for the GIL in ~AsyncAllreduceWork). So under gloo the GIL is released for a moment first,
    letting the workers free what they hold. No collective: a rank that failed alone still exits at once."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        time.sleep(0.05)
    dist.destroy_process_group()


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """(...) CPU tensor of the same shape on every rank -> (world, ...) in rank order (no pickle,
    unlike all_gather_object)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t[None]
    x = t.to("cuda") if dist.get_backend() == "nccl" else t.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.stack(out).cpu()


def same_on_all_ranks(key: bytes) -> bool:
    """Whether every rank passed the same `key` (compared as a 64-bit BLAKE2b digest; one all_gather).
    Every rank gets the same answer, so all of them can raise together instead of some hanging."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little", signed=True)
    return bool((all_gather(torch.tensor([h], dtype=torch.int64)) == h).all())


# ------------------------------------------------------------------------- applied from outside
def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks: decoder layers, vision blocks and the MAE head's layer when present."""
    model = module.model
    out = [*model.layers, *model.visual.blocks]
    if getattr(module, "mae_head", None) is not None:
        out.append(module.mae_head.layer)
    return out


def apply_activation_checkpointing(module: nn.Module) -> None:
    for block in blocks_of(module):
        forward = block.forward

        def wrapped(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped


def apply_compile(module: nn.Module) -> None:
    """Compile each block on its own (dynamic shapes: every packed batch has its own T)."""
    for block in blocks_of(module):
        block.forward = torch.compile(block.forward, dynamic=True)


def wrap(module: nn.Module, ctx: DistContext, mode: str) -> nn.Module:
    """mode: "ddp" or "fsdp" (ignored in one process). Returns the module to call."""
    if ctx.world == 1:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module, device_ids=None, find_unused_parameters=True  # inputs are already on the device
        )
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        module.model.vision_always_in_graph = True  # ranks with and without images: the same all-gathers
        module.heads_always_in_graph = True  # ranks with and without MLM / MAE targets: the same collectives
        for block in blocks_of(module):
            fully_shard(block)
        fully_shard(module)
        return module
    raise ValueError(f"unknown parallel mode {mode!r}; expected 'ddp' or 'fsdp'")


def is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "no_sync") and hasattr(module, "module") else module


def no_grad_sync(module: nn.Module, last: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if last:
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):
        return module.no_sync()
    if is_fsdp(module):
        @contextlib.contextmanager
        def _no_sync():  # nested (GradCache's inside the trainer's): only the outermost turns sync back on
            outer = getattr(module, "_moca_no_sync", False)
            module.set_requires_gradient_sync(False)
            module._moca_no_sync = True
            try:
                yield
            finally:
                if not outer:
                    module._moca_no_sync = False
                    module.set_requires_gradient_sync(True)

        return _no_sync()
    return contextlib.nullcontext()


def full_state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Under FSDP: full (unsharded) CPU model and optimizer state dicts (a collective). Otherwise
    (None, optimizer state): the weights are saved straight from the live model."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None, optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
