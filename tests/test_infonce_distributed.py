"""Two gloo ranks on CPU, each holding half the batch: the gathered InfoNCE loss and every
gradient, and a DDP + GradCache step, equal the single-process computation on the full batch."""

import importlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from engine import parallel
from engine.gradcache import grad_cache_step
from kernels import infonce
from spawn_ranks import free_port, run_ranks

infonce_mod = importlib.import_module("kernels.infonce")
WORLD, B, D, R, IN = 2, 10, 32, 2, 12  # global batch B, B // WORLD rows per rank


def full_batch():
    """The global batch, identical in every process: embeddings and raw model inputs."""
    g = torch.Generator().manual_seed(1234)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    t = F.normalize(q + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    neg = F.normalize(torch.randn(B, R, D, generator=g), dim=-1)
    raw = [torch.randn(n, IN, generator=g) for n in (B, B, B * R)]
    return (q, t, neg), raw


def make_model():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(IN, 24), torch.nn.Tanh(), torch.nn.Linear(24, D))


def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        b = B // WORLD
        rows = slice(rank * b, (rank + 1) * b)
        out = {}

        # gather_with_grad: rank order forward, this rank's slice of the summed gradient backward.
        x = torch.full((3, 2), float(rank + 1), requires_grad=True)
        y = infonce_mod.gather_with_grad(x)
        (y * ((rank + 1) * torch.arange(6.0)[:, None])).sum().backward()
        out["gathered"], out["gather_grad"] = y.detach(), x.grad

        # gathered_infonce on this rank's half of the embeddings.
        (q, t, neg), raw = full_batch()
        local = [z[rows].clone().requires_grad_() for z in (q, t, neg)]
        loss = infonce_mod.gathered_infonce(*local, backend="torch")
        loss.backward()
        out["loss"], out["grads"] = loss.detach(), [z.grad for z in local]

        # DDP + GradCache with chunks of 2 rows; DDP averages, hence WORLD * loss.
        ddp = DDP(make_model())
        xq, xt, xn = raw[0][rows], raw[1][rows], raw[2][rank * b * R : (rank + 1) * b * R]
        streams = [list(z.split(2)) for z in (xq, xt, xn)]

        def encode(chunk):
            return F.normalize(ddp(chunk), dim=-1)

        def loss_fn(eq, et, en):
            return WORLD * infonce_mod.gathered_infonce(eq, et, en.view(-1, R, D), backend="torch")

        out["gc_loss"] = grad_cache_step(encode, streams, loss_fn, no_sync=ddp.no_sync) / WORLD
        out["gc_grads"] = [p.grad.clone() for p in ddp.module.parameters()]
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        parallel.shutdown()  # gloo's teardown can deadlock without it



def test_two_gloo_ranks_equal_single_process(tmp_path):
    run_ranks(_worker, (free_port(), str(tmp_path)), WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    (q, t, neg), raw = full_batch()
    full = [z.clone().requires_grad_() for z in (q, t, neg)]
    loss = infonce(*full, backend="torch")
    loss.backward()

    model = make_model()
    emb = [F.normalize(model(x), dim=-1) for x in raw]
    model_loss = infonce(emb[0], emb[1], emb[2].view(B, R, D), backend="torch")
    model_loss.backward()

    b = B // WORLD
    gathered = torch.tensor([1.0, 2.0]).repeat_interleave(3)[:, None].expand(6, 2)
    summed_weights = (1 + 2) * torch.arange(6.0)[:, None].expand(6, 2)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["gathered"], gathered)
        torch.testing.assert_close(res["gather_grad"], summed_weights[rank * 3 : rank * 3 + 3])
        torch.testing.assert_close(res["loss"], loss.detach())
        for got, z in zip(res["grads"], full):
            torch.testing.assert_close(got, z.grad[rank * b : (rank + 1) * b])
        torch.testing.assert_close(res["gc_loss"], model_loss.detach())
        for got, p in zip(res["gc_grads"], model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


def test_gather_is_identity_without_process_group():
    assert not dist.is_initialized()
    x = torch.randn(4, 3)
    assert infonce_mod.gather_with_grad(x) is x
