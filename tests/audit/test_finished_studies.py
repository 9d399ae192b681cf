"""Finished studies in the auditor's fold: spilled to a temporary SQLite file, the verification
of an export reads exactly as with every study in memory, and the file goes when it is done.
(Every ledger rule also runs with the studies spilled: tests/audit/test_ledger.py.)"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest

from audit import verify
from audit.finished_studies import FinishedStudies
from audit.generate import generate_log


def _verify(raw: bytes, log: object) -> verify.VerifyReport:
    report = verify.verify_lines(io.BytesIO(raw), log.checkpoint(), log.trust,  # type: ignore[attr-defined]
                                 workers=0)
    assert report.ok and report.ledger is not None, report.problem
    return report


def test_a_spilled_fold_reports_what_the_fold_in_memory_does(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    log = generate_log(600, seed=5)
    raw = b"".join(line + b"\n" for line in log.lines())
    in_memory = _verify(raw, log)
    made: list[FinishedStudies[object]] = []
    real_init = FinishedStudies.__init__

    def recording_init(self: FinishedStudies[object], *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(FinishedStudies, "__init__", recording_init)
    monkeypatch.setattr(verify, "STUDIES_IN_MEMORY", 1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    spilled = _verify(raw, log)
    assert made and made[0].spilled and len(made[0]) > 2  # the fold did use its file
    assert spilled.ledger == in_memory.ledger and spilled.kinds == in_memory.kinds
    assert (spilled.entries, spilled.root) == (in_memory.entries, in_memory.root)
    made[0].close()
    assert not list(tmp_path.iterdir())


def test_without_a_writable_temporary_folder_the_studies_stay_in_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(prefix: str) -> str:
        raise PermissionError(13, "Permission denied", "/tmp")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    studies: FinishedStudies[tuple[int, str]] = FinishedStudies(
        1, lambda study: study, lambda study_id, row: (int(str(row[0])), str(row[1])), 2)
    for number in range(4):
        studies[f"s-{number}"] = (number, "closed")
        studies.finished(f"s-{number}", studies[f"s-{number}"])
    assert not studies.spilled and len(studies) == 4 and studies.get("s-3") == (3, "closed")
    assert "s-0" in studies and "s-9" not in studies
