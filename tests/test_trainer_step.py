"""The shared training loop's schedule and clipping on a one-weight toy task, against hand-computed values:
HF Trainer's linear schedule with ceil(warmup_ratio * max_steps) warm-up steps, and clip_grad_norm_ to
grad_clip (MOCA.md §2-3: warm-up 10% / 5%, grad clip 5.0)."""

import os

import pytest
import torch

from engine.parallel import DistContext
from engine.trainer import DivergedError, Task, TrainConfig, Trainer


class _Batch:
    def __init__(self, x):
        self.x = x

    def to(self, device, non_blocking=False):
        return _Batch(self.x.to(device))

    def pin_memory(self):
        return self


class _Toy(Task):
    """loss = scale * w . x with x = (3, 4, 0): its gradient is scale * x, of norm 5 * scale."""

    part_names = ("loss",)

    def __init__(self, scale):
        self.module = torch.nn.Linear(3, 1, bias=False)
        self.scale = scale

    def micro_batches(self, step, rank, world, accum):
        return [_Batch(torch.tensor([[3.0, 4.0, 0.0]]))]

    def counts(self, mbs):
        return torch.tensor([float(len(mbs))], dtype=torch.float64)

    def loss(self, module, mb, totals, world):
        loss = self.scale * module(mb.x).sum()
        return loss, loss.detach().reshape(1)

    def stats(self, mbs):
        return {"tokens": 1.0, "flops": 0.0}


def test_linear_warmup_takes_the_ceiling_of_the_ratio(tmp_path):
    trainer = Trainer(_Toy(1.0), TrainConfig(str(tmp_path), max_steps=15, lr=1.0, warmup_ratio=0.1), DistContext())
    lrs = []
    for _ in range(15):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()  # no gradients: nothing moves; keeps torch's step order
        trainer.scheduler.step()
    warmup = 2  # ceil(0.1 * 15): lr 0 at the first update, the peak after 2 steps, then linear down to 0 at step 15
    expected = [k / warmup for k in range(warmup)] + [(15 - k) / (15 - warmup) for k in range(warmup, 15)]
    assert max(abs(a - b) for a, b in zip(lrs, expected)) < 1e-12, lrs


def test_gradients_reach_the_optimizer_clipped_to_grad_clip(tmp_path):
    task = _Toy(10.0)  # gradient (30, 40, 0), norm 50
    trainer = Trainer(task, TrainConfig(str(tmp_path), max_steps=4), DistContext())  # default grad_clip 5.0
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.append(task.module.weight.grad.clone()))
    out = trainer.train_step(task.micro_batches(0, 0, 1, 1))
    assert abs(out["grad_norm"] - 50.0) < 1e-4  # the norm before clipping is what is logged
    torch.testing.assert_close(seen[0], torch.tensor([[3.0, 4.0, 0.0]]), rtol=1e-5, atol=1e-6)  # norm 5


def test_a_finite_loss_with_an_overflowing_gradient_norm_stops_the_run(tmp_path):
    """A divergence can show in the gradient first: a finite loss whose gradient norm overflows fp32 (|g| = 4.2e38 >
    3.4e38) stops the run with DivergedError naming grad_norm, before the step is logged or saved."""
    task = _Toy(1.0)
    with torch.no_grad():
        task.module.weight.fill_(1e-30)  # loss = 1e-30 * 6e38 = 6e8: finite
    task.micro_batches = lambda step, rank, world, accum: [_Batch(torch.tensor([[3e38, 3e38, 0.0]]))]
    task.save = lambda path, model_state, extra_files: None
    trainer = Trainer(task, TrainConfig(str(tmp_path), max_steps=2, save_every=1, progress=False), DistContext())
    with pytest.raises(DivergedError, match="step 1: grad_norm = inf"):
        trainer.fit()
    assert os.listdir(tmp_path) == []


def test_resume_restores_each_ranks_rng_the_schedule_and_the_step(tmp_path, monkeypatch):
    """Trainer.save stores every rank's torch RNG state (here: a 2-rank save, rank 1's state drawn from another seed)
    and Trainer.resume gives each rank its own back, with the scheduler and the step: the draws after the resume
    are the draws each rank would have made after the save."""
    from engine import trainer as trainer_mod

    def toy_trainer():
        task = _Toy(10.0)
        task.save = lambda path, model_state, extra_files: [os.makedirs(path)] + [
            write(os.path.join(path, name)) for name, write in extra_files.items()]
        return Trainer(task, TrainConfig(str(tmp_path), max_steps=10, progress=False), DistContext())

    saver = toy_trainer()
    for step in range(3):
        saver.train_step(saver.task.micro_batches(step, 0, 1, 1))
    saver.step = 3
    torch.manual_seed(7)
    rank1 = torch.get_rng_state()
    after = {1: torch.rand(4)}
    torch.manual_seed(3)
    monkeypatch.setattr(trainer_mod.parallel, "all_gather", lambda t: torch.stack([t, rank1]))
    saver.ctx = DistContext(rank=0, world=2)
    path = saver.save("checkpoint-3")
    after[0] = torch.rand(4)
    for rank in (1, 0):
        torch.manual_seed(99)
        resumed = toy_trainer()
        resumed.ctx = DistContext(rank=rank, world=2)
        resumed.resume(path)
        assert torch.equal(torch.rand(4), after[rank]), rank
        assert resumed.step == 3 and resumed.scheduler.get_last_lr() == saver.scheduler.get_last_lr()
        assert resumed.scheduler.last_epoch == 3
