"""Run by ``tests/test_perplexity.py`` in a subprocess at XLA backend optimization level 1
(``_xla_flags.optimized_env``): the shared baselines' perplexities are whole forward passes
over real text, compute-bound, which the suite's ``-O0`` (set for its compile-bound tests)
would run ~3x slower. Prints one JSON line ``{"model|data|seqlen|windows": [ppl, n_windows]}``.

Usage: ``python _perplexity_baselines.py SHARED_DATA CASE [CASE ...]`` with ``CASE`` =
``model|data|seqlen|windows`` (``windows``: a count, or ``all``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jcompress
from jcompress.data import load_tokenizer, load_tokens


def main(shared: Path, cases: list[str]) -> dict:
    models, tokens, out = {}, {}, {}
    for case in cases:
        model, data, seqlen, windows = case.split("|")
        if model not in models:
            models[model] = jcompress.load_hf(shared / "models" / model)
        if data not in tokens:  # both models share one tokenizer file
            tokens[data] = load_tokens(shared / data, load_tokenizer(shared / "models" / model))
        cfg, params = models[model]
        kw = dict(batch_size=16) if windows == "all" else dict(max_windows=int(windows))
        r = jcompress.perplexity(cfg, params, tokens[data], seqlen=int(seqlen), progress=False,
                                 **kw)  # fmt: skip
        out[case] = [float(r.ppl), int(r.n_windows)]
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:])))
