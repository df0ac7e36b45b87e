"""``jcompress.perplexity`` reproduces the shared fp32 baselines and transformers' window losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import jcompress
from jcompress.data import eval_windows, load_tokenizer, load_tokens

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
    # Both models share one tokenizer file; tokenize each text once.
    tok = load_tokenizer(llama_dir)
    return {rel: load_tokens(shared_data / rel, tok) for rel in DATASETS}


@pytest.mark.parametrize("model", ["llama-1m", "opt-1m"])
@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("seqlen", [256, 512])
def test_baselines_40_windows(models, tokens, baselines, model, data, seqlen):
    _, cfg, params = models[model]
    r = jcompress.perplexity(
        cfg, params, tokens[data], seqlen=seqlen, max_windows=40, progress=False
    )
    ref = baselines[model][data][f"seqlen{seqlen}_windows40"]
    assert r.n_windows == baselines[model][data][f"seqlen{seqlen}_windows40_n"]
    assert abs(r.ppl / ref - 1) < 1e-3, (r.ppl, ref)


@pytest.mark.slow
def test_baseline_all_windows_wikitext(models, tokens, baselines):
    model = "llama-1m"  # the 40-window tests cover opt-1m; one full pass keeps CI short
    _, cfg, params = models[model]
    data = "wikitext-2-raw/test.txt"
    r = jcompress.perplexity(cfg, params, tokens[data], seqlen=512, progress=False, batch_size=16)
    assert r.n_windows == baselines[model][data]["seqlen512_windowsall_n"] == 858
    assert abs(r.ppl / baselines[model][data]["seqlen512_windowsall"] - 1) < 1e-3


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
