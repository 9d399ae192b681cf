"""bench_scale's memory sampler: cheap per-second RSS from the kernel's counters, PSS only from
smaps at the peaks it samples there."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tests.bench.bench_scale import MemorySampler, tree_usage


def test_the_cheap_sample_has_the_same_rss_as_smaps_and_no_pss() -> None:
    cheap = tree_usage(os.getpid(), pss=False)
    full = tree_usage(os.getpid())
    assert set(cheap) == set(full)
    for role, usage in cheap.items():
        assert "pss" not in usage and "pss" in full[role]
        # the same process read twice a moment apart: the kernel's counters and smaps agree
        tolerance = max(8.0, 0.05 * full[role]["rss"])
        assert abs(usage["rss"] - full[role]["rss"]) <= tolerance, (usage, full[role])
        assert usage["cpu_s"] > 0


def test_a_sample_without_pss_moves_the_rss_peak_and_leaves_the_pss_peak() -> None:
    sampler = MemorySampler(SimpleNamespace(hospitals={}))  # type: ignore[arg-type]
    assert sampler.sample("h", {"daemon": {"rss": 100.0, "pss": 80.0, "anon": 50.0, "cpu_s": 1.0}})
    assert sampler.peak_pss["h"] == 80.0
    assert sampler.sample("h", {"daemon": {"rss": 120.0, "anon": 60.0, "cpu_s": 2.0}})
    assert sampler.peak["h"] == 120.0 and sampler.peak_pss["h"] == 80.0
    assert sampler.cpu["h"] == {"daemon": 2.0}
    assert not sampler.sample("h", {"daemon": {"rss": 110.0, "anon": 60.0, "cpu_s": 3.0}})



def test_pages_are_counted_once_again_only_after_rss_grew_and_the_bound_covers_the_growth(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.bench.bench_scale as bench_scale

    sampler = MemorySampler(SimpleNamespace(hospitals={}))  # type: ignore[arg-type]
    counts = iter([200.0, 230.0])
    monkeypatch.setattr(bench_scale, "union_mb", lambda pids: next(counts))
    assert sampler.sample("h", {"daemon": {"rss": 300.0, "anon": 50.0, "cpu_s": 1.0}})
    assert sampler.union_due("h", 0.0, 300.0)
    sampler.sample_union("h", [1], 300.0)
    assert sampler.union_bound("h") == 200.0
    # RSS crept up 1 % after the interval: no second count, the bound takes the growth
    assert sampler.sample("h", {"daemon": {"rss": 303.0, "anon": 50.0, "cpu_s": 2.0}})
    assert not sampler.union_due("h", 100.0, 303.0)
    assert sampler.union_bound("h") == 203.0
    # grown 10 %: counted again
    assert sampler.sample("h", {"daemon": {"rss": 330.0, "anon": 50.0, "cpu_s": 3.0}})
    assert sampler.union_due("h", 200.0, 330.0)
    sampler.sample_union("h", [1], 330.0)
    assert sampler.union_bound("h") == 230.0
