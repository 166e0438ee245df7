"""The built-in synthetic world, and the interleaved CPT corpus drawn from it: the embedded default's data.

One world serves both stages, so that what continual pre-training teaches is what contrastive
fine-tuning then aligns (`engine.cl_synthetic` draws its pairs and eval set from it). A scene is
(colour, shape, count, background): a 112x112 image (the tiny preset's 16 LLM tokens) shows 1-4
identical shapes (6 colours x 5 shapes), each filling one quadrant (2x2 merged tokens), on one of
4 background colours. The signals are clear on purpose, so that the `tiny` preset learns them on
a CPU in minutes: the background colour is in all 16 tokens, colour and shape in each object's 4,
the count is how many there are, and the five shapes differ in how they fill a token (a disc, an
outline, a plus, a bar, a dot), not only along their borders. Renders are jittered (size, offset,
which quadrants, shades), so no two images repeat. 480 scenes.

A CPT record is `{"text": str with image markers, "images": [PNG bytes]}` like a real source:
captions, questions with their answers, class names and two-image stories that name each
attribute once (a masked attribute word has to be read off the image), plus text-only
descriptions. Record i is a pure function of (seed, i): random access, no state, the same on
every rank.
"""

import io
import random

from PIL import Image, ImageDraw

from moca.processor import IMAGE_MARKER

VERSION = 2  # bump when the drawing or the wording changes (it is part of the cost-cache key)
SIZE = 112
COLOURS = {
    "red": (225, 30, 30), "green": (30, 170, 40), "blue": (35, 60, 230),
    "yellow": (240, 215, 30), "purple": (150, 40, 190), "cyan": (30, 205, 215),
}
SHAPES = ("circle", "ring", "cross", "bar", "dot")
COUNTS = ("one", "two", "three", "four")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (15, 15, 15), "brown": (125, 80, 40)}
SIZES = (len(COLOURS), len(SHAPES), len(COUNTS), len(BACKGROUNDS))

Scene = tuple[int, int, int, int]  # (colour, shape, count - 1, background) indices


def _shapes(sh: int, n: int) -> str:
    name = SHAPES[sh]
    return name if n == 0 else name + ("es" if name.endswith("s") else "s")


def caption(s: Scene) -> str:
    c, sh, n, bg = s
    return f"{COUNTS[n]} {list(COLOURS)[c]} {_shapes(sh, n)} on a {list(BACKGROUNDS)[bg]} background"


def answer(s: Scene) -> str:
    """What is on the background (the background itself is left out)."""
    c, sh, n, _ = s
    return f"{COUNTS[n]} {list(COLOURS)[c]} {_shapes(sh, n)}"


def label(s: Scene) -> str:
    """The class of a scene: the count left out."""
    c, sh, _, bg = s
    return f"{list(COLOURS)[c]} {SHAPES[sh]} on {list(BACKGROUNDS)[bg]}"


def random_scene(rng: random.Random) -> Scene:
    return tuple(rng.randrange(n) for n in SIZES)


def change_one(s: Scene, attr: int, rng: random.Random) -> Scene:
    out = list(s)
    out[attr] = rng.choice([v for v in range(SIZES[attr]) if v != s[attr]])
    return tuple(out)


def _shade(rgb, rng, spread=12):
    return tuple(max(0, min(255, v + rng.randint(-spread, spread))) for v in rgb)


def render(s: Scene, rng: random.Random) -> bytes:
    """PNG bytes of one jittered drawing of scene s."""
    c, sh, n, bg = s
    img = Image.new("RGB", (SIZE, SIZE), _shade(BACKGROUNDS[list(BACKGROUNDS)[bg]], rng, 8))
    d = ImageDraw.Draw(img)
    fill = _shade(COLOURS[list(COLOURS)[c]], rng)
    half = SIZE // 2
    for quad in rng.sample(range(4), n + 1):
        r = rng.uniform(19.0, 25.0)
        x = (quad % 2) * half + half / 2 + rng.uniform(-2.5, 2.5)
        y = (quad // 2) * half + half / 2 + rng.uniform(-2.5, 2.5)
        shape, w = SHAPES[sh], 0.35 * r
        if shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif shape == "ring":
            d.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=6)
        elif shape == "dot":
            d.ellipse([x - 0.4 * r, y - 0.4 * r, x + 0.4 * r, y + 0.4 * r], fill=fill)
        else:  # bar, cross: a horizontal bar, plus a vertical one for the cross
            d.rectangle([x - r, y - w, x + r, y + w], fill=fill)
            if shape == "cross":
                d.rectangle([x - w, y - r, x + w, y + r], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ------------------------------------------------------------------------------ CPT corpus
def _sentence(s: Scene, rng: random.Random) -> str:
    return rng.choice(("A picture of {}.", "It shows {}.", "This drawing has {}.", "{}.")).format(caption(s))


def record(seed: int, index: int) -> dict:
    """The CPT record number `index` of the corpus drawn from `seed`."""
    rng = random.Random(f"cpt/{seed}/{index}")
    kind = rng.choices(("caption", "question", "class", "story", "text"), weights=(4, 2, 1, 2, 1))[0]
    s = random_scene(rng)
    if kind == "text":
        return {"text": "Imagine a drawing of " + caption(s) + ".", "images": []}
    if kind == "story":
        t = change_one(s, rng.randrange(4), rng) if rng.random() < 0.5 else random_scene(rng)
        text = (f"Here is the first drawing. {IMAGE_MARKER}{_sentence(s, rng)}\n"
                f"The second drawing is different. {IMAGE_MARKER}{_sentence(t, rng)}")
        return {"text": text, "images": [render(s, rng), render(t, rng)]}
    if kind == "question":
        bg = list(BACKGROUNDS)[s[3]]
        body = f"Question: What is on the {bg} background? Answer: {answer(s)}."
    elif kind == "class":
        body = f"Class: {label(s)}."
    else:
        body = _sentence(s, rng)
    return {"text": IMAGE_MARKER + body, "images": [render(s, rng)]}
