"""The dry run of the second half of the benchmark rows (the first half, the options and the
plumbing: ``test_bench.py``): a file of its own so pytest-xdist can run both halves at once."""

from __future__ import annotations

from _bench_run import all_names, dry_run, halves


def test_dry_run_second_half(tmp_path, shared_data):
    names = all_names()
    _, second = halves(names)
    assert second
    dry_run(tmp_path, second)
