"""The CL step on a small model (torch attention): one packed forward gives the per-sample
embeddings and the plain matmul + cross-entropy loss (float64 oracle); GradCache gives the same
update; two gloo ranks give the loss and update of one process holding the whole global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import parallel
from engine.cl import TEMPERATURE, CLModule, cl_backward, pack_micro_batch
from engine.cl_data import CLData
from moca.config import ModelConfig, VisionConfig
from moca.model import MoCaModel
from moca.processor import Processor
from spawn_ranks import free_port, run_ranks

GLOBAL, R, LR = 4, 2, 0.5


def small_config() -> ModelConfig:
    return ModelConfig(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
        mrope_section=(2, 3, 3),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=48,
                            fullatt_block_indexes=(1,)),
    )


def make_model() -> MoCaModel:
    torch.manual_seed(5)
    model = MoCaModel(small_config())
    model.init_weights(torch.Generator().manual_seed(5), std=0.1)
    with torch.no_grad():  # norms and biases off their trivial init, so they are tested too
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    model.attn_backend = "torch"
    return model.train()


def make_processor() -> Processor:
    p = Processor.from_pretrained("tiny")
    p.config = small_config()
    return p


def make_data(processor) -> CLData:
    # global batches from the synthetic subsets: t2i (image targets), i2t, vqa, cls
    return CLData(["synthetic:12"], processor, global_batch=GLOBAL, negative_ratio=R, seed=1)


def oracle_loss(model, processor, rb, temperature=TEMPERATURE) -> torch.Tensor:
    """Every sample embedded alone; logits by a plain float64 matmul; cross-entropy."""
    def emb(samples):
        return torch.cat([model.embed(processor.pack([s])) for s in samples]).double()

    q, t = emb(rb.queries), emb(rb.positives)
    logits = q @ t.T
    if rb.num_negatives:
        n = emb([s for negs in rb.negatives for s in negs]).view(len(rb.queries), rb.num_negatives, -1)
        logits = torch.cat([logits, torch.einsum("bd,brd->br", q, n)], 1)
    return F.cross_entropy(logits / temperature, torch.arange(len(rb.queries)))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def setup():
    processor = make_processor()
    return processor, make_data(processor)


def test_one_packed_forward_matches_oracle(setup):
    processor, data = setup
    kinds = {}  # one global batch with image targets (t2i), one with text targets
    for k in range(8):
        kinds.setdefault(data.rank_batch(k).subset.endswith("t2i"), k)
    for k in kinds.values():
        rb = data.rank_batch(k)
        subset = rb.subset
        mb = pack_micro_batch(rb, processor)
        assert len(mb.batches) == 1 and mb.batches[0].num_samples == GLOBAL * (2 + R)
        model, ref = make_model(), make_model()
        loss = cl_backward(CLModule(model), mb)
        ref_loss = oracle_loss(ref, processor, rb)
        ref_loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
        g, r = grads(model), grads(ref)
        assert g.keys() == r.keys()
        for name in r:
            scale = r[name].abs().max().item()
            torch.testing.assert_close(g[name], r[name], rtol=0, atol=1e-4 * scale + 1e-9, msg=f"{subset}: {name}")
        if rb.subset.endswith("t2i"):
            assert g["visual.patch_embed.weight"].abs().max() > 0  # image targets reach the vision tower


def test_gradcache_same_update(setup):
    processor, data = setup
    rb = data.rank_batch(1)
    plain, cached = make_model(), make_model()
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    opt_p = torch.optim.SGD(plain.parameters(), lr=LR)  # SGD: the update is the gradient, not its sign
    opt_c = torch.optim.SGD(cached.parameters(), lr=LR)
    loss_p = cl_backward(CLModule(plain), pack_micro_batch(rb, processor))
    mb = pack_micro_batch(rb, processor, chunk=5)
    assert len(mb.batches) == -(-GLOBAL * (2 + R) // 5)
    loss_c = cl_backward(CLModule(cached), mb)
    torch.testing.assert_close(loss_c, loss_p, rtol=1e-6, atol=1e-6)
    gp, gc = grads(plain), grads(cached)
    for name in gp:
        torch.testing.assert_close(gc[name], gp[name], rtol=1e-4, atol=1e-4 * gp[name].abs().max().item() + 1e-9)
    opt_p.step()
    opt_c.step()
    for (name, a), b in zip(plain.named_parameters(), cached.parameters()):
        moved = (a - start[name]).abs().max().item()
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4 * moved + 1e-7, msg=name)


def test_task_defaults_to_mocas_temperature_and_averages_accumulated_batches(setup):
    """CLTask with its defaults over grad_accum = 2 micro-batches (two global batches) of one step: its parts sum
    to the mean of the two batches' InfoNCE at MOCA.md's tau = 0.03, and the gradients are that mean's (float64
    oracle, every sample embedded alone). The train CLI's default temperature is the same 0.03."""
    from engine.cl import CLTask
    from engine.train import build_parser

    processor, data = setup
    rbs = [data.rank_batch(k) for k in (0, 1)]
    model, ref = make_model(), make_model()
    task = CLTask(model, processor, data)
    mbs = [pack_micro_batch(rb, processor) for rb in rbs]
    totals = task.counts(mbs)
    parts = sum(task.backward(task.module, mb, totals, 1) for mb in mbs)
    ref_loss = sum(oracle_loss(ref, processor, rb, temperature=0.03) for rb in rbs) / 2
    ref_loss.backward()
    torch.testing.assert_close(parts.double(), ref_loss.detach().reshape(1), rtol=1e-5, atol=1e-6)
    g, r = grads(model), grads(ref)
    assert g.keys() == r.keys()
    for name in r:
        torch.testing.assert_close(g[name], r[name], rtol=0, atol=1e-4 * r[name].abs().max().item() + 1e-9, msg=name)
    assert build_parser().parse_args(["cl"]).temperature == 0.03


