"""jcompress.ged.analyze and its activation capture: captured MLP activations against
transformers forward hooks (torch, every family, pre and post hook, varying sentence
lengths), token positions from a real tokenizer, the bad-input errors (before any model
work), and the whole pipeline on llama-1m / opt-1m against fit() on hook activations."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _tiny import make_model, save_model
from transformers import AutoModelForCausalLM

import jcompress
from jcompress.data import load_tokenizer
from jcompress.errors import UserError
from jcompress.ged import (
    HER_FILE,
    HIM_FILE,
    CaptureConfig,
    GEDConfig,
    analyze,
    capture_activations,
    fit,
    load_condition_file,
    resolve_hook,
    tokenize_examples,
)
from jcompress.ged.capture import resolve_layers
from jcompress.models.families import spec_for

FAMILIES = ("llama", "qwen2", "opt", "mpt", "gpt2")


def _hf_module(cfg, layer: int, rel: str) -> str:
    """The transformers module name of a jcompress module path inside layer ``layer``."""
    root = spec_for(cfg.family.value).layout.layers
    return f"{root}/{layer}/{rel}".replace("/", ".")


def _torch_hook_acts(model, module: str, side: str, ids: list[np.ndarray]) -> list[np.ndarray]:
    """Each sentence run alone (no padding) through the torch model; the module's output
    (``side='output'``) or input recorded by a forward hook: ``[T_i, D]`` per sentence (OPT
    flattens ``[1, T, D]`` to ``[T, D]`` around fc1/fc2; both reshape the same)."""
    got = []
    mod = model.get_submodule(module)

    def keep(x):
        got.append(x.detach().float().reshape(-1, x.shape[-1]))

    if side == "output":
        h = mod.register_forward_hook(lambda m, a, out: keep(out))
    else:
        h = mod.register_forward_pre_hook(lambda m, a: keep(a[0]))
    try:
        with torch.no_grad():
            for x in ids:
                model(torch.tensor(x[None], dtype=torch.long))
    finally:
        h.remove()
    return [g.numpy() for g in got]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    model = make_model(request.param)
    d = save_model(model, tmp_path_factory.mktemp(request.param) / "hf")
    cfg, params = jcompress.load_hf(d)
    return model, cfg, params


def test_capture_matches_torch_hooks(tiny):
    """pre (expansion output) and post (down-projection input) at every layer, sentences of
    different lengths right-padded into one batch, positions anywhere in the sentence."""
    model, cfg, params = tiny
    rng = np.random.default_rng(0)
    lengths = (5, 11, 8, 3)
    ids = [rng.integers(0, 128, n).astype(np.int32) for n in lengths]
    positions = [np.array([n - 1]) for n in lengths[:2]] + [np.array([0, 4, 7]), np.arange(3)]
    lay = spec_for(cfg.family.value).layout
    for name, rel, side in (("pre", lay.up, "output"), ("post", lay.down, "input")):
        hook = resolve_hook(cfg, CaptureConfig(hook=name))
        assert (hook.path, hook.side) == (rel, side)
        assert hook.width == cfg.intermediate_size
        got = capture_activations(cfg, params, ids, positions, hook, [1, 0], batch_size=3)
        assert got.shape == (2, sum(p.size for p in positions), cfg.intermediate_size)
        for j, layer in enumerate((1, 0)):
            ref = _torch_hook_acts(model, _hf_module(cfg, layer, rel), side, ids)
            want = np.concatenate([r[p] for r, p in zip(ref, positions, strict=True)])
            np.testing.assert_allclose(got[j], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_regex_hook(tiny):
    """A regex hook names exactly one module; the input side of the pre-hook's module is the
    MLP input, which torch sees too."""
    model, cfg, params = tiny
    lay = spec_for(cfg.family.value).layout
    hook = resolve_hook(cfg, CaptureConfig(hook=f"(?:{re.escape(lay.up)})", side="input"))
    assert (hook.path, hook.side, hook.width) == (lay.up, "input", cfg.hidden_size)
    ids = [np.arange(6, dtype=np.int32) + 3]
    got = capture_activations(cfg, params, ids, [np.arange(6)], hook, [0])
    ref = _torch_hook_acts(model, _hf_module(cfg, 0, lay.up), "input", ids)[0]
    np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    with pytest.raises(UserError, match="matches no module output.*there are:"):
        resolve_hook(cfg, CaptureConfig(hook="no_such_module"))
    with pytest.raises(UserError, match=r"matches \d+ \("):
        resolve_hook(cfg, CaptureConfig(hook=".*proj.*|.*fc.*|.*c_.*"))


# --------------------------------------------------------------------------- text side


@pytest.fixture(scope="module")
def llama(llama_dir):
    cfg, params = jcompress.load_hf(llama_dir)
    return cfg, params, load_tokenizer(llama_dir)


def test_tokenize_positions(llama):
    _, _, tok = llama
    him = load_condition_file(HIM_FILE)[:20]
    t = tokenize_examples(tok, him, "target")
    assert all(p.size == 1 for p in t.positions)
    for x, p, e in zip(t.ids, t.positions, him, strict=True):
        word = tok.decode([int(x[p[0]])]).strip()
        assert word == e.text[e.span[0] : e.span[1]] == "him"
        # the prefix up to and including the target tokenizes to the same ids
        assert list(tok(e.text[: e.span[1]])["input_ids"]) == list(x[: p[0] + 1])
    last = tokenize_examples(tok, him, "last")
    assert [int(p[0]) for p in last.positions] == [x.size - 1 for x in last.ids]
    every = tokenize_examples(tok, ["a b c", "[him] d"], "all")
    assert [p.tolist() for p in every.positions] == [list(range(x.size)) for x in every.ids]
    # a multi-token target: its last token
    t = tokenize_examples(tok, ["The [bakery] is open."], "target")
    full = tok("The bakery")["input_ids"]
    assert int(t.positions[0][0]) == len(full) - 1


def test_text_errors(llama):
    _, _, tok = llama
    with pytest.raises(UserError, match=r"him\[1\]: expected exactly one \[target\]"):
        tokenize_examples(tok, ["I saw [him].", "I saw him."], "target", what="him")
    with pytest.raises(UserError, match="no sentences"):
        tokenize_examples(tok, [], "target")
    with pytest.raises(UserError, match="position: must be one of"):
        tokenize_examples(tok, ["[a]"], "middle")
    with pytest.raises(UserError, match=r"empty \[target\]"):
        tokenize_examples(tok, ["a [ ] b"], "target")


def test_config_and_layer_errors(llama):
    cfg, _, _ = llama
    for kw, msg in (
        (dict(position="first"), "position: must be one of target, last, all"),
        (dict(side="both"), "side: must be one of"),
        (dict(hook="("), "hook: '\\(' is not a valid regex"),
        (dict(layers=(0, 0)), "layers: repeated"),
        (dict(layers=(-1,)), "layers: must be a tuple"),
        (dict(batch_size=0), "batch_size: must be a positive integer"),
    ):
        with pytest.raises(UserError, match=msg):
            CaptureConfig(**kw)
    with pytest.raises(
        UserError, match=r"layers: layer 4 out of range \(the model has layers 0..3"
    ):
        resolve_layers(cfg, CaptureConfig(layers=(1, 4)))
    assert resolve_layers(cfg, CaptureConfig()) == (0, 1, 2, 3)


# --------------------------------------------------------------------------- end to end


def _hf_acts(model, module_fmt, examples, tok, layer):
    """Oracle: transformers' own model (from the checkpoint), a forward hook on the expansion
    output, the target token's row."""
    t = tokenize_examples(tok, examples, "target")
    acts = _torch_hook_acts(model, module_fmt.format(layer), "output", list(t.ids))
    return np.stack([a[p[0]] for a, p in zip(acts, t.positions, strict=True)])


