"""``jcompress.perplexity`` reproduces the shared fp32 baselines and transformers' window losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _xla_flags import optimized_env
from transformers import AutoModelForCausalLM

import jcompress
from jcompress.data import eval_windows, load_tokenizer, load_tokens

HERE = Path(__file__).resolve().parent
DATASETS = ("wikitext-2-raw/test.txt", "c4/validation-2k.jsonl", "tinyshakespeare/input.txt")


@pytest.fixture(scope="module")
def baselines(shared_data):
    return json.loads((shared_data / "baselines.json").read_text())


@pytest.fixture(scope="module")
def models(llama_dir, opt_dir):
    return {
        "llama-1m": (llama_dir, *jcompress.load_hf(llama_dir)),
        "opt-1m": (opt_dir, *jcompress.load_hf(opt_dir)),
    }


@pytest.fixture(scope="module")
def tokens(shared_data, llama_dir):
    # the in-process tests' text (the baselines tokenize theirs in their subprocess); both
    # models share one tokenizer file
    rel = "wikitext-2-raw/test.txt"
    return {rel: load_tokens(shared_data / rel, load_tokenizer(llama_dir))}


MODELS = ("llama-1m", "opt-1m")
SEQLENS = (256, 512)


def _optimized_run(shared_data, cases: list[str]) -> dict:
    """``tests/_perplexity_baselines.py`` on ``cases`` in a subprocess at XLA backend
    optimization level 1 (:func:`_xla_flags.optimized_env`): whole passes over real text are
    compute-bound, the one kind of test the suite's ``-O0`` slows down."""
    p = subprocess.run(
        [sys.executable, str(HERE / "_perplexity_baselines.py"), str(shared_data), *cases],
        capture_output=True, text=True, env=optimized_env(), timeout=900,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def windows40(shared_data):
    """The 40-window perplexity of every model x text x seqlen, in one subprocess."""
    cases = [f"{m}|{d}|{s}|40" for m in MODELS for d in DATASETS for s in SEQLENS]
    return _optimized_run(shared_data, cases)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("seqlen", SEQLENS)
def test_baselines_40_windows(windows40, baselines, model, data, seqlen):
    ppl, n = windows40[f"{model}|{data}|{seqlen}|40"]
    ref = baselines[model][data][f"seqlen{seqlen}_windows40"]
    assert n == baselines[model][data][f"seqlen{seqlen}_windows40_n"]
    assert abs(ppl / ref - 1) < 1e-3, (ppl, ref)


@pytest.mark.slow
def test_baseline_all_windows_wikitext(shared_data, baselines):
    model = "llama-1m"  # the 40-window tests cover opt-1m; one full pass keeps CI short
    data = "wikitext-2-raw/test.txt"
    case = f"{model}|{data}|512|all"
    ppl, n = _optimized_run(shared_data, [case])[case]
    assert n == baselines[model][data]["seqlen512_windowsall_n"] == 858
    assert abs(ppl / baselines[model][data]["seqlen512_windowsall"] - 1) < 1e-3


@pytest.mark.parametrize("model", ["llama-1m", "opt-1m"])
def test_window_losses_match_transformers(models, tokens, model):
    model_dir, cfg, params = models[model]
    ids = tokens["wikitext-2-raw/test.txt"]
    r = jcompress.perplexity(
        cfg, params, ids, seqlen=128, max_windows=6, batch_size=4, progress=False
    )
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    windows = eval_windows(ids, 128, 6)
    with torch.no_grad():
        ref = [
            hf(
                torch.tensor(w[None].astype(np.int64)),
                labels=torch.tensor(w[None].astype(np.int64)),
            ).loss.item()
            for w in windows
        ]
    np.testing.assert_allclose(r.nlls, ref, rtol=0, atol=2e-5)
    assert r.n_windows == 6 and r.seqlen == 128
    np.testing.assert_allclose(r.ppl, np.exp(np.mean(ref)), rtol=1e-5)


def test_bad_arguments(models, tokens):
    _, cfg, params = models["opt-1m"]
    ids = tokens["wikitext-2-raw/test.txt"]
    with pytest.raises(jcompress.UserError, match="batch_size"):
        jcompress.perplexity(cfg, params, ids, seqlen=64, batch_size=0)
    with pytest.raises(jcompress.UserError, match="learned positions"):
        jcompress.perplexity(cfg, params, ids, seqlen=1024)
    with pytest.raises(jcompress.UserError, match="max_windows"):
        jcompress.perplexity(cfg, params, ids, seqlen=64, max_windows=0)
