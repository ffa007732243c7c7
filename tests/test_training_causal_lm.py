"""The causal-LM task (:mod:`wasi.training.causal_lm`): token windows."""

from __future__ import annotations

import pytest

from conftest import word_tokenizer
from wasi.data import DataError
from wasi.training.causal_lm import make_lm_split, token_windows


def test_windows_cut_the_joined_documents_into_equal_pieces():
    tokenizer = word_tokenizer()
    windows = token_windows(["the cat sat", "on a mat while dogs"], tokenizer, 3)
    flat = [t for w in windows for t in w]
    eos = tokenizer.eos_token_id
    assert all(len(w) == 3 for w in windows) and len(windows) == 3  # 3 + 1 + 5 + 1 = 10 ids -> 3 full windows
    assert flat[3] == eos and flat[:3] == tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    with pytest.raises(DataError, match="fewer than 64 tokens"):
        make_lm_split(["the cat"], tokenizer, 64, "test")
