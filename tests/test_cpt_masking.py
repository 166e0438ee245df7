"""CPT masking on real tokenizer output, the MAE head's init, and the CPT loss against a float64 oracle."""

import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from engine import synthetic
from engine.cpt import CPTModule, MAEHead
from engine.masking import add_mask_token, mask_batch, mask_generator, special_token_ids
from moca import Processor
from moca.config import ModelConfig, VisionConfig
from moca.model import MoCaModel

CHAT = "<|im_start|>user\nDescribe the drawing.<|im_end|>\n<|im_start|>assistant\n{}<|im_end|><|endoftext|>"


@pytest.fixture(scope="module")
def proc():
    p = Processor.from_pretrained("tiny")
    add_mask_token(p.tokenizer)
    return p


@pytest.fixture(scope="module")
def batch(proc):
    """~60 synthetic records (text, images, chat-template specials) packed into one batch."""
    items = []
    for i in range(60):
        rec = synthetic.record(7, i)
        if i % 3 == 0:
            rec = {**rec, "text": CHAT.format(rec["text"])}
        items.append(rec)
    return proc(items)


def binomial_ok(k: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_token_is_added_once_as_a_special_token(proc):
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids("<|mask|>") == 151669
    n = len(tok)
    assert add_mask_token(tok) == 151669 and len(tok) == n
    assert 151669 in tok.all_special_ids or tok.added_tokens_decoder[151669].special
    assert tok("a <|mask|> b", add_special_tokens=False)["input_ids"].count(151669) == 1


def test_special_ids_cover_the_vision_and_chat_tokens(proc):
    ids = set(special_token_ids(proc.tokenizer, proc.config).tolist())
    assert {151643, 151644, 151645, 151652, 151653, 151655, 151669} <= ids
    # every id the tokenizer calls special, and no ordinary word
    assert set(proc.tokenizer.all_special_ids) <= ids
    assert not ids & set(proc.tokenizer("the red circle", add_special_tokens=False)["input_ids"])


def test_mlm_rate_and_exclusions(proc, batch):
    special = special_token_ids(proc.tokenizer, proc.config)
    mb = mask_batch(batch, special, 151669, mask_generator(0, 3, 1), mlm_prob=0.4, mae_prob=0.5)
    ids, new = batch.input_ids, mb.batch.input_ids
    is_special = torch.isin(ids, special)
    assert is_special.sum() > 500  # image pads, vision start/end, chat tokens really are in the batch
    chosen = torch.zeros_like(is_special)
    chosen[mb.mlm_positions] = True
    assert not (chosen & is_special).any()
    assert torch.equal(new[is_special], ids[is_special])
    assert torch.equal(new[~chosen], ids[~chosen]) and (new[chosen] == 151669).all()
    assert torch.equal(mb.mlm_targets, ids[mb.mlm_positions])
    eligible = int((~is_special).sum())
    assert eligible > 1000 and binomial_ok(mb.num_mlm, eligible, 0.4)


def test_mae_rate_noise_and_target_layout(proc, batch):
    special = special_token_ids(proc.tokenizer, proc.config)
    mb = mask_batch(batch, special, 151669, mask_generator(1, 0, 0), mlm_prob=0.4, mae_prob=0.5)
    n_img = batch.image_token_index.numel()
    assert n_img > 500 and binomial_ok(mb.num_mae, n_img, 0.5)
    groups = torch.searchsorted(batch.image_token_index, mb.mae_positions)  # merge group of each masked token
    assert torch.equal(batch.image_token_index[groups], mb.mae_positions)
    assert (batch.input_ids[mb.mae_positions] == 151655).all()
    old, new = batch.patches, mb.batch.patches
    masked_rows = torch.zeros(old.shape[0], dtype=torch.bool)
    for g in groups.tolist():
        masked_rows[4 * g : 4 * g + 4] = True
    assert torch.equal(new[~masked_rows], old[~masked_rows])
    noise = new[masked_rows]
    assert (noise == noise[0]).all()  # one Gaussian draw for every masked patch of the batch
    assert abs(float(noise[0].mean())) < 5 / math.sqrt(1176) and abs(float(noise[0].std()) - 1) < 0.15
    # target[n, d*4 + p] = value d of raw patch p of the n-th masked merge group (MOCA.md §2)
    for n in torch.randint(0, mb.num_mae, (5,)).tolist():
        g = int(groups[n])
        for d, p in [(0, 0), (1175, 3), (17, 2), (600, 1)]:
            assert mb.mae_targets[n, d * 4 + p] == old[4 * g + p, d]


class _Masked(torch.utils.data.Dataset):
    """Packs and masks in place in a DataLoader worker, as CPTTask's loader does."""

    def __init__(self, proc, items):
        self.proc, self.items = proc, items

    def __len__(self):
        return 1

    def __getitem__(self, i):
        special = special_token_ids(self.proc.tokenizer, self.proc.config)
        mb = mask_batch(self.proc(self.items), special, 151669, mask_generator(3, 2, 1), inplace=True)
        return mb.batch.patches.is_shared(), mb.mae_targets.is_shared(), mb


def test_inplace_masking_equals_the_copy_and_stays_in_shared_memory(proc, batch):
    special = special_token_ids(proc.tokenizer, proc.config)
    before = batch.patches.clone()
    copy = mask_batch(batch, special, 151669, mask_generator(3, 2, 1))
    assert torch.equal(batch.patches, before)  # the caller's batch is left as it was
    own = replace(batch, patches=batch.patches.clone())
    inplace = mask_batch(own, special, 151669, mask_generator(3, 2, 1), inplace=True)
    assert inplace.batch.patches.data_ptr() == own.patches.data_ptr() and torch.equal(own.patches, copy.batch.patches)
    for f in fields(copy):
        a, b = getattr(copy, f.name), getattr(inplace, f.name)
        assert (a.input_ids if f.name == "batch" else a).equal(b.input_ids if f.name == "batch" else b), f.name
    # packed and masked in a worker, patches and targets are shared memory before the worker pickles them
    items = [synthetic.record(7, i) for i in range(6)]
    ((patches_shared, targets_shared, mb),) = torch.utils.data.DataLoader(
        _Masked(proc, items), batch_size=None, num_workers=1)
    assert patches_shared and targets_shared and mb.num_mae > 0
    here = mask_batch(proc(items), special, 151669, mask_generator(3, 2, 1))
    assert torch.equal(mb.batch.patches, here.batch.patches) and torch.equal(mb.mae_targets, here.mae_targets)


def test_masks_are_a_function_of_seed_step_slot(proc, batch):
    special = special_token_ids(proc.tokenizer, proc.config)
    a = mask_batch(batch, special, 151669, mask_generator(5, 10, 2))
    b = mask_batch(batch, special, 151669, mask_generator(5, 10, 2))
    assert torch.equal(a.mlm_positions, b.mlm_positions) and torch.equal(a.batch.patches, b.batch.patches)
    for other in (mask_generator(5, 11, 2), mask_generator(5, 10, 3), mask_generator(6, 10, 2)):
        c = mask_batch(batch, special, 151669, other)
        assert not torch.equal(a.mlm_positions, c.mlm_positions)


def test_switched_off_parts_have_no_targets(proc, batch):
    special = special_token_ids(proc.tokenizer, proc.config)
    mb = mask_batch(batch, special, 151669, mask_generator(0, 0, 0), mlm_prob=0.0, mae_prob=0.0)
    assert mb.num_mlm == 0 and mb.num_mae == 0
    assert torch.equal(mb.batch.input_ids, batch.input_ids) and torch.equal(mb.batch.patches, batch.patches)


def small_model(seed=0) -> MoCaModel:
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=1, mrope_section=(4, 6, 6),
                      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                                          out_hidden_size=64, fullatt_block_indexes=(0,)))
    model = MoCaModel(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    model.attn_backend = "torch"
    return model


def test_mae_head_init():
    model = small_model()
    head = MAEHead(model, torch.Generator().manual_seed(3))
    mid = model.layers[1].state_dict()  # L // 2 with L = 3
    for k, v in head.layer.state_dict().items():
        assert torch.equal(v, mid[k]) and v.data_ptr() != mid[k].data_ptr()
    assert head.proj.weight.shape == (4 * 1176, 64) and (head.proj.bias == 0).all()
    w = head.proj.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001


def test_mae_head_copies_layer_l_over_2_with_an_even_depth():
    """MOCA.md §2: the head's layer starts as a copy of LLM layer L // 2; with L = 4 that is layer 2 (not 1)."""
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
                      num_key_value_heads=1, mrope_section=(2, 3, 3),
                      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=48, num_heads=2,
                                          out_hidden_size=32, fullatt_block_indexes=(0,)))
    model = MoCaModel(cfg)
    model.init_weights(torch.Generator().manual_seed(1))
    head = MAEHead(model, torch.Generator().manual_seed(3))
    layers = [layer.state_dict() for layer in model.layers]
    for k, v in head.layer.state_dict().items():
        assert torch.equal(v, layers[2][k]), k


