"""``jcompress.calibration``: batching, the layer stream, and the grouped Gram accumulation.

Oracles are written here, independently of the code under test: one full ``forward`` with
capture over all windows at once (the stream runs batches layer by layer), ``apply_layer`` on
all windows for replaced layers, float64 numpy for statistics and errors, and the
per-window Python loop ``compress`` used before the jitted accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress.calibration import (
    Feed,
    GroupedGram,
    batches,
    grouped_gram_init,
    grouped_gram_update,
    head_gram,
    stream_layers,
)
from jcompress.eval.perplexity import window_nll

N, T, BS = 7, 32, 3  # 7 windows in batches of 3: the last batch has 2 padding rows
K = "self_attn/k_proj"


@pytest.fixture(scope="module")
def llama(llama_dir):
    cfg, params = jcompress.load_hf(llama_dir)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (N, T), np.int32)
    return cfg, params, windows


@pytest.fixture(scope="module")
def oracle(llama):
    """Every layer's inputs and outputs and k_proj outputs from one full forward."""
    cfg, params, windows = llama
    cap = jcompress.Capture(
        inputs=r"model/layers/\d+", outputs=r"model/layers/\d+(/self_attn/k_proj)?"
    )
    _, got = jcompress.forward(cfg, params, jnp.asarray(windows), capture=cap)
    return {
        i: {
            "in": np.asarray(got["inputs"][f"model/layers/{i}"]),
            "out": np.asarray(got["outputs"][f"model/layers/{i}"]),
            "k": np.asarray(got["outputs"][f"model/layers/{i}/{K}"]),
        }
        for i in range(cfg.num_layers)
    }


def _real(parts, bl):
    return np.concatenate([np.asarray(p)[: b.real] for p, b in zip(parts, bl, strict=True)])


def test_batches_pad_with_repeats():
    w = np.arange(7 * 2).reshape(7, 2)
    bl = batches(w, 3)
    assert [(b.real, b.start) for b in bl] == [(3, 0), (3, 3), (1, 6)]
    assert all(b.ids.shape == (3, 2) for b in bl)
    np.testing.assert_array_equal(bl[2].ids, w[[6, 6, 6]])
    np.testing.assert_array_equal(np.concatenate([b.ids[: b.real] for b in bl]), w)
    assert [b.ids.shape for b in batches(w, 50)] == [(7, 2)]  # never wider than n
    with pytest.raises(jcompress.UserError, match="batch_size"):
        batches(w, 0)


def test_batches_fewer_windows_than_the_data_axis():
    w = np.arange(3 * 2).reshape(3, 2)
    # 3 windows over data=8: one batch of 8 rows, 3 real, padded by the last window
    (b,) = batches(w, 8, multiple=8)
    assert (b.real, b.start, b.ids.shape) == (3, 0, (8, 2))
    np.testing.assert_array_equal(b.ids, w[[0, 1, 2, 2, 2, 2, 2, 2]])
    # 3 over data=2 with batches of 8: 4 rows (the next multiple), not 8
    assert [(b.real, b.ids.shape) for b in batches(w, 8, multiple=2)] == [(3, (4, 2))]
    # never past batch_size: 7 windows, batches of 4 over data=4
    w7 = np.arange(7 * 2).reshape(7, 2)
    assert [(b.real, b.ids.shape) for b in batches(w7, 4, multiple=4)] == [(4, (4, 2)), (3, (4, 2))]


@pytest.mark.parametrize("offload", [False, True])
def test_stream_matches_forward_capture(llama, oracle, offload, tmp_path):
    cfg, params, windows = llama
    kw = dict(batch_size=BS, offload_dir=str(tmp_path) if offload else None)
    seen = []
    for layer in stream_layers(cfg, params, windows, **kw):
        i = layer.index
        assert layer.path == f"model/layers/{i}"
        bl = layer.batches
        ins = _real(layer.inputs, bl)
        obs = list(layer.observe(jcompress.Capture(outputs=K)))
        assert [o.real for o in obs] == [3, 3, 1]
        outs = _real([o.outputs for o in obs], bl)
        ks = _real([o.captured["outputs"][K] for o in obs], bl)
        for got, want in ((ins, "in"), (outs, "out"), (ks, "k")):
            np.testing.assert_allclose(got, oracle[i][want], rtol=1e-5, atol=1e-5)
        if offload:
            assert len(list(tmp_path.iterdir())) == 0  # unlinked temporary files only
        seen.append((ins, outs))
    assert len(seen) == cfg.num_layers
    assert list(tmp_path.iterdir()) == []


