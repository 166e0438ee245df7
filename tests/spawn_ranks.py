"""Multi-process tests: a free loopback port, and ranks that cannot hang the suite.

`run_ranks` starts `nprocs` processes of fn(rank, *args) and waits at most `timeout` seconds: a rank
that fails fails the test (torch's ProcessRaisedException, with the rank's traceback); ranks still
running then (a collective one rank never reached) first write their threads' stacks to stderr, then are
killed and the test fails, instead of CI waiting for its own time limit."""

import faulthandler
import random
import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768-60999): a rank connecting to the store
    before it listens can then never be given that same port as its own source port and connect to
    itself (a TCP self-connect, which hangs the rendezvous)."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def _watched(rank: int, fn, dump_after: float, *args) -> None:
    """fn(rank, *args), with every thread's Python stack written to stderr if the process is still alive
    after `dump_after` seconds (in fn or in its exit): where a hung rank waits shows in the failed test's output."""
    faulthandler.dump_traceback_later(dump_after, exit=False)
    fn(rank, *args)


def run_ranks(fn, args: tuple, nprocs: int = 2, start_method: str = "spawn", timeout: float = 600.0) -> None:
    ctx = mp.start_processes(_watched, args=(fn, max(timeout - 20.0, 1.0), *args), nprocs=nprocs, join=False,
                             start_method=start_method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5.0):
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks {alive} of {nprocs} still running after {timeout:.0f} s (a hung collective?)")
