"""The synthetic-shapes world (issue #6): deterministic scenes of one or two coloured shapes, their captions, and
their renders. Used by train.py (training data) and to write the oracle's test fixture:

    python models/shapes/shapes.py --fixture tests/fixtures/shapes      # sprite sheet + labels for the Rust oracle

Everything is a function of the seed: numpy's PCG64 drives scene sampling, PIL draws at 4x and box-filters down.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels
SS = 4  # supersampling factor

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 165, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (140, 45, 190),
    "orange": (245, 130, 20),
}
BACKGROUNDS = [(246, 246, 246), (226, 226, 226), (240, 232, 214), (214, 224, 234)]
POSITIONS = {"left": (0.29, 0.5), "right": (0.71, 0.5), "top": (0.5, 0.29), "bottom": (0.5, 0.71), "center": (0.5, 0.5)}

# Colour x shape pairs never shown in training (single or double scenes): generalisation is measured on them.
HELD_OUT_PAIRS = {("purple", "star"), ("orange", "ring"), ("green", "triangle"), ("blue", "cross"),
                  ("yellow", "circle"), ("red", "square")}

TRAIN_SINGLE = [
    "a {c} {s}", "{c} {s}", "a photo of a {c} {s}", "a drawing of a {c} {s}", "a {size} {c} {s}",
    "a {c} {s} {pos}", "a {size} {c} {s} {pos}", "a picture of a {size} {c} {s}", "one {c} {s}",
    "a simple {c} {s} on a plain background",
]
TRAIN_DOUBLE = ["a {c1} {s1} and a {c2} {s2}", "a {c1} {s1} next to a {c2} {s2}",
                "a {c1} {s1} on the left and a {c2} {s2} on the right", "{c1} {s1}, {c2} {s2}"]
HELD_OUT_SINGLE = ["an image of a {c} {s}", "a rendering of a {c} {s}", "there is a {c} {s}"]
HELD_OUT_DOUBLE = ["a {c1} {s1} beside a {c2} {s2}"]
POS_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
             "center": "in the center"}


def article(text: str) -> str:
    """'a orange ring' -> 'an orange ring' (only the leading 'a ')."""
    words = text.split(" ")
    for i, w in enumerate(words[:-1]):
        if w == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def pairs(split: str):
    allp = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in allp if (p in HELD_OUT_PAIRS) == (split == "test")]


def sample_scene(rng: np.random.Generator, split: str = "train", double_p: float = 0.3) -> dict:
    """A scene: background, one or two objects {shape, colour, size, pos, cx, cy, r} in pixel units."""
    bg = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    textured = bool(rng.random() < 0.3)
    ps = pairs(split)
    objs = []
    if rng.random() < double_p:
        i, j = rng.choice(len(ps), 2, replace=False)
        for (c, s), pos, fx in zip([ps[i], ps[j]], ["left", "right"], [0.25, 0.75]):
            objs.append(dict(shape=s, colour=c, size="small", pos=pos, r=float(rng.uniform(4.5, 5.5)),
                             cx=fx * SIZE + rng.uniform(-0.5, 0.5), cy=SIZE / 2 + rng.uniform(-2.5, 2.5)))
    else:
        c, s = ps[rng.integers(len(ps))]
        if rng.random() < 0.5:
            size, pos, r = "large", "center", float(rng.uniform(9.0, 11.0))
            cx, cy = SIZE / 2 + rng.uniform(-1.5, 1.5), SIZE / 2 + rng.uniform(-1.5, 1.5)
        else:
            size, r = "small", float(rng.uniform(5.0, 6.5))
            pos = list(POSITIONS)[rng.integers(len(POSITIONS))]
            fx, fy = POSITIONS[pos]
            cx, cy = fx * SIZE + rng.uniform(-1, 1), fy * SIZE + rng.uniform(-1, 1)
        objs.append(dict(shape=s, colour=c, size=size, pos=pos, r=r, cx=cx, cy=cy))
    jitter = [tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[o["colour"]]) for o in objs]
    return dict(background=bg, textured=textured, objects=objs, rgb=jitter, noise_seed=int(rng.integers(2**31)))


def caption(scene: dict, rng: np.random.Generator, held_out_templates: bool = False) -> str:
    objs = scene["objects"]
    if len(objs) == 2:
        t = (HELD_OUT_DOUBLE if held_out_templates else TRAIN_DOUBLE)[rng.integers(len(HELD_OUT_DOUBLE if held_out_templates else TRAIN_DOUBLE))]
        a, b = objs
        return article(t.format(c1=a["colour"], s1=a["shape"], c2=b["colour"], s2=b["shape"]))
    o = objs[0]
    pool = HELD_OUT_SINGLE if held_out_templates else TRAIN_SINGLE
    t = pool[rng.integers(len(pool))]
    return article(" ".join(t.format(c=o["colour"], s=o["shape"], size=o["size"], pos=POS_WORDS[o["pos"]]).split()))


def _polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        R = 1.2 * r
        return [(cx + R * np.cos(a), cy + 0.12 * r + R * np.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":
        pts = []
        for k in range(10):
            R = 1.2 * r if k % 2 == 0 else 0.5 * r
            a = np.deg2rad(-90 + 36 * k)
            pts.append((cx + R * np.cos(a), cy + R * np.sin(a)))
        return pts
    raise ValueError(shape)


def _mask(o: dict) -> Image.Image:
    m = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    d = ImageDraw.Draw(m)
    cx, cy, r = o["cx"] * SS, o["cy"] * SS, o["r"] * SS
    s = o["shape"]
    if s == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif s == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = 0.55 * r
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif s == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        d.polygon(_polygon(s, cx, cy, r), fill=255)
    return m.resize((SIZE, SIZE), Image.Resampling.BOX)


def render(scene: dict) -> np.ndarray:
    """RGB uint8 [SIZE, SIZE, 3]."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = scene["background"]
    if scene["textured"]:
        nrng = np.random.default_rng(scene["noise_seed"])
        img += nrng.normal(0, 6, (SIZE, SIZE, 1)).astype(np.float32)
    for o, rgb in zip(scene["objects"], scene["rgb"]):
        a = np.asarray(_mask(o), np.float32)[..., None] / 255.0
        img = img * (1 - a) + np.asarray(rgb, np.float32) * a
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def dataset(n: int, seed: int, split: str = "train", held_out_templates: bool = False):
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        sc = sample_scene(rng, split)
        images[i] = render(sc)
        captions.append(caption(sc, rng, held_out_templates))
        scenes.append(sc)
    return images, captions, scenes


