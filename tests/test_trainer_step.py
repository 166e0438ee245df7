"""The shared training loop's schedule and clipping on a one-weight toy task, against hand-computed values:
HF Trainer's linear schedule with ceil(warmup_ratio * max_steps) warm-up steps, and clip_grad_norm_ to
grad_clip (MOCA.md §2-3: warm-up 10% / 5%, grad clip 5.0)."""

import torch

from engine.parallel import DistContext
from engine.trainer import Task, TrainConfig, Trainer


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