def test_cpt_loss_matches_float64_oracle(proc):
    """Loss and gradients of CPTModule (masked-only heads) against full logits / full MSE in float64."""
    batch = proc([synthetic.record(11, i) for i in range(3)])
    model = small_model()
    head = MAEHead(model, torch.Generator().manual_seed(3))
    with torch.no_grad():  # a non-trivial head layer and bias so the oracle checks them
        head.proj.bias.normal_()
        for p in head.layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = CPTModule(model, head, mae_weight=0.1)
    special = special_token_ids(proc.tokenizer, proc.config)
    mb = mask_batch(batch, special, 151669, mask_generator(2, 0, 0))
    loss, mlm, mae = module(mb, 0.7, 1.3)
    grads = torch.autograd.grad(loss, [model.embed_tokens.weight, head.proj.weight])

    from moca.layers import mrope_cos_sin

    b = mb.batch
    hidden = model(b)
    logits = hidden[mb.mlm_positions].double() @ model.lm_head.weight.double().T  # (M, V), what the kernel avoids
    ref_mlm = F.cross_entropy(logits, mb.mlm_targets)
    cos, sin = mrope_cos_sin(b.position_ids, model.inv_freq, model.config.mrope_section, hidden.dtype)
    dec = head.layer(hidden, cos, sin, b.cu_seqlens, b.max_seqlen, "torch")
    pred = dec.double() @ head.proj.weight.double().T + head.proj.bias.double()  # (T, 4704)
    ref_mae = ((pred[mb.mae_positions] - mb.mae_targets.double()) ** 2).mean()
    ref = 0.7 * ref_mlm + 0.1 * 1.3 * ref_mae
    ref_grads = torch.autograd.grad(ref, [model.embed_tokens.weight, head.proj.weight])
    torch.testing.assert_close(mlm.double(), ref_mlm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mae.double(), ref_mae, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)


