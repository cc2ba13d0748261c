"""Text sources and window selection."""

from __future__ import annotations

import json
import time

import polars as pl
import pytest
import torch

from kernelscope.data import load_text, make_windows, tokenize
from kernelscope.errors import KernelscopeError
from tests.conftest import WIKITEXT_TEST


def test_windows_first_are_consecutive_and_tail_dropped():
    ids = torch.arange(1030)
    w = make_windows(ids, 256, 2)
    assert w.tokens.tolist() == [list(range(256)), list(range(256, 512))]
    assert w.starts == [0, 256] and w.available == 4 and w.dropped_tokens == 6
    assert "2 of 4 non-overlapping 256-token windows (the first 2, in text order)" in w.describe()
    assert make_windows(ids, 256).tokens.shape == (4, 256)
    assert "all of them" in make_windows(ids, 256).describe()


def test_windows_random_are_seeded_distinct_and_in_text_order():
    ids = torch.arange(10_000)
    a = make_windows(ids, 100, 10, selection="random", seed=3)
    b = make_windows(ids, 100, 10, selection="random", seed=3)
    c = make_windows(ids, 100, 10, selection="random", seed=4)
    assert a.starts == b.starts and a.sha256 == b.sha256
    assert a.starts != c.starts
    assert a.starts == sorted(set(a.starts)) and all(s % 100 == 0 for s in a.starts)
    for row, start in zip(a.tokens.tolist(), a.starts, strict=True):
        assert row == list(range(start, start + 100))  # non-overlapping, aligned windows
    assert "seed 3" in a.describe()


@pytest.mark.parametrize(("seqlen", "nsamples", "message"), [
    (0, 1, "--seqlen must be at least 1"),
    (10, 0, "--nsamples must be at least 1"),
    (10, -2, "--nsamples must be at least 1"),
    (200, 1, "fewer than one window"),
    (10, 11, "asks for more windows than the 10"),
])
def test_window_errors(seqlen, nsamples, message):
    with pytest.raises(KernelscopeError, match=message):
        make_windows(torch.arange(100), seqlen, nsamples)


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n\nworld", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"})
                                      + "\n")
    pl.DataFrame({"text": ["hello", "world"], "id": [1, 2]}).write_parquet(tmp_path / "c.parquet")
    texts = [load_text(str(tmp_path / n)) for n in ("a.txt", "b.jsonl", "c.parquet")]
    assert [t.text for t in texts] == ["hello\n\nworld"] * 3
    assert len({t.sha256 for t in texts}) == 1


def test_pydoc_is_offline_english_prose():
    t = load_text("pydoc")
    assert len(t.text) > 300_000 and "the" in t.text


@pytest.mark.skipif(not WIKITEXT_TEST.is_file(), reason="../shared/data is not beside this checkout")
def test_wikitext_file_is_read_whole_as_it_is():
    t = load_text(str(WIKITEXT_TEST))
    assert t.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert t.sha256 == "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


@pytest.mark.parametrize(("content", "name", "message"), [
    (b"", "empty.txt", "is empty"),
    (b"  \n\n ", "blank.txt", "is empty"),
    (b"\x00\x01\x02binary", "bin.txt", "binary"),
    (b"caf\xe9", "latin1.txt", "not UTF-8"),
    (b'{"text": "a"}\n{"nope": 1}\n', "bad.jsonl", "bad.jsonl:2 has no string field 'text'"),
    (b'{"text": "a"}\nnot json\n', "bad2.jsonl", "bad2.jsonl:2 is not valid JSON"),
    (b"PAR1garbage", "bad.parquet", "not a readable parquet"),
])
def test_bad_text_files(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(KernelscopeError, match=message):
        load_text(str(path))


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(KernelscopeError, match="text file not found"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(KernelscopeError, match="unknown dataset 'wikitext3'"):
        load_text("wikitext3")


def test_hub_datasets_fail_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    for name in ("wikitext2", "c4", "pileval"):
        with pytest.raises(KernelscopeError, match="needs the Hugging Face hub"):
            load_text(name)
    assert time.perf_counter() - start < 5


def test_tokenize_whole_text(tokenizer):
    ids = tokenize(tokenizer, "def f():\n    return 1\n" * 50)
    assert ids.dtype == torch.int64 and ids.dim() == 1 and ids.numel() > 50
