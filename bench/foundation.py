"""The foundation rows: jit forward throughput vs transformers, and ``load_hf`` vs
``from_pretrained``.

Heavy imports (jax, torch, transformers, jcompress) happen inside the functions, in the process
being measured.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

from bench.harness import REPO, Context, median, register, rss_mib, time_calls, xla_devices

# --------------------------------------------------------------------------- shared helpers


def shared_data() -> Path:
    """``$JCOMPRESS_SHARED_DATA`` or ``../shared/data`` next to the repository."""
    return Path(os.environ.get("JCOMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))


def llama_1m_dir() -> Path:
    """The trained llama-1m in the shared data; a clear error where it is missing."""
    return shared_model_dir("llama-1m")


def shared_model_dir(name: str) -> Path:
    """A trained model of the shared data (``llama-1m``, ``opt-1m``); a clear error where it
    is missing."""
    model_dir = shared_data() / "models" / name
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} not found (set JCOMPRESS_SHARED_DATA to the shared data directory)"
        )
    return model_dir


def _ids(vocab: int, batch: int, seq: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)


def _quiet_transformers() -> None:
    """No per-load tqdm bars from transformers in the benchmark output."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M params" if n >= 1e5 else f"{n / 1e3:.0f}K params"


# --------------------------------------------------------------------------- forward: sides


def _cpu_timed(fn):
    """``fn`` wrapped to also record the process CPU time of each call (all threads): on a
    shared machine a single-threaded side's CPU time hardly moves when the scheduler preempts
    it, while its wall time does. Returns ``(wrapped, cpu_seconds_list)``."""
    import time

    cpu: list[float] = []

    def call():
        c0 = time.process_time()
        out = fn()
        cpu.append(time.process_time() - c0)
        return out

    return call, cpu


def forward_mesh_spec(batch: int, devices: int, num_kv_heads: int) -> str | None:
    """The mesh the forward rows shard their jcompress side over on ``devices`` host devices:
    ``None`` for one device, ``data=N`` (batch rows split, no communication inside the
    forward) when the batch divides, else ``model=N`` (heads, MLP columns and vocabulary
    split; two all-reduces per layer) when the KV heads divide. Raises ``ValueError``
    otherwise."""
    if devices == 1:
        return None
    if batch % devices == 0:
        return f"data={devices}"
    if num_kv_heads % devices == 0:
        return f"model={devices}"
    raise ValueError(
        f"JCOMPRESS_BENCH_XLA_DEVICES={devices} divides neither the batch ({batch}) nor the "
        f"KV heads ({num_kv_heads})"
    )