def write_fixture(out: str, n: int = 400, seed: int = 2026):
    """A sprite sheet (20 tiles per row) of clean renders from both splits, and their labels, for the oracle test."""
    os.makedirs(out, exist_ok=True)
    a, ca, sa = dataset(n // 2, seed, "train")
    b, cb, sb = dataset(n - n // 2, seed + 1, "test")
    images, scenes, caps = np.concatenate([a, b]), sa + sb, ca + cb
    cols = 20
    rows = (len(images) + cols - 1) // cols
    sheet = np.zeros((rows * SIZE, cols * SIZE, 3), np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        sheet[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = im
    Image.fromarray(sheet).save(os.path.join(out, "clean.png"), optimize=True)
    labels = [dict(caption=cap, objects=[dict(shape=o["shape"], colour=o["colour"], pos=o["pos"]) for o in sc["objects"]])
              for sc, cap in zip(scenes, caps)]
    with open(os.path.join(out, "clean.json"), "w") as f:
        json.dump(dict(tile=SIZE, columns=cols, seed=seed, labels=labels), f, indent=0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", help="write the oracle fixture into this folder")
    ap.add_argument("--preview", help="write a 16x8 grid of training images with captions to this PNG")
    args = ap.parse_args()
    if args.fixture:
        write_fixture(args.fixture)
    if args.preview:
        imgs, caps, _ = dataset(128, 0)
        grid = np.zeros((8 * SIZE, 16 * SIZE, 3), np.uint8)
        for k, im in enumerate(imgs):
            r, c = divmod(k, 16)
            grid[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = im
        Image.fromarray(grid).resize((16 * SIZE * 3, 8 * SIZE * 3), Image.Resampling.NEAREST).save(args.preview)
        print("\n".join(caps[:16]))