def test_offload_gives_identical_arrays(llama, tmp_path):
    cfg, params, windows = llama
    a = [np.asarray(next(iter(l.observe())).outputs) for l in stream_layers(cfg, params, windows)]
    b = [
        np.asarray(next(iter(l.observe())).outputs)
        for l in stream_layers(cfg, params, windows, offload_dir=str(tmp_path))
    ]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _damped(lp):
    """A different layer: o_proj scaled by 0.5 (same shapes)."""
    lp = jax.tree.map(lambda x: x, lp)
    lp["self_attn"]["o_proj"]["kernel"] = lp["self_attn"]["o_proj"]["kernel"] * 0.5
    return lp


@pytest.mark.parametrize("feed", [Feed.ORIGINAL, Feed.REPLACED])
@pytest.mark.parametrize("observe", [False, True])
def test_replace_and_feed_next(llama, oracle, feed, observe):
    """Layer 0 is replaced; layer 1's inputs are the original layer 0 outputs (ORIGINAL) or
    those of the replaced layer 0 (REPLACED), whether or not layer 0 was observed."""
    cfg, params, windows = llama
    stream = stream_layers(cfg, params, windows, batch_size=BS, feed=feed)
    layer0 = next(stream)
    if observe:
        for _ in layer0.observe():
            pass
    new0 = _damped(layer0.params)
    layer0.replace(new0)
    layer1 = next(stream)
    got = _real(layer1.inputs, layer1.batches)
    if feed is Feed.ORIGINAL:
        want = oracle[0]["out"]
    else:
        want = np.asarray(jcompress.apply_layer(cfg, new0, jnp.asarray(oracle[0]["in"]), 0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="moved on"):
        layer0.replace(new0)
    stream.close()


def test_relative_error_excludes_padding(llama, oracle):
    cfg, params, windows = llama
    stream = stream_layers(cfg, params, windows, batch_size=BS)  # keep it referenced
    layer = next(stream)
    assert float(layer.relative_error(layer.params)) == 0.0
    new = _damped(layer.params)
    y = oracle[0]["out"].astype(np.float64)
    y2 = np.asarray(jcompress.apply_layer(cfg, new, jnp.asarray(oracle[0]["in"]), 0), np.float64)
    want = np.linalg.norm(y2 - y) / np.linalg.norm(y)
    # with the 2 padding rows (copies of window 6) counted, the error would differ
    padded = np.concatenate([y, y[-1:], y[-1:]]), np.concatenate([y2, y2[-1:], y2[-1:]])
    assert abs(np.linalg.norm(padded[1] - padded[0]) / np.linalg.norm(padded[0]) - want) > 1e-4
    assert float(layer.relative_error(new)) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("avg_dim", [1, 2, 7])
def test_stream_statistics_exclude_padding(llama, oracle, avg_dim):
    """Grouped k_proj Grams over the stream (7 windows, batches of 3) equal the float64 Gram
    of the group means of exactly the 7 windows (remainder dropped)."""
    cfg, params, windows = llama
    hk = cfg.num_kv_heads
    stream = stream_layers(cfg, params, windows, batch_size=BS)
    layer = next(stream)
    acc = GroupedGram(n=N, avg_dim=avg_dim, heads=hk)
    for ob in layer.observe(jcompress.Capture(outputs=K)):
        acc.add((ob.captured["outputs"][K],), ob.real)
    g = N // avg_dim
    assert (acc.groups, acc.dropped) == (g, N % avg_dim)
    k = oracle[0]["k"].astype(np.float64)[: g * avg_dim]
    means = k.reshape(g, avg_dim, T, -1).mean(1).reshape(g * T, hk, -1)
    want = np.einsum("nhd,nhe->hde", means, means)
    np.testing.assert_allclose(np.asarray(acc.gram), want, rtol=1e-4, atol=1e-4 * want.max())


def _old_group_averager(batches_, avg_dim, n, heads):
    """The per-window loop ``compress`` ran before the jitted step (float64 here): windows
    summed one by one into the open group, its mean's per-head Gram added when it fills;
    windows past ``(n // avg_dim) * avg_dim`` and padding rows are skipped."""
    limit = (n // avg_dim) * avg_dim
    gram, acc, seen = None, None, 0
    for xs, real in batches_:
        for b in range(real):
            if seen >= limit:
                seen += 1
                continue
            row = [np.asarray(x[b], np.float64) for x in xs]
            acc = row if acc is None else [a + r for a, r in zip(acc, row, strict=True)]
            seen += 1
            if seen % avg_dim == 0:
                for p in acc:
                    m = (p / avg_dim).reshape(-1, heads, p.shape[-1] // heads)
                    g = np.einsum("nhd,nhe->hde", m, m)
                    gram = g if gram is None else gram + g
                acc = None
    return gram


@pytest.mark.parametrize(
    "n,bs,avg_dim", [(11, 4, 3), (11, 4, 1), (11, 4, 5), (11, 4, 11), (12, 4, 2), (9, 2, 4)]
)
def test_grouped_gram_equals_per_window_loop(n, bs, avg_dim):
    heads, t, c = 3, 5, 12
    rng = np.random.default_rng(n * 100 + avg_dim)
    x = [rng.normal(size=(n, t, c)).astype(np.float32) for _ in range(2)]  # two sources
    padded = []
    for s in range(0, n, bs):
        xs = [a[s : s + bs] for a in x]
        real = xs[0].shape[0]
        # padding rows hold garbage: they must not count
        xs = [np.concatenate([a, np.full((bs - real, t, c), 1e3, np.float32)]) for a in xs]
        padded.append((xs, real))
    acc = GroupedGram(n=n, avg_dim=avg_dim, heads=heads)
    for xs, real in padded:
        acc.add(tuple(jnp.asarray(a) for a in xs), real)
    want = _old_group_averager(padded, avg_dim, n, heads)
    np.testing.assert_allclose(
        np.asarray(acc.gram), want, rtol=1e-5, atol=1e-5 * np.abs(want).max()
    )
    assert (acc.groups, acc.dropped, acc.seen) == (n // avg_dim, n % avg_dim, n)


def test_grouped_gram_update_is_pure_and_compiled_once():
    """The step is pure (the input state is untouched) and offset/valid are traced: new
    offsets and counts reuse one compilation."""
    s0 = grouped_gram_init(2, 3, 4)
    x = (jnp.ones((2, 3, 4)),)
    g1 = np.asarray(head_gram(jnp.ones((3, 4)), 2))
    a = grouped_gram_update(s0, x, jnp.int32(0), jnp.int32(2), avg_dim=2)
    compiled = grouped_gram_update._cache_size()
    # one window closes an open group whose (zero) partial held one window: mean = x / 2
    b = grouped_gram_update(s0, x, jnp.int32(1), jnp.int32(1), avg_dim=2)
    assert grouped_gram_update._cache_size() == compiled
    np.testing.assert_allclose(np.asarray(a.gram), g1)
    np.testing.assert_allclose(np.asarray(b.gram), g1 / 4)
    np.testing.assert_allclose(np.asarray(a.partial[0]), 0)
    np.testing.assert_allclose(np.asarray(b.partial[0]), 0)
    # with both windows valid, the second opens a new group: the partial holds it
    c = grouped_gram_update(s0, x, jnp.int32(1), jnp.int32(2), avg_dim=2)
    np.testing.assert_allclose(np.asarray(c.gram), g1 / 4)
    np.testing.assert_allclose(np.asarray(c.partial[0]), 1)
    assert np.asarray(s0.gram).sum() == 0 and np.asarray(s0.partial[0]).sum() == 0


@pytest.mark.parametrize("bs", [3, 8])
def test_perplexity_batching_unchanged(llama, bs):
    """Per-window NLLs are the same whatever the batch size (padding rows dropped)."""
    cfg, params, windows = llama
    ids = windows.reshape(-1)
    r = jcompress.perplexity(cfg, params, ids, seqlen=T, batch_size=bs, progress=False)
    want = np.concatenate(
        [np.asarray(window_nll(cfg, params, jnp.asarray(w[None]))) for w in windows]
    )
    assert r.n_windows == N
    np.testing.assert_allclose(r.nlls, want, rtol=1e-5, atol=1e-5)
    assert r.ppl == pytest.approx(float(np.exp(np.mean(want.astype(np.float64)))), rel=1e-5)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("high", r"^calib: token ids must lie in \[0, {V}\)$"),
        ("negative", r"^calib: token ids must lie in \[0, {V}\)$"),
        ("empty", r"^calib: expected integer token ids \[nsamples, seqlen\], got int32\[0, 32\]"),
        ("float", r"^calib: expected integer token ids \[nsamples, seqlen\], got float32\[7, 32"),
    ],
)
def test_stream_refuses_bad_windows_before_work(llama, bad, msg):
    """An id outside the vocabulary would be clamped by the embedding gather into a silently
    wrong number: the stream (and so every method and analysis built on it) refuses it, as it
    refuses empty or non-integer windows, before the first layer runs."""
    cfg, params, windows = llama
    w = {
        "high": windows.copy(),
        "negative": windows.copy(),
        "empty": windows[:0],
        "float": windows.astype(np.float32),
    }[bad]
    if bad == "high":
        w[3, 5] = cfg.vocab_size
    elif bad == "negative":
        w[0, 0] = -1
    with pytest.raises(jcompress.UserError, match=msg.replace("{V}", str(cfg.vocab_size))):
        next(stream_layers(cfg, params, w, batch_size=BS))
