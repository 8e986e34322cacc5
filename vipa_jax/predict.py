"""Single-image inference: image + referring expression -> mask PNG, overlay, relevance heatmaps.

Steps: read the image with PIL (any mode, EXIF orientation applied), resize + ImageNet-normalise
with the data pipeline's :func:`~vipa_jax.data.pipeline.preprocess_image`, tokenize, run the
model once (jitted), upsample the logits to the original size (bilinear, align_corners) and
threshold at 0. Outputs (``out`` = the mask path, default ``<image stem>_mask.png``):

* ``out``                            binary mask (0/255) at the original image size
* ``<out stem>_overlay.png``         tinted mask + outline + the expression as a caption
* with heatmaps: ``<out stem>_heat_00_cls.png`` ([CLS]) and ``_heat_<k>_<word piece>.png``
  (each word piece): VEG step-1 cosine relevance S_c, min-max normalised, over the image.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import PIL.Image
from PIL import ImageOps

from vipa_jax import viz
from vipa_jax.data.pipeline import preprocess_image
from vipa_jax.data.refer import DataError, load_rgb
from vipa_jax.metrics import upsample_logits_to


class PredictError(ValueError):
    """Bad input for prediction (unreadable image, empty expression)."""


def load_image(path: str | Path) -> np.ndarray:
    """Any PIL-readable image -> uint8 RGB (H, W, 3), EXIF-rotated, alpha over white."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation tag
            if orientation in (None, 1):
                data: str | bytes = str(path)
            else:  # rotate with PIL, then hand lossless PNG bytes to the shared RGB converter
                buf = io.BytesIO()
                ImageOps.exif_transpose(im).save(buf, format="PNG")
                data = buf.getvalue()
        return load_rgb(data, f"image {path}")
    except DataError as e:
        raise PredictError(str(e)) from e
    except (OSError, ValueError, SyntaxError) as e:
        raise PredictError(f"image {path}: cannot decode image ({e})") from e


def _safe(name: str) -> str:
    """A token -> file-name-safe text ('##ing' -> 'ing')."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name.removeprefix("##")).strip("_") or "tok"


@dataclasses.dataclass
class Prediction:
    """One prediction at the original image size."""

    image: np.ndarray  # uint8 (H, W, 3)
    text: str
    mask: np.ndarray  # bool (H, W)
    logits: np.ndarray  # float32 (H, W), upsampled
    relevance: np.ndarray  # float32 (T, h, w): [CLS] then each word piece (no [SEP]/padding)
    tokens: list[str]  # T names: '[CLS]', then word pieces


class Predictor:
    """A model + variables + tokenizer with a jitted single-example forward pass."""

    def __init__(self, model: Any, variables: Any, tokenizer: Any, image_size: int) -> None:
        from vipa_jax.models.vipa import with_inference_cache

        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        n = int(model.config.max_tokens)
        # inference: what depends on the params alone (`with_inference_cache`) once, not per call
        self.variables = with_inference_cache(
            model, variables, jax.ShapeDtypeStruct((1, self.image_size, self.image_size, 3),
                                                   np.float32),
            *[jax.ShapeDtypeStruct((1, n), np.int32)] * 2)
        self._vocab = Path(tokenizer.vocab_path).read_text(encoding="utf-8").splitlines()
        self._fwd = jax.jit(lambda v, img, ids, m: model.apply(v, img, ids, m, train=False))

    @classmethod
    def from_checkpoint(cls, path: str | Path, step: int | None = None,
                        vocab: str | None = None) -> Predictor:
        """From an inference bundle or a training checkpoint (see :func:`export.load_any`)."""
        from vipa_jax.export import load_any

        loaded = load_any(path, step, vocab)
        return cls(loaded.model, loaded.variables, loaded.tokenizer,
                   loaded.config.model.image_size)

    def token_name(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id``."""
        return self._vocab[token_id] if 0 <= token_id < len(self._vocab) else f"[{token_id}]"

    def __call__(self, image: np.ndarray, text: str) -> Prediction:
        """Predict the mask of ``text`` in ``image`` (uint8 RGB (H, W, 3))."""
        if not isinstance(text, str) or not text.strip():
            raise PredictError(f"empty referring expression: {text!r}")
        try:
            ids, mask = self.tokenizer.encode(text)
        except ValueError as e:
            raise PredictError(f"cannot tokenize the expression {text!r}: {e}") from e
        x = preprocess_image(image, self.image_size)[None]
        out = self._fwd(self.variables, x, ids[None], mask[None])
        logits = np.asarray(jax.device_get(out["logits"][0]), np.float32)  # (S, S)
        up = upsample_logits_to(logits, image.shape[:2])
        rel = np.asarray(jax.device_get(out["relevance"][0]), np.float32)  # (L, h, w)
        n = int(mask.sum())
        keep = [0, *range(1, n - 1)]  # [CLS] and the word pieces; [SEP] and padding dropped
        names = ["[CLS]", *(self.token_name(int(i)) for i in ids[1:n - 1])]
        return Prediction(image=image, text=text, mask=up > 0, logits=up, relevance=rel[keep],
                          tokens=names)


def output_paths(image_path: str | Path, out: str | Path | None) -> tuple[Path, Path]:
    """(mask path, overlay path) for an image and an optional ``--out``."""
    mask_path = Path(out) if out else Path(f"{Path(image_path).stem}_mask.png")
    if mask_path.suffix.lower() != ".png":
        mask_path = mask_path.with_suffix(".png")
    return mask_path, mask_path.with_name(f"{mask_path.stem}_overlay.png")


def save_prediction(pred: Prediction, mask_path: str | Path, heatmaps: bool = False) -> list[Path]:
    """Write the mask, the overlay and (optionally) the heatmaps; returns the written paths."""
    mask_path = Path(mask_path)
    written = [viz.save_png(pred.mask, mask_path)]
    overlay_path = mask_path.with_name(f"{mask_path.stem}_overlay.png")
    written.append(viz.save_png(viz.overlay(pred.image, pred.mask, pred.text), overlay_path))
    if heatmaps:
        for k, (name, rel) in enumerate(zip(pred.tokens, pred.relevance, strict=True)):
            tag = "cls" if k == 0 else _safe(name)
            caption = f"{name} | {pred.text}" if k == 0 else f"'{name}' | {pred.text}"
            path = mask_path.with_name(f"{mask_path.stem}_heat_{k:02d}_{tag}.png")
            written.append(viz.save_png(viz.heatmap_overlay(pred.image, rel, caption), path))
    return written


def predict_file(predictor: Predictor, image_path: str | Path, text: str,
                 out: str | Path | None = None, heatmaps: bool = False) -> list[Path]:
    """Load ``image_path``, predict ``text``, write the outputs; returns the written paths."""
    if not isinstance(text, str) or not text.strip():
        raise PredictError(f"empty referring expression for image {image_path}: {text!r}")
    image = load_image(image_path)
    mask_path, _ = output_paths(image_path, out)
    return save_prediction(predictor(image, text), mask_path, heatmaps)


__all__ = ["PredictError", "Prediction", "Predictor", "load_image", "output_paths",
           "predict_file", "save_prediction"]