@pytest.mark.parametrize("which", ["llama"])  # opt-1m end to end: tests/test_ged_cli.py
def test_analyze_end_to_end(which, llama_dir, opt_dir, tmp_path):
    model_dir = {"llama": llama_dir, "opt": opt_dir}[which]
    module = {"llama": "model.layers.{}.mlp.up_proj", "opt": "model.decoder.layers.{}.fc1"}
    cfg, params = jcompress.load_hf(model_dir)
    tok = load_tokenizer(model_dir)
    # 42 = 3 folds of 14: every fold's fits in one shape (uneven folds: test_ged.py)
    him, her = load_condition_file(HIM_FILE)[:42], load_condition_file(HER_FILE)[:42]
    config = GEDConfig(n_permutations=50, n_folds=3)
    res = analyze(
        cfg, params, him, her, tokenizer=tok, config=config,
        capture=CaptureConfig(layers=(1,)), labels=("him", "her"), progress=False,
    )  # fmt: skip
    assert res.layers == (1,) and res.acts_s.shape == (1, 42, cfg.intermediate_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    want_s = _hf_acts(model, module[which], him, tok, 1)
    want_r = _hf_acts(model, module[which], her, tok, 1)
    tol = 1e-4 * np.abs(want_s).max()
    np.testing.assert_allclose(res.acts_s[0], want_s, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(res.acts_r[0], want_r, rtol=1e-4, atol=tol)
    ref = fit(want_s, want_r, config=config)
    r = res.table.results[0]
    assert r.n_components == ref.n_components
    np.testing.assert_allclose(r.eigenvalues[:5], ref.eigenvalues[:5], rtol=2e-3)
    assert r.swapped is not None
    assert 0 < res.table.p_value[0] <= 1 and 0 <= res.table.accuracy[0] <= 1
    js = json.loads(json.dumps(res.to_json()))
    assert js["hook"]["path"] == spec_for(cfg.family.value).layout.up
    assert js["layers"][0]["layer"] == 1 and js["best_layer"] == 1
    assert "| 1 |" in res.to_markdown()
    paths = res.figures(tmp_path / "fig")
    assert len(paths) == 5 and all(p.stat().st_size > 1000 for p in paths)


def test_analyze_checks_before_work(llama):
    cfg, params, tok = llama
    him = load_condition_file(HIM_FILE)[:3]
    with pytest.raises(UserError, match="her: 3 samples, need at least 5"):
        analyze(cfg, params, him * 2, him, tokenizer=tok, labels=("him", "her"))
    with pytest.raises(UserError, match="layers: layer 9 out of range"):
        analyze(cfg, None, him, him, tokenizer=tok, capture=CaptureConfig(layers=(9,)))
    with pytest.raises(UserError, match="matches no module"):
        analyze(cfg, None, him, him, tokenizer=tok, capture=CaptureConfig(hook="nothing"))
    with pytest.raises(UserError, match="expected exactly one"):
        analyze(cfg, None, ["no mark"] * 6, him * 2, tokenizer=tok)
