"""Synthetic referring-segmentation dataset written in the *refer layout* (the demo/CI default).

``python -m vipa_jax.data.synthetic --out DIR [--num-images 1000] [--image-size 160] [--seed 0]``
writes::

    DIR/images/mscoco/images/train2014/COCO_train2014_<id:012d>.jpg
    DIR/synthetic/instances.json      # COCO images/annotations/categories; polygons and RLE
    DIR/synthetic/refs(unc).p         # refs with splits train/val/testA/testB/unseen

which :class:`vipa_jax.data.refer.ReferDataset` reads with ``dataset='synthetic'``.

Each image has a gently noisy plain background and 2-5 solid shapes (circle, square, triangle,
diamond) in 5 colours and two sizes (diameter >= 18% of the side), placed without overlap.
Objects are drawn so that same-shape or same-colour distractors are frequent, and each object
gets up to ``sentences_per_object`` distinct expressions that identify it uniquely, built from
colour, shape, size ("the small green triangle"), absolute position ("the leftmost circle") and
relations to another object ("the circle left of the red square").

Splits are per image: train 80%, val 10%, testA 5%, testB 5% (testA/testB are random image
splits kept so evaluation code paths match RefCOCO). ``unseen`` images contain at least one
colour-shape pair from :data:`UNSEEN_PAIRS`, which never occur in any other split; only those
objects are referred to.  Output is byte-identical for a seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import time
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw
from pycocotools import mask as mask_utils

from vipa_jax.data.refer import COCO_IMAGE_DIR

DATASET_NAME = "synthetic"
SPLIT_BY = "unc"
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (145, 60, 185),
}
SHAPES = ("circle", "square", "triangle", "diamond")
UNSEEN_PAIRS = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "diamond"), ("yellow", "square")}
)
SIZE_RADIUS = {"small": (0.09, 0.12), "big": (0.16, 0.20)}  # fraction of the image side
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("testA", 0.05), ("testB", 0.05))
RELATIONS = ("left of", "right of", "above", "below")
# Template families of :func:`describe`, for per-type evaluation (:func:`expression_type`).
EXPRESSION_TYPES = ("attribute", "size", "extreme_shape", "extreme_any", "relation")


@dataclass(frozen=True)
class Shape:
    """One drawn object: attributes, centre (x, y) and circumradius in pixels."""

    colour: str
    shape: str
    size: str
    x: float
    y: float
    r: float

    def polygon(self) -> list[float]:
        """Flat COCO polygon [x0, y0, x1, y1, ...] of the object outline."""
        if self.shape == "circle":
            angles = np.linspace(0, 2 * np.pi, 28, endpoint=False)
            radius = self.r
        elif self.shape == "square":
            angles = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
            radius = self.r * 0.95
        elif self.shape == "diamond":
            angles = np.array([0.0, 0.5, 1.0, 1.5]) * np.pi
            radius = self.r
        else:  # triangle, pointing up
            angles = np.array([-0.5, 1 / 6, 5 / 6]) * np.pi
            radius = self.r
        xs = self.x + radius * np.cos(angles)
        ys = self.y + radius * np.sin(angles)
        return [round(float(v), 2) for xy in zip(xs, ys, strict=True) for v in xy]


def _sample_objects(rng: np.random.Generator, side: int, unseen: bool) -> list[Shape]:
    """2-5 non-overlapping shapes with frequent same-shape / same-colour distractors."""
    n = int(rng.integers(2, 6))
    objs: list[Shape] = []
    held_out = sorted(UNSEEN_PAIRS)
    seen_pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in UNSEEN_PAIRS]
    for k in range(n):
        pool = held_out if unseen and (k == 0 or rng.random() < 0.3) else seen_pairs
        if objs and rng.random() < 0.7:
            ref = objs[int(rng.integers(len(objs)))]
            if rng.random() < 0.5:  # same shape, other colour
                cand = [p for p in pool if p[1] == ref.shape and p[0] != ref.colour]
            else:  # same colour, other shape
                cand = [p for p in pool if p[0] == ref.colour and p[1] != ref.shape]
            pool = cand or pool
        colour, shape = pool[int(rng.integers(len(pool)))]
        size = "small" if rng.random() < 0.5 else "big"
        lo, hi = SIZE_RADIUS[size]
        r = float(rng.uniform(lo, hi)) * side
        for _ in range(60):
            x, y = rng.uniform(r + 1, side - r - 1, size=2)
            if all(np.hypot(x - o.x, y - o.y) > r + o.r + 0.03 * side for o in objs):
                objs.append(Shape(colour, shape, size, float(x), float(y), r))
                break
    return objs


def _unique(objs: list[Shape], t: Shape, keys: tuple[str, ...]) -> bool:
    """True when ``t`` is the only object with its values of ``keys``."""
    val = tuple(getattr(t, k) for k in keys)
    return sum(tuple(getattr(o, k) for k in keys) == val for o in objs) == 1


def _relation(a: Shape, b: Shape, side: int) -> str | None:
    """Clear spatial relation of ``a`` to ``b`` ("left of", ...), or None if ambiguous."""
    dx, dy = a.x - b.x, a.y - b.y
    margin = 0.12 * side
    if abs(dx) > margin and abs(dx) > 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) > margin and abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _extreme(objs: list[Shape], t: Shape, side: int) -> list[str]:
    """Directions in which ``t`` is clearly the most extreme of ``objs`` (len >= 2)."""
    if len(objs) < 2:
        return []
    others = [o for o in objs if o is not t]
    margin = 0.08 * side
    out = []
    if all(t.x < o.x - margin for o in others):
        out.append("left")
    if all(t.x > o.x + margin for o in others):
        out.append("right")
    if all(t.y < o.y - margin for o in others):
        out.append("top")
    if all(t.y > o.y + margin for o in others):
        out.append("bottom")
    return out


def describe(objs: list[Shape], t: Shape, side: int) -> list[str]:
    """Every template expression that identifies ``t`` uniquely among ``objs``."""
    out = []
    if _unique(objs, t, ("shape",)):
        out.append(f"the {t.shape}")
    if _unique(objs, t, ("colour",)):
        out.append(f"the {t.colour} shape")
    if _unique(objs, t, ("colour", "shape")):
        out.append(f"the {t.colour} {t.shape}")
    if _unique(objs, t, ("size", "shape")):
        out.append(f"the {t.size} {t.shape}")
    if _unique(objs, t, ("size", "colour", "shape")) and not _unique(objs, t, ("colour", "shape")):
        out.append(f"the {t.size} {t.colour} {t.shape}")
    same_shape = [o for o in objs if o.shape == t.shape]
    for d in _extreme(same_shape, t, side):
        out.append(f"the {t.shape} on the {d}" if d in ("left", "right") else f"the {d} {t.shape}")
    for d in _extreme(objs, t, side):
        out.append(f"the {d}most shape" if d in ("left", "right") else f"the shape at the {d}")
    for ref in objs:
        if ref is t or not _unique(objs, ref, ("colour", "shape")):
            continue
        rel = _relation(t, ref, side)
        if rel is None:
            continue
        anchor = f"the {ref.colour} {ref.shape}"
        for keys in (("shape",), ("colour", "shape")):
            val = tuple(getattr(t, k) for k in keys)
            matching = [
                o for o in objs if o is not ref and tuple(getattr(o, k) for k in keys) == val
            ]
            if sum(_relation(o, ref, side) == rel for o in matching) == 1:
                noun = " ".join(val)
                out.append(f"the {noun} {rel} {anchor}")
    return list(dict.fromkeys(out))


def expression_type(sentence: str) -> str:
    """Template family of an expression written by :func:`describe` (one of EXPRESSION_TYPES).

    attribute: "the circle", "the red shape", "the red circle"; size: "the small (red) circle";
    extreme_shape: "the circle on the left", "the top circle"; extreme_any: "the leftmost
    shape", "the shape at the top"; relation: "the (red) circle left of the blue square".
    """
    words = sentence.split()
    if any(f" {r} " in f" {sentence} " for r in RELATIONS):
        return "relation"
    if sentence.endswith("most shape") or sentence.startswith("the shape at the "):
        return "extreme_any"
    if " on the " in sentence or (len(words) == 3 and words[1] in ("top", "bottom")):
        return "extreme_shape"
    if len(words) > 1 and words[1] in SIZE_RADIUS:
        return "size"
    return "attribute"


def _render(rng: np.random.Generator, objs: list[Shape], side: int) -> PIL.Image.Image:
    """Gently noisy plain background with the objects filled in."""
    base = rng.integers(150, 235, size=3)
    noise = rng.normal(0, 5, size=(side, side, 1))
    bg = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    im = PIL.Image.fromarray(bg, "RGB")
    canvas = PIL.ImageDraw.Draw(im)
    for o in objs:
        p = o.polygon()
        canvas.polygon(list(zip(p[0::2], p[1::2], strict=True)), fill=COLOURS[o.colour])
    return im


def _segmentation(o: Shape, ann_id: int, side: int) -> list[list[float]] | dict:
    """Polygon for two thirds of the annotations, compressed RLE (str counts) for the rest."""
    poly = o.polygon()
    if ann_id % 3:
        return [poly]
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], side, side))
    return {"size": [side, side], "counts": rle["counts"].decode("ascii")}


def _assign_split(rng: np.random.Generator) -> str:
    """Draws an image-level split from :data:`SPLIT_FRACTIONS`."""
    u, acc = rng.random(), 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return SPLIT_FRACTIONS[0][0]


def generate(
    out: str,
    num_images: int = 1000,
    image_size: int = 160,
    seed: int = 0,
    sentences_per_object: int = 3,
    unseen_fraction: float = 0.1,
) -> dict[str, int]:
    """Writes the dataset under ``out``; returns expression counts per split."""
    if num_images < 1 or image_size < 32 or sentences_per_object < 1:
        raise ValueError("need num_images >= 1, image_size >= 32, sentences_per_object >= 1")
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(out, COCO_IMAGE_DIR)
    ds_dir = os.path.join(out, DATASET_NAME)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ds_dir, exist_ok=True)
    cats = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    images, anns, refs = [], [], []
    ann_ids, ref_ids, sent_ids = itertools.count(1), itertools.count(1), itertools.count(1)
    counts: dict[str, int] = {}
    for image_id in range(1, num_images + 1):
        unseen = rng.random() < unseen_fraction
        objs = _sample_objects(rng, image_size, unseen)
        split = "unseen" if unseen else _assign_split(rng)
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        _render(rng, objs, image_size).save(os.path.join(img_dir, file_name), quality=95)
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for o in objs:
            ann_id = next(ann_ids)
            seg = _segmentation(o, ann_id, image_size)
            rle = mask_utils.merge(mask_utils.frPyObjects([o.polygon()], image_size, image_size))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            cat_id = SHAPES.index(o.shape) + 1
            anns.append({
                "id": ann_id, "image_id": image_id, "category_id": cat_id, "segmentation": seg,
                "area": float(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0,
            })
            if unseen and (o.colour, o.shape) not in UNSEEN_PAIRS:
                continue
            exprs = describe(objs, o, image_size)
            if not exprs:
                continue
            pick = rng.permutation(len(exprs))[:sentences_per_object]
            sents = []
            for k in sorted(pick.tolist()):
                raw = exprs[k]
                sents.append(
                    {"sent_id": next(sent_ids), "raw": raw, "sent": raw, "tokens": raw.split()}
                )
            refs.append({
                "ref_id": next(ref_ids), "ann_id": ann_id, "image_id": image_id,
                "category_id": cat_id, "split": split, "file_name": file_name,
                "sent_ids": [s["sent_id"] for s in sents], "sentences": sents,
            })
            counts[split] = counts.get(split, 0) + len(sents)
    with open(os.path.join(ds_dir, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    tmp = os.path.join(ds_dir, f"refs({SPLIT_BY}).p.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(refs, f, protocol=4)
    os.replace(tmp, os.path.join(ds_dir, f"refs({SPLIT_BY}).p"))  # written last: marks "complete"
    return counts


def is_complete(root: str) -> bool:
    """True when ``root`` holds a finished synthetic dataset (its refs file is written last)."""
    return os.path.isfile(os.path.join(root, DATASET_NAME, f"refs({SPLIT_BY}).p"))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output root (refer layout)")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sentences-per-object", type=int, default=3)
    p.add_argument("--unseen-fraction", type=float, default=0.1)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = generate(
        a.out, a.num_images, a.image_size, a.seed, a.sentences_per_object, a.unseen_fraction
    )
    print(
        f"wrote {sum(counts.values())} expressions {dict(sorted(counts.items()))} "
        f"to {a.out} in {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