def forward_jax(
    model_dir: str,
    vocab: int,
    batch: int,
    seq: int,
    repeats: int,
    warmup: int = 0,
    seed: int = 0,
    logits_out: str = "",
    devices: int = 1,
) -> dict[str, Any]:
    """jcompress side: ``load_hf`` + jit ``forward``; tokens/s over the timed repeats. With
    ``devices > 1`` (``JCOMPRESS_BENCH_XLA_DEVICES``; the process must have that many JAX
    devices) params and ids are placed on the :func:`forward_mesh_spec` mesh first (not
    timed) and the same jit forward runs partitioned by XLA."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jcompress
    from jcompress import sharding
    from jcompress.models import count_params
    from jcompress.models.forward import DEFAULT_ATTENTION

    jnp.zeros(()).block_until_ready()  # backend start-up is not part of the first call
    if jax.device_count() != devices:
        raise ValueError(f"expected {devices} JAX devices, the process has {jax.device_count()}")
    cfg, params = jcompress.load_hf(model_dir, dtype="float32")
    spec = forward_mesh_spec(batch, devices, cfg.num_kv_heads)
    ids = _ids(vocab, batch, seq, seed).astype(np.int32)
    if spec is None:
        ids = jnp.asarray(ids)
    else:
        mesh = sharding.make_mesh(spec)
        sharding.check_mesh(cfg, mesh)
        params = sharding.shard_params(params, cfg, mesh)
        ids = (
            sharding.shard_batch(ids, mesh)
            if spec.startswith("data")
            else (sharding.replicate(ids, mesh))
        )
    jax.block_until_ready(params)
    base = rss_mib()
    call, cpu = _cpu_timed(lambda: jcompress.forward(cfg, params, ids).block_until_ready())
    first, times, logits = time_calls(call, repeats, warmup=warmup)
    if logits_out:
        np.save(logits_out, np.asarray(logits[:, -1, :], np.float32))
    return {
        "value": batch * seq / median(times),
        "first_s": first,
        "median_s": median(times),
        "times_s": times,
        "cpu_median_s": median(cpu[1 + warmup :]),
        "cpu_s": cpu[1 + warmup :],
        "n_params": count_params(params),
        "base_rss_mib": base,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "attention": DEFAULT_ATTENTION,
        "mesh": spec or "one device",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def forward_torch(
    model_dir: str,
    vocab: int,
    batch: int,
    seq: int,
    repeats: int,
    warmup: int = 0,
    seed: int = 0,
    logits_out: str = "",
) -> dict[str, Any]:
    """Baseline side: ``AutoModelForCausalLM`` fp32 on CPU under ``torch.no_grad()``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.from_numpy(_ids(vocab, batch, seq, seed))
    base = rss_mib()
    with torch.no_grad():
        call, cpu = _cpu_timed(lambda: model(input_ids=ids, use_cache=False).logits)
        first, times, logits = time_calls(call, repeats, warmup=warmup)
    if logits_out:
        np.save(logits_out, logits[:, -1, :].float().numpy())
    return {
        "value": batch * seq / median(times),
        "first_s": first,
        "median_s": median(times),
        "times_s": times,
        "cpu_median_s": median(cpu[1 + warmup :]),
        "cpu_s": cpu[1 + warmup :],
        "n_params": sum(p.numel() for p in model.parameters()),
        "base_rss_mib": base,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


def _merge_rounds(runs: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """One side's result over its alternating processes: timings pooled (median over all
    timed calls), the first call and the other fields from the first process, peak memory the
    largest; ``round_median_s`` keeps each process's own median."""
    out = dict(runs[0])
    times = [t for r in runs for t in r["times_s"]]
    cpu = [c for r in runs for c in r["cpu_s"]]
    out.update(
        value=tokens / median(times),
        median_s=median(times),
        times_s=times,
        cpu_s=cpu,
        cpu_median_s=median(cpu),
        rounds=len(runs),
        round_median_s=[r["median_s"] for r in runs],
    )
    if all("peak_rss_mib" in r for r in runs):
        out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    return out


def _forward_pair(
    ctx: Context, model_dir: Path, batch: int, seq: int, repeats: int
) -> dict[str, Any]:
    """Both sides on the same checkpoint and token ids, plus a logits cross-check. After the
    (separately reported) first call, each side gets untimed warm-up calls (torch's oneDNN/MKL
    paths settle over the first few calls).

    The timed calls are split over ``rounds`` alternating processes per side (ours, theirs,
    ours, theirs, ...: 3 in a full run), and the medians are over all of them: this shared
    machine's speed drifts by up to 2x within minutes, and one process per side would put all
    of a drift between the two sides into the ratio."""
    import numpy as np

    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    warmup = ctx.pick(full=2, quick=2, dry=0)
    rounds = min(ctx.pick(full=3, quick=2, dry=1), repeats)
    kw = dict(
        model_dir=str(model_dir),
        vocab=vocab,
        batch=batch,
        seq=seq,
        repeats=-(-repeats // rounds),
        warmup=warmup,
    )
    load_before = os.getloadavg()
    devices = xla_devices()
    ours_runs, base_runs = [], []
    for r in range(rounds):
        tag = f" (round {r + 1}/{rounds})" if rounds > 1 else ""
        ours_runs.append(
            ctx.side(
                forward_jax,
                "jcompress forward"
                + (f" on {devices} XLA host devices" if devices > 1 else "")
                + tag,
                **kw,
                logits_out=str(ctx.tmp / "ours.npy"),
                devices=devices,
            )
        )
        base_runs.append(
            ctx.side(
                forward_torch,
                "transformers forward" + tag,
                **kw,
                logits_out=str(ctx.tmp / "base.npy"),
            )
        )
    ours, base = _merge_rounds(ours_runs, batch * seq), _merge_rounds(base_runs, batch * seq)
    a, b = np.load(ctx.tmp / "ours.npy"), np.load(ctx.tmp / "base.npy")
    diff = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b))) or 1.0
    if not diff <= 1e-2 * scale + 1e-3:
        raise AssertionError(f"jcompress and transformers logits disagree: max |diff| {diff:.3g}")
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{batch}x{seq}, {_millions(base['n_params'])}",
        "info": {
            "model_dir": str(model_dir),
            "batch": batch,
            "seq": seq,
            "repeats": kw["repeats"] * rounds,
            "rounds": rounds,
            "warmup": warmup,
            "last_token_logits_max_abs_diff": diff,
            # baseline / ours median CPU seconds per call (all threads): the speed ratio as
            # the preemption-free CPU time sees it when each side runs one thread
            # (JCOMPRESS_BENCH_THREADS=1); with more threads it compares total work instead
            "cpu_time_ratio": base["cpu_median_s"] / ours["cpu_median_s"],
            # JCOMPRESS_BENCH_XLA_DEVICES: jcompress sharded over that many host devices (the
            # baseline keeps torch's default threads)
            "xla_devices": devices,
            "mesh": ours["mesh"],
            # the machine is shared: 1/5/15-minute load averages around the two sides
            "loadavg": {"before": list(load_before), "after": list(os.getloadavg())},
            "n_params": {"ours": ours["n_params"], "baseline": base["n_params"]},
        },
    }


