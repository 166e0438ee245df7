"""Backend choice shared by every op: Triton on CUDA or under TRITON_INTERPRET=1, torch otherwise.

`backend=None` means "the fastest path that runs here"; "triton" and "torch" force one.
The choice is made on the host from tensor metadata only, so it never syncs the device.
"""

import functools
import os

import torch

BACKENDS = ("triton", "torch")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def switch(name: str, shipped: bool) -> bool:
    """A kernel variant's on/off knob: the environment variable `name` = 1 / 0 forces it (benchmarks,
    tuning, interpreter tests), unset the shipped choice holds. The knobs: MOCA_TMA (Hopper TMA
    descriptors for the streamed tiles of attention and of the loss GEMMs; launchers still fall back to
    pointer loads where a tensor's layout cannot have a descriptor), MOCA_FUSED_DQ (attention's dq
    accumulated atomically by the dk/dv kernel, kernels/attention.py) and MOCA_WS (attention's
    warp-specialized forward and dq, where the architecture and the Triton version have them)."""
    env = os.environ.get(name)
    return shipped if env is None else env == "1"


def tma_aligned(x: torch.Tensor) -> bool:
    """A 2-D TMA descriptor over x's (rows, row stride) layout is legal: last dim contiguous, base and
    rows 16-byte aligned, rows not overlapping."""
    return (x.stride(-1) == 1 and x.stride(0) >= x.shape[-1] and x.stride(0) * x.element_size() % 16 == 0
            and x.data_ptr() % 16 == 0)


def resolve(backend: str | None, x: torch.Tensor) -> str:
    """The backend ("triton" or "torch") of an op on x: None picks Triton on CUDA or under the interpreter.
    ValueError for an unknown name; RuntimeError for "triton" where it cannot run (CPU without TRITON_INTERPRET=1)."""
    if backend is None:
        return "triton" if (x.is_cuda or interpreter_enabled()) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend == "triton" and not (x.is_cuda or interpreter_enabled()):
        raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (the CPU interpreter)")
    return backend


def no_double_backward(op: str):
    """Decorator of a loss Function's backward: create_graph=True (grad mode on inside the backward) is a
    RuntimeError naming `op`. Its gradients come from kernels and carry no graph, so second derivatives (a
    gradient penalty) would silently be missing or wrong; torch's once_differentiable does not catch that at
    a loss, the root of the graph, whose upstream gradient never requires grad."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{op} has no double backward (create_graph=True): its gradients are computed "
                                   "by kernels and carry no graph")
            return fn(ctx, *grads)

        return run

    return wrap


def autocast_off(fn):
    """A torch.autograd.Function's forward or backward run with autocast off on its first tensor's device.
    The losses set their own precision (16-bit operands into fp32 accumulators, fp32 reference paths);
    under the trainer's bf16 autocast, which reaches into a Function's forward and, called in its block,
    its backward too, their fp32 matmuls and accumulations would otherwise run in bf16."""

    @functools.wraps(fn)
    def run(ctx, x, *rest):
        with torch.autocast(x.device.type, enabled=False):
            return fn(ctx, x, *rest)

    return run
