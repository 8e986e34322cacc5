"""Segment what a sentence refers to in an image.

``python predict.py --checkpoint DIR --image photo.jpg --text "the man on the left"
[--out out.png] [--heatmap]``, or a batch ``--jsonl pairs.jsonl`` with one
``{"image": path, "text": str, "out": optional path}`` per line. DIR is an inference bundle
(``python -m vipa_jax.export``) or a training workdir / checkpoint. Writes the binary mask at the
original image size, an overlay with the expression as caption, and with ``--heatmap`` the VEG
relevance maps of [CLS] and of each word piece. Exits non-zero on any failed input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Inference bundle or training checkpoint.")
_IMAGE = flags.DEFINE_string("image", None, "Input image (any format PIL reads).")
_TEXT = flags.DEFINE_string("text", None, "Referring expression.")
_OUT = flags.DEFINE_string("out", None, "Mask PNG path (default: <image stem>_mask.png).")
_JSONL = flags.DEFINE_string("jsonl", None, "Batch mode: JSON lines {image, text, out?}.")
_HEATMAP = flags.DEFINE_bool("heatmap", False, "Also write [CLS]/word relevance heatmaps.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (training checkpoints only).")
_VOCAB = flags.DEFINE_string("vocab", None, "vocab.txt override.")
flags.mark_flags_as_required(["checkpoint"])


def _jobs() -> list[tuple[str, str, str | None, str]]:
    """(image, text, out, where) for the single or the batch mode."""
    if _JSONL.value:
        if _IMAGE.value or _TEXT.value:
            raise app.UsageError("use either --jsonl or --image/--text, not both")
        path = Path(_JSONL.value)
        if not path.is_file():
            raise app.UsageError(f"--jsonl file not found: {path}")
        jobs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise app.UsageError(f"{where}: invalid JSON ({e})") from e
            if not isinstance(row, dict) or "image" not in row or "text" not in row:
                raise app.UsageError(f'{where}: need an object with "image" and "text"')
            jobs.append((str(row["image"]), str(row["text"]), row.get("out"), where))
        return jobs
    if not _IMAGE.value or _TEXT.value is None:
        raise app.UsageError("give --image and --text (or --jsonl)")
    return [(_IMAGE.value, _TEXT.value, _OUT.value, "--image/--text")]


def main(argv: list[str]) -> None:
    """Entry point."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vipa_jax.backend import enable_compilation_cache
    from vipa_jax.predict import PredictError, Predictor, predict_file

    jobs = _jobs()
    enable_compilation_cache()
    predictor = Predictor.from_checkpoint(_CHECKPOINT.value, _STEP.value, _VOCAB.value)
    failed = 0
    for image, text, out, where in jobs:
        try:
            paths = predict_file(predictor, image, text, out, _HEATMAP.value)
        except PredictError as e:
            failed += 1
            print(f"error ({where}): {e}", file=sys.stderr)
            continue
        print(f"{image}: wrote {', '.join(str(p) for p in paths)}")
    if failed:
        print(f"{failed} of {len(jobs)} input(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