# --------------------------------------------------------------------------- forward: rows


@register(
    "forward_llama_1m",
    metric="tokens/s",
    higher_is_better=True,
    doc="jit forward vs transformers (CPU, fp32, no_grad) on the trained llama-1m",
)
def forward_llama_1m(ctx: Context) -> dict[str, Any]:
    model_dir = llama_1m_dir()
    batch, seq = ctx.pick(full=(4, 512), quick=(1, 128), dry=(1, 16))
    return _forward_pair(ctx, model_dir, batch, seq, ctx.repeats(full=10, quick=5))


@register(
    "forward_llama_1m_2048",
    metric="tokens/s",
    higher_is_better=True,
    doc="jit forward vs transformers (CPU, fp32, no_grad, SDPA) on the trained llama-1m at one "
    "2048-token sequence (past its 512 trained positions: RoPE runs there; speed only)",
)
def forward_llama_1m_2048(ctx: Context) -> dict[str, Any]:
    model_dir = llama_1m_dir()
    batch, seq = ctx.pick(full=(1, 2048), quick=(1, 2048), dry=(1, 8))
    return _forward_pair(ctx, model_dir, batch, seq, ctx.repeats(full=10, quick=5))


OPT_125M = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    ffn_dim=3072,
    vocab_size=50272,
    max_position_embeddings=2048,
    word_embed_proj_dim=768,
)
OPT_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=256,
    vocab_size=1000,
    max_position_embeddings=64,
    word_embed_proj_dim=64,
)


def build_random_opt(out_dir: str, shape: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """Random-init ``OPTForCausalLM`` of ``shape`` saved with ``save_pretrained`` (fp32)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    _quiet_transformers()

    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**shape)).to(torch.float32)
    model.save_pretrained(out_dir)
    return {"n_params": sum(p.numel() for p in model.parameters())}


@register(
    "forward_opt_125m",
    metric="tokens/s",
    higher_is_better=True,
    doc="jit forward vs transformers (CPU, fp32, no_grad) on a random OPT-125m-shaped model",
)
def forward_opt_125m(ctx: Context) -> dict[str, Any]:
    model_dir = ctx.tmp / "opt"
    shape = ctx.pick(full=OPT_125M, quick=OPT_125M, dry=OPT_TINY)
    ctx.side(build_random_opt, "build random OPT checkpoint", out_dir=str(model_dir), shape=shape)
    batch, seq = ctx.pick(full=(4, 512), quick=(1, 128), dry=(1, 16))
    out = _forward_pair(ctx, model_dir, batch, seq, ctx.repeats(full=5, quick=3))
    out["info"]["opt_shape"] = shape
    return out


# --------------------------------------------------------------------------- load_hf


def llama_hf_config(hidden: int, layers: int, heads: int, ffn: int, vocab: int) -> dict[str, Any]:
    """An HF ``config.json`` dict for a Llama of the given sizes (untied head, fp32)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


LLAMA_100M = dict(hidden=768, layers=11, heads=12, ffn=2048, vocab=16384)  # ~103M params
LLAMA_10M = dict(hidden=256, layers=8, heads=8, ffn=704, vocab=8192)  # ~10.6M params
LLAMA_TINY = dict(hidden=64, layers=2, heads=4, ffn=176, vocab=1000)


def _shard_limit(sizes: list[int], shards: int) -> int:
    """Smallest per-file byte limit at which next-fit packing of ``sizes`` (in order, as
    ``save_hf`` does) makes at most ``shards`` files; next-fit is monotone in the limit."""

    def count(limit: int) -> int:
        n, cur = 1, 0
        for s in sizes:
            if cur and cur + s > limit:
                n, cur = n + 1, 0
            cur += s
        return n

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if count(mid) <= shards:
            hi = mid
        else:
            lo = mid + 1
    return lo


def build_sharded_llama(
    out_dir: str, shape: dict[str, int], shards: int, seed: int = 0
) -> dict[str, Any]:
    """Random Llama via ``init_params`` + ``save_hf`` into exactly ``shards`` safetensors files."""
    import jax
    import numpy as np

    import jcompress
    from jcompress.models import config_from_hf, count_params
    from jcompress.models.families import spec_for

    cfg = config_from_hf(llama_hf_config(**shape))
    params = jcompress.init_params(cfg, jax.random.PRNGKey(seed))
    sizes = [int(np.prod(rule.hf_shape(cfg))) * 4 for rule, _, _ in spec_for("llama").table(cfg)]
    limit = _shard_limit(sizes, shards)
    jcompress.save_hf(cfg, params, out_dir, max_shard_bytes=limit)
    files = sorted(p.name for p in Path(out_dir).glob("*.safetensors"))
    if len(files) != shards:
        raise AssertionError(f"wanted {shards} shards, save_hf wrote {len(files)}: {files}")
    return {
        "n_params": count_params(params),
        "shards": files,
        "max_shard_bytes": limit,
        "bytes": sum((Path(out_dir) / f).stat().st_size for f in files),
    }


def load_jax(model_dir: str, repeats: int) -> dict[str, Any]:
    """jcompress side: ``load_hf`` wall time (params blocked until ready)."""
    import jax
    import jax.numpy as jnp

    import jcompress
    from jcompress.models import count_params

    jnp.zeros(()).block_until_ready()
    base = rss_mib()
    n = {}

    def load():
        _, params = jcompress.load_hf(model_dir)
        n["params"] = count_params(params)
        return jax.block_until_ready(params)

    first, times, _ = time_calls(load, repeats, between=gc.collect)
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "n_params": n["params"],
        "base_rss_mib": base,
    }


