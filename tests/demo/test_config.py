"""The demo's configuration for more hospitals than its story's three (tests/bench/bench_scale.py
runs 3, 10 and 25): hospital ids, and the study request the researcher sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from exchange.demo.consortium import DemoConfig, hospital_ids, study_body


def test_hospital_ids_follow_the_demo_naming_and_refuse_impossible_counts() -> None:
    assert hospital_ids(3) == ("hospital-a", "hospital-b", "hospital-c")
    assert hospital_ids(25)[-1] == "hospital-y" and len(set(hospital_ids(25))) == 25
    for bad in (0, 27):
        with pytest.raises(ValueError, match=r"^hospitals: between 1 and 26"):
            hospital_ids(bad)


def test_the_study_request_carries_the_minimum_and_the_aggregation_choice(tmp_path: Path) -> None:
    default = study_body(DemoConfig(out=tmp_path))
    assert default["min_hospitals"] == 2 and "secure_aggregation" not in default  # the exchange decides
    scaled = study_body(DemoConfig(out=tmp_path, hospitals=10, min_hospitals=10, secure_aggregation=True))
    assert scaled["min_hospitals"] == 10 and scaled["secure_aggregation"] is True
    assert DemoConfig(out=tmp_path, hospitals=10).hospital_ids[-1] == "hospital-j"