def test_a_micro_batch_without_targets_still_backpropagates(proc):
    """--no-mlm and a text-only micro-batch (or simply no token drawn): its loss is 0 but in the graph, so
    backward (and DDP's reducer) runs, instead of 'element 0 of tensors does not require grad'."""
    model = small_model()
    module = CPTModule(model, MAEHead(model))
    special = special_token_ids(proc.tokenizer, proc.config)
    mb = mask_batch(proc([{"text": "a plain text record"}]), special, 151669, mask_generator(0, 0, 0), mlm_prob=0.0)
    assert mb.num_mlm == 0 and mb.num_mae == 0
    loss, mlm, mae = module(mb, 0.0, 0.0, False, True)  # MAE is on for the step, elsewhere
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in module.parameters())


def test_task_losses_are_normalised_by_the_step_totals(proc):
    """CPTTask with its defaults over two micro-batches of one step: the summed backpropagated losses (and the
    reported parts) equal, in float64, MLM cross-entropy averaged over ALL the step's masked tokens plus
    0.1 x MAE squared error averaged over ALL the step's predicted numbers (MOCA.md §2), whatever each
    micro-batch holds."""
    from engine.cpt import CPTTask
    from moca.layers import mrope_cos_sin

    model = small_model()
    head = MAEHead(model, torch.Generator().manual_seed(3))
    task = CPTTask(model, proc, None, head)  # the data is not read here
    mbs = [mask_batch(proc([synthetic.record(11, i) for i in idx]), task.special_ids, task.mask_id,
                      mask_generator(2, 0, slot)) for slot, idx in enumerate([(0, 1, 2), (3,)])]
    assert all(mb.num_mlm and mb.num_mae for mb in mbs)
    assert mbs[0].num_mlm * mbs[1].num_mae != mbs[1].num_mlm * mbs[0].num_mae  # shares that tell the counts apart
    totals = task.counts(mbs)
    got, parts = 0.0, 0.0
    for mb in mbs:
        loss, p = task.loss(task.module, mb, totals, 1)
        got, parts = got + loss, parts + p
    ce, sq, n_mlm, n_mae = 0.0, 0.0, 0, 0
    with torch.no_grad():
        for mb in mbs:
            b = mb.batch
            hidden = model(b)
            logits = hidden[mb.mlm_positions].double() @ model.lm_head.weight.double().T
            ce = ce + F.cross_entropy(logits, mb.mlm_targets, reduction="sum")
            cos, sin = mrope_cos_sin(b.position_ids, model.inv_freq, model.config.mrope_section, hidden.dtype)
            dec = head.layer(hidden, cos, sin, b.cu_seqlens, b.max_seqlen, "torch")[mb.mae_positions]
            pred = dec.double() @ head.proj.weight.double().T + head.proj.bias.double()
            sq = sq + ((pred - mb.mae_targets.double()) ** 2).sum()
            n_mlm, n_mae = n_mlm + mb.num_mlm, n_mae + mb.mae_targets.numel()
    ref_mlm, ref_mae = ce / n_mlm, sq / n_mae
    torch.testing.assert_close(got.double().detach(), ref_mlm + 0.1 * ref_mae, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.double(), torch.stack([ref_mlm + 0.1 * ref_mae, ref_mlm, ref_mae]),
                               rtol=1e-5, atol=1e-6)
