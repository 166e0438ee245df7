"""Built-in synthetic contrastive pairs and eval set: the `cl` embedded default's data, drawn in code.

The world (scenes, drawings, captions) is `engine.synthetic`'s, the one the CPT corpus is drawn
from: 480 scenes of (colour, shape, count, background), captions naming all four attributes.

Training records use the MMEB-train layout (`qry`, `qry_image_path`, `pos_text`, `pos_image_path`,
`neg_text`, `neg_image_path`; image "paths" are PNG bytes; Phi-3-V `<|image_1|>` markers) in four
task subsets: caption -> image (t2i), image -> caption (i2t), question about an image -> answer
(vqa), image -> class prompt (cls). Hard negatives are the record with ONE attribute changed.
Record i of a task is a pure function of (seed, task, i).

The eval set uses the MMEB-eval layout (`qry_text`, `qry_img_path`, `tgt_text`, `tgt_img_path`
lists, the right candidate first) with its own seed: 100 distinct candidates per query (chance
= 0.01), images named by relative paths into an in-memory image table.
"""

import random

from engine.synthetic import BACKGROUNDS, SIZES, Scene, answer, caption, change_one, label, random_scene, render

TASKS = ("t2i", "i2t", "vqa", "cls")
# attributes a task's target names: a hard negative changes one of them
TASK_ATTRS = {"t2i": (0, 1, 2, 3), "i2t": (0, 1, 2, 3), "vqa": (0, 1, 2), "cls": (0, 1, 3)}
EVAL_SEED = 20250601

T2I_QUERY = "Find me an everyday image that matches the given caption: {}.\n"
IMAGE_TARGET = "<|image_1|>\nRepresent the given image.\n"
I2T_QUERY = "<|image_1|>\nFind an image caption describing the given everyday image.\n"
VQA_QUERY = "<|image_1|>\nRepresent the given image with the following question: What is on the {} background?\n"
CLS_QUERY = "<|image_1|>\nRepresent the given image for classification\n"


def _side(task: str, s: Scene, rng: random.Random, query: bool) -> tuple[str, bytes | str]:
    """(text, image or "") of a record's query or of a target for scene s."""
    if task == "t2i":
        return (T2I_QUERY.format(caption(s)), "") if query else (IMAGE_TARGET, render(s, rng))
    if not query:
        return {"i2t": caption, "vqa": answer, "cls": label}[task](s), ""
    text = {"i2t": I2T_QUERY, "vqa": VQA_QUERY.format(list(BACKGROUNDS)[s[3]]), "cls": CLS_QUERY}[task]
    return text, render(s, rng)


def record(seed: int, task: str, index: int, num_negatives: int = 3) -> dict:
    """Training record `index` of `task` (MMEB-train layout), with hard negatives one attribute away."""
    rng = random.Random(f"cl/{seed}/{task}/{index}")
    s = random_scene(rng)
    q_text, q_img = _side(task, s, rng, True)
    p_text, p_img = _side(task, s, rng, False)
    negs, seen = [], {s}
    while len(negs) < num_negatives:
        ns = change_one(s, rng.choice(TASK_ATTRS[task]), rng)
        if ns not in seen:
            seen.add(ns)
            negs.append(_side(task, ns, rng, False))
    return {"qry": q_text, "qry_image_path": q_img, "pos_text": p_text, "pos_image_path": p_img,
            "neg_text": [t for t, _ in negs], "neg_image_path": [i for _, i in negs]}


class SyntheticSubset:
    """`size` records of one task as a random-access subset (valid by construction: `trusted`)."""

    trusted, image_root = True, None

    def __init__(self, task: str, size: int, seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"unknown synthetic task {task!r}; choose from {TASKS}")
        self.task, self.size, self.seed = task, size, seed
        self.name = f"synthetic/{task}"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return record(self.seed, self.task, i)

    def where(self, i: int) -> str:
        """Where record i is, for messages (as cl_data's subsets say it)."""
        return f"subset {self.name} record {i}"


# ------------------------------------------------------------------------------------ eval set
def eval_set(seed: int = EVAL_SEED, queries: int = 100, candidates: int = 100) -> tuple[dict[str, list[dict]], dict[str, bytes]]:
    """-> ({task: MMEB-eval rows}, {relative image path: PNG bytes}).

    Every row's candidates are distinct targets, the right one first. t2i / i2t: the rows'
    scenes are distinct and each row's candidates are its own target plus 99 other rows' (a
    100 x 100 retrieval, so 100 images or captions are embedded, not 480); vqa / cls: the
    right answer / class plus 99 others drawn from all 120. Query images are their own renders.
    """
    rng = random.Random(f"cl-eval/{seed}")
    scenes = [(c, sh, n, q) for c in range(SIZES[0]) for sh in range(SIZES[1]) for n in range(SIZES[2])
              for q in range(SIZES[3])]
    target = {"t2i": caption, "i2t": caption, "vqa": answer, "cls": label}
    images: dict[str, bytes] = {}
    subsets = {}
    for task in TASKS:
        picked = rng.sample(scenes, queries)
        if task in ("t2i", "i2t"):
            if queries < candidates:
                raise ValueError(f"{task}: {queries} rows give fewer than {candidates} candidates")
            pool = [target[task](s) for s in picked]
            image_of = {}
            if task == "t2i":
                for k, s in enumerate(picked):
                    image_of[pool[k]] = f"t2i/target_{k:04d}.png"
                    images[image_of[pool[k]]] = render(s, rng)
        else:
            pool = sorted({target[task](s) for s in scenes})
            if len(pool) < candidates:
                raise ValueError(f"{task}: only {len(pool)} distinct targets for {candidates} candidates")
        rows = []
        for r, s in enumerate(picked):
            q_text, _ = _side(task, s, rng, True)
            q_img = ""
            if task != "t2i":
                q_img = f"{task}/query_{r:04d}.png"
                images[q_img] = render(s, rng)
            right = target[task](s)
            keys = [right] + rng.sample([k for k in pool if k != right], candidates - 1)
            if task == "t2i":
                tgt_text, tgt_img = [IMAGE_TARGET] * candidates, [image_of[k] for k in keys]
            else:
                tgt_text, tgt_img = keys, [""] * candidates
            rows.append({"qry_text": q_text, "qry_img_path": q_img, "tgt_text": tgt_text, "tgt_img_path": tgt_img})
        subsets[task] = rows
    return subsets, images


def evaluate(model, processor, subsets: dict[str, list[dict]], images: dict[str, bytes],
             batch_tokens: int = 8192) -> dict:
    """precision@1 of every task (each distinct input embedded once) ->
    {"mean_precision@1": x, "tasks": {task: precision@1}}."""
    import torch

    from engine.cl_data import make_input
    from engine.metrics import precision_at_1
    from moca.embed import embed_items

    tasks = {}
    for task, rows in subsets.items():
        index, items = {}, []

        def add(text, img):
            key = (text, img)
            if key not in index:
                index[key] = len(items)
                items.append(make_input(text, images[img] if img else "", None))
            return index[key]

        queries = torch.tensor([add(r["qry_text"], r["qry_img_path"]) for r in rows])
        cands = torch.tensor([[add(t, i) for t, i in zip(r["tgt_text"], r["tgt_img_path"])] for r in rows])
        vectors = embed_items(model, processor, items, batch_tokens=batch_tokens)
        scores = torch.einsum("rh,rch->rc", vectors[queries], vectors[cands])
        tasks[task] = precision_at_1(scores).double().mean().item()
    return {"mean_precision@1": sum(tasks.values()) / len(tasks), "tasks": tasks}
