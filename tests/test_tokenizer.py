"""Prepare's two BPE libraries: fastokens where it is installed and agrees with tiktoken (the reference), tiktoken
otherwise; the same shard bytes either way."""

import importlib.util

import numpy as np
import pytest

from conftest import FIXTURE, cli_args, digest, main, one_line_error, tiny_cfg

needs_fastokens = pytest.mark.skipif(not importlib.util.find_spec("fastokens"), reason="pip install fastokens")
FIXTURE_TASK = (FIXTURE, 0, 0, 60)  # every article of the fixture, as one worker task


def prepared(out_dir, tokenizer, num_proc=1):
    """(out_dir's files by sha256, the lines prepare logged)."""
    lines = []
    main.prepare(tiny_cfg(out_dir, shard_tokens=20000, num_proc=num_proc, tokenizer=tokenizer), log=lines.append)
    return digest(out_dir), lines


def without_fastokens(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastokens" else real(name, *a))


class Unlike:
    """fastokens' tokenizer, except that one text's first token comes out one higher."""

    def __init__(self, text):
        self.real, self.text = main.get_fastokens(), text

    def encode_batch_flat(self, texts):
        ids, offsets = self.real.encode_batch_flat(texts)
        ids = np.frombuffer(ids, np.uint32).copy()
        ids[np.frombuffer(offsets, np.uint64)[:-1][[t == self.text for t in texts]].astype(np.intp)] += 1
        return ids.tobytes(), offsets


@needs_fastokens
def test_fastokens_agrees_with_tiktoken_on_the_hard_strings_and_every_fixture_article():
    assert main.first_disagreement(FIXTURE_TASK) is None


@needs_fastokens
def test_eos_goes_at_the_batch_offsets_also_around_empty_articles():
    texts = ["", "Hello world", "", "", "<|endoftext|> it's", ""]
    assert main.encode_articles(texts, "fastokens").tolist() == main.encode_articles(texts, "tiktoken").tolist()
    assert main.encode_articles(texts, "fastokens").tolist()[:3] == [main.EOS_ID, main.EOS_ID, 15496]


@needs_fastokens
@pytest.mark.parametrize("num_proc", [1, 2])
def test_shards_manifest_and_fingerprint_are_byte_identical_whichever_tokenizer_ran(tmp_path, num_proc):
    fast, fast_lines = prepared(tmp_path / "fast", "fastokens", num_proc)
    slow, slow_lines = prepared(tmp_path / "slow", "tiktoken", num_proc)
    assert fast == slow and "(fastokens)" in fast_lines[-1] and "(tiktoken)" in slow_lines[-1]


@needs_fastokens
def test_shards_made_by_one_tokenizer_are_reused_by_the_other(tmp_path):
    made, _ = prepared(tmp_path, "tiktoken")
    again, lines = prepared(tmp_path, "fastokens")
    assert again == made and "reusing" in lines[-1]


@needs_fastokens
@pytest.mark.parametrize("which", ["hard string", "article"])
def test_a_disagreement_falls_back_to_tiktoken_with_one_line_naming_the_string(tmp_path, monkeypatch, which):
    text = main.HARD_STRINGS[-1] if which == "hard string" else main.read_rows(*FIXTURE_TASK)[2]
    reference, _ = prepared(tmp_path / "reference", "tiktoken")
    unlike = Unlike(text)
    monkeypatch.setattr(main, "get_fastokens", lambda: unlike)
    got, lines = prepared(tmp_path / "out", "fastokens")
    assert got == reference and "(tiktoken)" in lines[-1]
    assert [line for line in lines if "disagree" in line] == [
        f"prepare: fastokens and tiktoken disagree on {text[:60]!r}... ({len(text):,} characters); "
        "tokenizing with tiktoken"
    ]


def test_auto_tokenizes_with_tiktoken_when_fastokens_is_not_installed(tmp_path, monkeypatch):
    without_fastokens(monkeypatch)
    assert "(tiktoken)" in prepared(tmp_path, "auto")[1][-1]


def test_asking_for_fastokens_when_it_is_not_installed_is_one_line(tmp_path, monkeypatch, capsys):
    without_fastokens(monkeypatch)
    one_line_error(capsys, cli_args(tmp_path, tokenizer="fastokens", prepare_only=True), "pip install fastokens")
    assert not (tmp_path / "manifest.json").exists()


def rss_mb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


@needs_fastokens
def test_the_fastokens_word_cache_stops_growing_however_many_new_words_come(monkeypatch):
    main.get_fastokens.cache_clear()  # a fresh tokenizer, with an empty cache
    rng, letters = np.random.default_rng(0), np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", np.uint8)

    def new_words(n):  # n words of 10 random letters, none seen before, in articles of 2,000 words
        text = letters[np.hstack([np.zeros((n, 1), int), rng.integers(1, 27, (n, 10))])].tobytes().decode()
        main.encode_articles([text[i : i + 22000] for i in range(0, len(text), 22000)], "fastokens")

    for _ in range(4):
        new_words(500_000)  # past where the library caps its cache
    full = rss_mb()
    for _ in range(2):
        new_words(500_000)  # before the cap, a million new words took ~95 MB more
    assert rss_mb() - full < 20, f"RSS {full:.0f} MB -> {rss_mb():.0f} MB over 1M more new words"
