"""Text sources, tokenization and the window samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jcompress import UserError
from jcompress.data import (
    calibration_windows,
    eval_windows,
    load_tokenizer,
    load_tokens,
    read_text,
    tokenize,
)


def test_read_text_plain_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == "hello\nworld\n"
    rows = [{"text": "first doc", "url": "u"}, {"text": "second\ndoc"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_text(tmp_path / "b.jsonl") == "first doc\n\nsecond\ndoc"


@pytest.mark.parametrize(
    "content, msg",
    [
        ('{"text": "ok"}\n{"nope": 1}\n', ":2: JSONL objects need"),
        ("{bad json\n", ":1: not valid JSON"),
    ],
)
def test_read_text_bad_jsonl(tmp_path, content, msg):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(UserError, match=msg):
        read_text(tmp_path / "c.jsonl")


def test_read_text_missing(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        read_text(tmp_path / "missing.txt")


def test_c4_sample_joins_documents(shared_data):
    path = shared_data / "c4" / "validation-2k.jsonl"
    text = read_text(path)
    with open(path) as f:
        docs = [json.loads(line)["text"] for line in f]
    assert len(docs) == 2000
    assert text == "\n\n".join(docs)


def test_token_counts_match_baselines(shared_data, llama_dir):
    baselines = json.loads((shared_data / "baselines.json").read_text())
    tok = load_tokenizer(llama_dir)
    for rel in ("wikitext-2-raw/test.txt", "tinyshakespeare/input.txt"):
        ids = load_tokens(shared_data / rel, tok)
        assert ids.dtype == np.int32
        assert ids.shape == (baselines["llama-1m"][rel]["tokens"],)


def test_tokenize_matches_transformers(llama_dir):
    tok = load_tokenizer(llama_dir)
    text = "The history of the Australian forces"
    assert tokenize(tok, text).tolist() == tok(text)["input_ids"]


def test_load_tokenizer_needs_files(tmp_path):
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_calibration_windows_follow_gptq_protocol():
    import random

    ids = np.arange(1000, dtype=np.int32)
    w = calibration_windows(ids, nsamples=5, seqlen=32, seed=2)
    rng = random.Random(2)
    starts = [rng.randint(0, 1000 - 32 - 1) for _ in range(5)]
    np.testing.assert_array_equal(w, np.stack([ids[s : s + 32] for s in starts]))
    np.testing.assert_array_equal(w, calibration_windows(ids, nsamples=5, seqlen=32, seed=2))
    assert not np.array_equal(w, calibration_windows(ids, nsamples=5, seqlen=32, seed=3))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"nsamples": 0, "seqlen": 8}, "nsamples"),
        ({"nsamples": 2, "seqlen": 1}, "seqlen"),
        ({"nsamples": 2, "seqlen": 100}, "longer than"),
    ],
)
def test_calibration_windows_bad_input(kwargs, msg):
    with pytest.raises(UserError, match=msg):
        calibration_windows(np.arange(50), **kwargs)


def test_calibration_windows_errors_name_the_callers_flags():
    ids, kw = (
        np.arange(50),
        dict(nsamples_arg="--cn", seqlen_arg="--length", text="--cn_text a.txt"),
    )
    with pytest.raises(UserError) as e:
        calibration_windows(ids, 41, 10, **kw)  # 40 distinct starts
    want = ("--cn: 41 windows of 10 tokens from --cn_text a.txt (50 tokens); "
            "allowed: at most 40 (its distinct start positions at --length 10)")  # fmt: skip
    assert str(e.value) == want
    assert calibration_windows(ids, 40, 10, **kw).shape == (40, 10)
    with pytest.raises(UserError, match=r"^--length: 49-token windows need a text longer than 50 "
                       r"tokens; --cn_text a.txt has 50$"):  # fmt: skip
        calibration_windows(ids, 1, 49, **kw)
    with pytest.raises(UserError, match="^--cn: must be a positive integer"):
        calibration_windows(ids, 0, 10, **kw)
    # limit="tokens": the windows together hold at most the text's 50 tokens
    assert calibration_windows(ids, 5, 10, limit="tokens", **kw).shape == (5, 10)
    with pytest.raises(UserError) as e:
        calibration_windows(ids, 6, 10, limit="tokens", **kw)
    assert str(e.value) == ("--cn: 6 windows of 10 tokens from --cn_text a.txt need 60 tokens; "
                            "it has 50 (allowed: at most 5 windows at --length 10)")  # fmt: skip
    with pytest.raises(UserError, match=r"^--length: 10-token windows .*; --cn_text a.txt has 0$"):
        calibration_windows(np.zeros(0, np.int32), 1, 10, **kw)  # empty: short, not "ids"
    with pytest.raises(UserError, match="^limit: must be 'starts' or 'tokens'"):
        calibration_windows(ids, 1, 10, limit="text")


def test_eval_windows_errors_name_the_callers_flags():
    """The evaluation windows' rule (at least one whole window) in the same words as the
    calibration windows', with the caller's flag names; an empty text is a short one."""
    kw = dict(seqlen_arg="--eval_seqlen", max_windows_arg="--max_windows", text="--data a.txt")
    assert eval_windows(np.arange(10), 10, **kw).shape == (1, 10)
    with pytest.raises(UserError) as e:
        eval_windows(np.arange(9), 10, **kw)
    assert str(e.value) == (
        "--eval_seqlen: 10-token windows need a text of at least 10 tokens; --data a.txt has 9"
    )
    with pytest.raises(UserError, match=r"^--eval_seqlen: 10-token .*; --data a.txt has 0$"):
        eval_windows(np.zeros(0, np.int32), 10, **kw)
    with pytest.raises(UserError, match=r"^--max_windows: must be a positive integer, got 0$"):
        eval_windows(np.arange(20), 10, 0, **kw)
    with pytest.raises(UserError, match=r"^seqlen: 10-token windows .*; the text has 9$"):
        eval_windows(np.arange(9), 10)  # library defaults


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 500), seqlen=st.integers(2, 64), k=st.one_of(st.none(), st.integers(1, 20)))
def test_eval_windows_are_consecutive_and_capped(n, seqlen, k):
    ids = np.arange(n)
    if n < seqlen:
        with pytest.raises(UserError):
            eval_windows(ids, seqlen, k)
        return
    w = eval_windows(ids, seqlen, k)
    expect = n // seqlen if k is None else min(n // seqlen, k)
    assert w.shape == (expect, seqlen)
    np.testing.assert_array_equal(w.reshape(-1), ids[: expect * seqlen])
