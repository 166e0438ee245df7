"""Backend choice shared by every op: Triton on CUDA or under TRITON_INTERPRET=1, torch otherwise.

`backend=None` means "the fastest path that runs here"; "triton" and "torch" force one.
The choice is made on the host from tensor metadata only, so it never syncs the device.
"""

import os

import torch

BACKENDS = ("triton", "torch")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str | None, x: torch.Tensor) -> str:
    if backend is None:
        return "triton" if (x.is_cuda or interpreter_enabled()) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend == "triton" and not (x.is_cuda or interpreter_enabled()):
        raise RuntimeError("backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 (the CPU interpreter)")
    return backend
