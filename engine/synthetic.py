"""The built-in synthetic interleaved corpus: the embedded default's data, drawn in code.

Each record is `{"text": str with image markers, "images": [PNG bytes]}` like a real source.
Images are small canvases with coloured shapes (circles, squares, triangles, diamonds) at
named positions; the texts are captions, counts and short paragraphs that refer to them, plus
text-only descriptions, so both the MLM and the MAE objective have structure to learn.
Record i is a pure function of (seed, i): random access, no state, the same on every rank.
"""

import io
import random

from PIL import Image, ImageDraw

from moca.processor import IMAGE_MARKER

VERSION = 1  # bump when the drawing or the wording changes (it is part of the cost-cache key)
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "black": (20, 20, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (170, 170, 170), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {  # (column, row) of a 3x3 grid
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "centre", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SIZES = ((112, 112), (140, 112), (112, 140), (168, 112))


def _plural(n: int, shape: str) -> str:
    return f"{NUMBERS[n]} {shape}" + ("" if n == 1 else "s")


def _scene(rng: random.Random) -> dict:
    """A background, then one to three groups of identical shapes, each group in its own cells."""
    bg = rng.choice(sorted(BACKGROUNDS))
    cells = rng.sample(sorted(PLACES), 9)
    groups, used = [], 0
    for _ in range(rng.randint(1, 3)):
        n = rng.randint(1, 3)
        if used + n > 9:
            break
        colour, shape = rng.choice([c for c in COLOURS if c != bg]), rng.choice(SHAPES)
        if any(g["colour"] == colour and g["shape"] == shape for g in groups):
            continue
        groups.append({"shape": shape, "colour": colour, "cells": cells[used : used + n]})
        used += n
    return {"bg": bg, "groups": groups, "size": rng.choice(SIZES)}


def _draw(scene: dict) -> bytes:
    w, h = scene["size"]
    img = Image.new("RGB", (w, h), BACKGROUNDS[scene["bg"]])
    d = ImageDraw.Draw(img)
    cw, ch = w / 3, h / 3
    r = 0.36 * min(cw, ch)
    for g in scene["groups"]:
        fill = COLOURS[g["colour"]]
        for cx, cy in g["cells"]:
            x, y = (cx + 0.5) * cw, (cy + 0.5) * ch
            if g["shape"] == "circle":
                d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            elif g["shape"] == "square":
                d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
            elif g["shape"] == "triangle":
                d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            else:
                d.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _caption(scene: dict) -> str:
    parts = [f"{_plural(len(g['cells']), g['colour'] + ' ' + g['shape'])}" for g in scene["groups"]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"A picture of {listed} on a {scene['bg']} background."


def _details(scene: dict, rng: random.Random) -> str:
    lines = []
    for g in scene["groups"]:
        places = [PLACES[c] for c in g["cells"]]
        noun = g["shape"] if len(places) == 1 else g["shape"] + "s"
        where = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
        lines.append(f"The {g['colour']} {noun} {'is' if len(places) == 1 else 'are'} in the {where}.")
    rng.shuffle(lines)
    return " ".join(lines)


def _count(scene: dict) -> str:
    total = sum(len(g["cells"]) for g in scene["groups"])
    return f"There {'is' if total == 1 else 'are'} {_plural(total, 'shape')} in this image."


def record(seed: int, index: int) -> dict:
    """The synthetic record number `index` of the corpus drawn from `seed`."""
    rng = random.Random(seed * 1_000_003 + index)
    kind = rng.choices(("caption", "count", "story", "text"), weights=(4, 2, 3, 1))[0]
    if kind == "text":
        scene = _scene(rng)
        return {"text": "Imagine a drawing. " + _caption(scene) + " " + _details(scene, rng), "images": []}
    if kind == "story":
        a, b = _scene(rng), _scene(rng)
        text = (
            f"Here is the first drawing. {IMAGE_MARKER}{_caption(a)} {_details(a, rng)}\n"
            f"The second drawing is different. {IMAGE_MARKER}{_caption(b)} {_count(b)}"
        )
        return {"text": text, "images": [_draw(a), _draw(b)]}
    scene = _scene(rng)
    body = _caption(scene) + " " + (_details(scene, rng) if kind == "caption" else _count(scene))
    return {"text": IMAGE_MARKER + body, "images": [_draw(scene)]}