def _touch(model) -> None:
    """Fault in every weight page: transformers maps safetensors lazily (zero-copy), so without
    this its load time and RSS would not include reading the weights at all."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()


def load_torch(model_dir: str, repeats: int) -> dict[str, Any]:
    """Baseline side: ``AutoModelForCausalLM.from_pretrained`` (fp32, CPU) wall time, then one
    read of every weight page (:func:`_touch`), so both sides end with the weights resident.
    ``lazy_s`` times ``from_pretrained`` alone. The first load also checks that transformers
    found every tensor (no missing / unexpected / mismatched keys)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    base = rss_mib()
    check: dict[str, Any] = {}
    lazy: list[float] = []

    def load():
        t0 = time.perf_counter()
        if not check:
            model, info = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, output_loading_info=True
            )
            check["problems"] = {k: list(v) for k, v in info.items() if v}
            check["n_params"] = sum(p.numel() for p in model.parameters())
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lazy.append(time.perf_counter() - t0)
        _touch(model)
        return model

    first, times, _ = time_calls(load, repeats, between=gc.collect)
    if check["problems"]:
        raise AssertionError(
            f"transformers did not load the checkpoint cleanly: {check['problems']}"
        )
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "lazy_s": median(lazy[1:]),
        "n_params": check["n_params"],
        "base_rss_mib": base,
    }


@register(
    "load_hf_4shard",
    metric="load s",
    higher_is_better=False,
    doc="jcompress.load_hf vs AutoModelForCausalLM.from_pretrained on a 4-shard random Llama",
)
def load_hf_4shard(ctx: Context) -> dict[str, Any]:
    model_dir = ctx.tmp / "llama"
    shape = ctx.pick(full=LLAMA_100M, quick=LLAMA_10M, dry=LLAMA_TINY)
    built = ctx.side(
        build_sharded_llama,
        "build 4-shard checkpoint",
        out_dir=str(model_dir),
        shape=shape,
        shards=4,
    )
    repeats = ctx.repeats(full=5, quick=3)
    ours = ctx.side(load_jax, "jcompress.load_hf", model_dir=str(model_dir), repeats=repeats)
    base = ctx.side(load_torch, "from_pretrained", model_dir=str(model_dir), repeats=repeats)
    if not ours["n_params"] == base["n_params"] == built["n_params"]:
        raise AssertionError(
            f"param counts differ: built {built['n_params']}, load_hf {ours['n_params']}, "
            f"transformers {base['n_params']}"
        )
    return {
        "ours": ours,
        "baseline": base,
        "size": f"4 shards, {_millions(built['n_params'])}",
        "info": {
            "shape": shape,
            "repeats": repeats,
            "checkpoint_bytes": built["bytes"],
            "max_shard_bytes": built["max_shard_bytes"],
            "shards": built["shards"],
        },
    }
