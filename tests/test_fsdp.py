"""FSDP2 on two gloo ranks (CPU): a rank whose batch has no image runs the same collectives as one whose batch
has images (the vision tower on a weight-0 dummy image), giving the single-process gradient; and a GradCache
no-sync nested inside the trainer's keeps the whole micro-batch unsynchronised."""

import datetime

import torch
import torch.distributed as dist

from engine import parallel
from engine.cl import CLModule
from engine.gradcache import grad_cache_step
from hf_oracle import random_image
from moca import Processor
from moca.config import ModelConfig, VisionConfig
from moca.model import MoCaModel
from moca.processor import IMAGE_MARKER
from spawn_ranks import free_port, run_ranks

WORLD = 2


def tiny_model() -> MoCaModel:
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, mrope_section=(4, 6, 6),
                      vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                          out_hidden_size=64, fullatt_block_indexes=(1,)))
    model = MoCaModel(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.attn_backend = "torch"
    return model


def rank_batches():
    """Rank 0: texts only; rank 1: a text and an image-bearing input."""
    proc = Processor.from_pretrained("tiny")
    return [proc([{"text": "a red circle"}, {"text": "two blue squares on grey"}]),
            proc([{"text": "a caption"}, {"text": IMAGE_MARKER + "describe", "images": [random_image(56, 84, 1)]}])]


def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
    return (embeddings * torch.linspace(-1, 1, embeddings.shape[1])).sum()



def _worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        batch = rank_batches()[rank]
        module = parallel.wrap(CLModule(tiny_model()), parallel.DistContext(rank, WORLD), "fsdp")
        loss_of(module(batch)).backward()  # FSDP averages the ranks' gradients
        grads = {n: p.grad.full_tensor() for n, p in module.named_parameters()}

        # a non-last micro-batch: GradCache's no-sync for its chunks, inside the trainer's own
        module.zero_grad(set_to_none=True)
        with parallel.no_grad_sync(module, last=False):
            grad_cache_step(module, [[batch, batch]], lambda e: loss_of(e),
                            no_sync=lambda: parallel.no_grad_sync(module, last=False))
        unsynced = all(p.grad is None for p in module.parameters())  # FSDP keeps unsynced gradients aside
        torch.save({"grads": grads, "unsynced": unsynced}, f"{out_dir}/rank{rank}.pt")
    finally:
        parallel.shutdown()  # gloo's teardown can deadlock without it


def test_fsdp_ranks_with_and_without_images_give_the_single_process_gradient(tmp_path):
    run_ranks(_worker, (free_port(), str(tmp_path)), WORLD)
    model = CLModule(tiny_model())
    sum(loss_of(model(b)) for b in rank_batches()).backward()
    expected = {n: p.grad / WORLD for n, p in model.named_parameters()}
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["unsynced"], "a nested no-sync turned the gradient reduction back on"
        assert got["grads"].keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def _cpt_batches():
    from engine import synthetic
    from engine.masking import add_mask_token, mask_batch, mask_generator, special_token_ids

    proc = Processor.from_pretrained("tiny")
    mask_id = add_mask_token(proc.tokenizer)
    special = special_token_ids(proc.tokenizer, proc.config)
    texts = proc([{"text": "a red circle on a white background, and a few more words"}])
    images = proc([synthetic.record(0, i) for i in range(2)])
    return [mask_batch(b, special, mask_id, mask_generator(0, 0, r)) for r, b in enumerate((texts, images))]


def _cpt_loss(module, mbs, mb, world):
    m, n = sum(x.num_mlm for x in mbs), sum(x.num_mae for x in mbs)
    return module(mb, mb.num_mlm / m * world, mb.num_mae / n * world, m > 0, n > 0)[0]


def _cpt_worker(rank, port, out_dir):
    from engine.cpt import CPTModule, MAEHead

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        mbs = _cpt_batches()
        model = tiny_model()
        module = parallel.wrap(CPTModule(model, MAEHead(model, torch.Generator().manual_seed(1))),
                               parallel.DistContext(rank, WORLD), "fsdp")
        _cpt_loss(module, mbs, mbs[rank], WORLD).backward()
        torch.save({n: p.grad.full_tensor() for n, p in module.named_parameters()}, f"{out_dir}/cpt{rank}.pt")
    finally:
        parallel.shutdown()  # gloo's teardown can deadlock without it


def test_fsdp_cpt_rank_without_mae_targets_gives_the_single_process_gradient(tmp_path):
    """Rank 0's micro-batch is text-only (no MAE target), rank 1's has images: the MAE head runs on both (weight 0
    on rank 0), so their collectives pair up (before: a hang in the backward's reduce-scatter)."""
    from engine.cpt import CPTModule, MAEHead

    mbs = _cpt_batches()
    assert mbs[0].num_mae == 0 < mbs[1].num_mae
    run_ranks(_cpt_worker, (free_port(), str(tmp_path)), WORLD, timeout=300)
    model = tiny_model()
    ref = CPTModule(model, MAEHead(model, torch.Generator().manual_seed(1)))
    for mb in mbs:
        _cpt_loss(ref, mbs, mb, 1).backward()
    got = torch.load(tmp_path / "cpt0.pt")
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
