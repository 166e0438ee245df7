"""Evaluation under torch.distributed: 2 gloo processes on 127.0.0.1 score exactly as one process."""

import json

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from engine import parallel
from engine.evaluate import Embedder, evaluate_mmeb, evaluate_vidore, gather_rows
from test_evaluate import write_mmeb, write_vidore
from spawn_ranks import free_port, run_ranks



def _worker(rank, world, port, paths, embedder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # gather_rows on a ragged split: 7 rows over 2 ranks
        local = torch.arange(7.0)[rank::world, None].repeat(1, 3)
        assert torch.equal(gather_rows(local, 7), torch.arange(7.0)[:, None].repeat(1, 3))
        mmeb = evaluate_mmeb(embedder, paths["mmeb"], paths["images"], paths["out"])
        vidore = evaluate_vidore(embedder, paths["vidore"], paths["out_vidore"])
        # again: every rank sees rank 0's cache, so the ranks vote to read it (an all-reduce) and embed nothing
        embedder.load = lambda: (_ for _ in ()).throw(AssertionError("embedded again despite the cache"))
        assert evaluate_mmeb(embedder, paths["mmeb"], paths["images"], paths["out"]) == mmeb
        with open(f"{paths['out']}/rank{rank}.json", "w") as f:
            json.dump({"mmeb": mmeb, "vidore": vidore}, f)
    finally:
        parallel.shutdown()  # gloo's teardown can deadlock without it


def test_two_gloo_ranks_score_like_one_process(tmp_path):
    mmeb, images, _ = write_mmeb(tmp_path)
    vidore, _ = write_vidore(tmp_path)
    paths = {"mmeb": str(mmeb), "images": str(images), "vidore": str(vidore),
             "out": str(tmp_path / "dist"), "out_vidore": str(tmp_path / "dist_vidore")}
    single = Embedder("tiny", device="cpu", attn_backend="torch", batch_tokens=400)
    single.load()
    # fork: the ranks inherit the loaded model and tokenizer instead of each loading its own
    run_ranks(_worker, (2, free_port(), paths, single), start_method="fork")
    expected = {
        "mmeb": evaluate_mmeb(single, str(mmeb), str(images), str(tmp_path / "one")),
        "vidore": evaluate_vidore(single, str(vidore), str(tmp_path / "one_vidore")),
    }
    for rank in range(2):
        got = json.loads((tmp_path / "dist" / f"rank{rank}.json").read_text())
        assert got == json.loads(json.dumps(expected))
    # rank 0 wrote the same vectors, under the same key, as the single process
    for sub in ("ImageNet-1K", "MSCOCO_t2i"):
        (a,) = (tmp_path / "dist" / "embeddings" / "mmeb").glob(f"{sub}-*.safetensors")
        (b,) = (tmp_path / "one" / "embeddings" / "mmeb").glob(f"{sub}-*.safetensors")
        assert a.name == b.name
        assert (load_file(a)["embeddings"] - load_file(b)["embeddings"]).abs().max().item() <= 1e-6