# ------------------------------------------------------------------------------ two gloo ranks

def _step(module, model, processor, rb, chunk, scale):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = cl_backward(module, pack_micro_batch(rb, processor, chunk), scale)
    opt.step()
    return loss, {n: p.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        processor = make_processor()
        data = make_data(processor)
        ctx = parallel.DistContext(rank, 2)
        out = {}
        for chunk in (0, 4):
            model = make_model()
            ddp = parallel.wrap(CLModule(model), ctx, "ddp")
            out[chunk] = _step(ddp, model, processor, data.rank_batch(0, rank, 2), chunk, scale=2.0)
        # the trainer's path: CLTask.backward with the step's counts summed over the ranks
        from engine.cl import CLTask

        model = make_model()
        task = CLTask(model, processor, data)
        ddp = parallel.wrap(task.module, ctx, "ddp")
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        mb = pack_micro_batch(data.rank_batch(0, rank, 2), processor)
        part = task.backward(ddp, mb, parallel.all_reduce_sum(task.counts([mb])), 2)
        opt.step()
        dist.all_reduce(part)  # the step's loss is the sum of every rank's part
        out["task"] = (part[0], {n: p.detach().clone() for n, p in model.named_parameters()})
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        parallel.shutdown()  # gloo's teardown can deadlock without it


def test_two_ranks_equal_one_process(setup, tmp_path):
    processor, data = setup
    rb = data.rank_batch(0)
    assert rb.num_negatives == R
    model = make_model()
    ref_loss, ref_params = _step(CLModule(model), model, processor, rb, 0, scale=1.0)
    start = dict(make_model().named_parameters())
    run_ranks(_worker, (free_port(), str(tmp_path)))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for chunk, (loss, params) in out.items():
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            for name, p in ref_params.items():
                moved = (p - start[name]).abs().max().item()
                torch.testing.assert_close(params[name], p, rtol=0, atol=1e-4 * moved + 1e-7,
                                           msg=f"rank {rank} chunk {chunk} {name}")
    assert any((p - start[n]).abs().max() > 1e-4 for n, p in ref_params.items())
