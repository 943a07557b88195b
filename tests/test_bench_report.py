"""The benchmark's reporting rules: where a run writes, and what a figure below its noise says."""

from __future__ import annotations

from pathlib import Path

from bench.__main__ import RESULTS, output_dir
from bench.common import added_cost, added_text, median_noise


def test_only_a_full_run_writes_the_committed_results() -> None:
    assert output_dir(None, quick=False, only=None) == RESULTS
    assert output_dir(None, quick=True, only=None) == RESULTS / "quick"
    assert output_dir(None, quick=False, only=["fanout"]) == RESULTS / "raw" / "only-fanout"
    assert output_dir(Path("/tmp/x"), quick=True, only=None) == Path("/tmp/x")


def test_quick_results_are_git_ignored() -> None:
    ignored = (RESULTS.parent.parent / ".gitignore").read_text().splitlines()
    assert "bench/results/quick/" in ignored


def test_a_negative_added_cost_reads_as_within_noise() -> None:
    # The quick run's "-7.1 µs per event": the hop looked faster than direct.
    diff, noise = added_cost([10.0e-6, 11.0e-6, 12.0e-6], [17.0e-6, 18.0e-6, 19.0e-6])
    assert diff < 0
    assert added_text(diff, noise, 1, 1e6) == "within noise"


def test_a_difference_inside_the_spread_reads_as_within_noise() -> None:
    diff, noise = added_cost([1.0, 5.0, 9.0, 2.0, 8.0], [1.5, 4.5, 8.5, 2.5, 7.0])
    assert 0 < diff <= noise
    assert added_text(diff, noise, 1) == "within noise"


def test_a_clear_added_cost_is_printed() -> None:
    diff, noise = added_cost([20.0, 20.5, 21.0, 20.2], [10.0, 10.5, 10.2, 10.1])
    assert added_text(diff, noise, 1) == "10.2"


def test_one_sample_has_no_noise_estimate() -> None:
    assert median_noise([3.0]) == float("inf")
    assert added_text(5.0, median_noise([3.0])) == "within noise"
