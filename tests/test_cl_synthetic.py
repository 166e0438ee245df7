"""The synthetic world: drawings show what the captions and the CPT corpus say (checked on the
pixels), CL hard negatives differ from the positive in exactly one attribute, and the eval set has
100 distinct candidates per query with the right one first; its own seed; deterministic."""

import io
import random
import re

import numpy as np
import pytest
from PIL import Image

from engine import cl_synthetic as S
from engine import synthetic as W
from moca.processor import IMAGE_MARKER

COLOUR_NAMES, BG_NAMES = list(W.COLOURS), list(W.BACKGROUNDS)


def parse(text: str) -> dict:
    """Attributes named by a caption / answer / label, read back from the words."""
    words = re.findall(r"[a-z]+", text)
    out = {}
    for w in words:
        if w in W.COUNTS:
            out["count"] = W.COUNTS.index(w)
        if w in COLOUR_NAMES and "colour" not in out:
            out["colour"] = COLOUR_NAMES.index(w)
        stem = w[:-2] if w.endswith("sses") else w.rstrip("s") if w not in W.SHAPES else w
        if stem in W.SHAPES or w in W.SHAPES:
            out["shape"] = W.SHAPES.index(w if w in W.SHAPES else stem)
    for i, w in enumerate(words):
        if w in BG_NAMES and (i == len(words) - 1 or words[i + 1] == "background"):
            out["background"] = BG_NAMES.index(w)
    return out


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_drawing_matches_scene(seed):
    rng = random.Random(seed)
    for _ in range(20):
        s = W.random_scene(rng)
        png = W.render(s, rng)
        img = pixels(png)
        assert img.shape == (W.SIZE, W.SIZE, 3)
        background = np.asarray(W.BACKGROUNDS[BG_NAMES[s[3]]])
        assert (np.abs(img - background).max(-1) <= 16).mean() > 0.3  # the background dominates the free space
        assert filled_quadrants(png, s[0]) == s[2] + 1  # one shape per filled quadrant: the count


@pytest.mark.parametrize("task", S.TASKS)
def test_hard_negatives_differ_in_one_attribute(task):
    for i in range(12):
        rec = S.record(7, task, i)
        assert rec == S.record(7, task, i)  # a pure function of (seed, task, index)
        assert len(rec["neg_text"]) == len(rec["neg_image_path"]) == 3
        if task == "t2i":  # image targets: the caption is in the query, negatives are other drawings
            assert all(isinstance(p, bytes) and p != rec["pos_image_path"] for p in rec["neg_image_path"])
            continue
        pos = parse(rec["pos_text"])
        assert len(pos) == len(S.TASK_ATTRS[task])
        for neg in rec["neg_text"]:
            diff = [k for k in pos if parse(neg)[k] != pos[k]]
            assert len(diff) == 1, (rec["pos_text"], neg)
        assert len(set(rec["neg_text"])) == 3
        if task != "i2t":
            assert "<|image_1|>" in rec["qry"] and isinstance(rec["qry_image_path"], bytes)


def test_eval_set_layout():
    subsets, images = S.eval_set(queries=100)
    assert subsets.keys() == set(S.TASKS)
    for task, rows in subsets.items():
        assert len(rows) == 100
        for r in rows:
            cands = list(zip(r["tgt_text"], r["tgt_img_path"]))
            assert len(cands) == 100 and len(set(cands)) == 100
            assert all(p in images for _, p in cands if p)
            if task == "i2t":
                q = parse(r["qry_text"])  # the query is an image: the right caption is candidate 0
                assert r["qry_img_path"] in images and not q
            if task == "vqa":  # the background the question names is the query image's
                asked = np.asarray(W.BACKGROUNDS[BG_NAMES[parse(r["qry_text"])["background"]]])
                assert (np.abs(pixels(images[r["qry_img_path"]]) - asked).max(-1) <= 16).mean() > 0.3
    again, _ = S.eval_set(queries=100)
    assert again == subsets
    other, _ = S.eval_set(seed=S.EVAL_SEED + 1, queries=100)
    assert other != subsets
    # the t2i right image shows the caption's scene: count its filled quadrants on the pixels
    for r in subsets["t2i"][:10]:
        assert filled_quadrants(images[r["tgt_img_path"][0]], parse(r["qry_text"])["colour"]) == \
            parse(r["qry_text"])["count"] + 1


def filled_quadrants(png: bytes, colour: int) -> int:
    img = pixels(png)
    ref = np.asarray(W.COLOURS[COLOUR_NAMES[colour]])
    half = W.SIZE // 2
    return sum((np.abs(img[y : y + half, x : x + half] - ref).max(-1) <= 16).mean() > 0.05
               for y in (0, half) for x in (0, half))


def test_cpt_corpus_names_what_is_drawn():
    """The CPT corpus is drawn from the same world: the words after each image name its scene."""
    kinds = set()
    for i in range(60):
        rec = W.record(3, i)
        assert rec == W.record(3, i)
        segments = rec["text"].split(IMAGE_MARKER)
        assert len(segments) - 1 == len(rec["images"])
        kinds.add(len(rec["images"]))
        for png, words in zip(rec["images"], segments[1:]):
            want = parse(words.split("\n")[0])
            assert "colour" in want and "shape" in want
            if "count" in want:
                assert filled_quadrants(png, want["colour"]) == want["count"] + 1
            else:  # a class name: the count is left out, the colour still shows
                assert filled_quadrants(png, want["colour"]) >= 1
    assert kinds == {0, 1, 2}  # text-only, one image, two-image stories
