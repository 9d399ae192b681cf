"""Hostile files fed to every `audit` command that reads one (issue 19's fuzz suite, audit part).

Each property writes an export (or a trust, state or earlier-checkpoint file) holding one
hostile thing (deep nesting, huge and non-finite numbers, control and bidirectional characters,
lone surrogates, invalid UTF-8, duplicate keys, truncated and oversized lines, entries with
hostile payload values) and runs the real command through Typer's CliRunner. Every run must end
with the documented exit code and a refusal that names the entry or the file and says why, in
printable text (no raw control or bidi characters), with a JSON report under `verify --json`,
and never with an exception. 235 hostile files per run (the `max_examples` below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.cli import app
from audit.generate import GeneratedLog, generate_log
from tests.conftest import REPO_ROOT
from tests.hostile import (
    hostile_chars,
    hostile_documents,
    hostile_values,
    printable_output,
)

ENTRIES = 6
#: The folder fixture hands out fresh copies per example, so a function-scoped fixture is fine.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])
runner = CliRunner()
#: The click command the `audit` console script runs, built once (Typer's CliRunner rebuilds it on
#: every call, which costs more than the verification of a small export).
AUDIT = typer.main.get_command(app)


@pytest.fixture(scope="module")
def log() -> GeneratedLog:
    return generate_log(ENTRIES, seed=19)


@pytest.fixture(scope="module")
def export(log: GeneratedLog, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "log"
    log.write(folder)
    return folder


@pytest.fixture
def folder(export: Path) -> Iterator[Callable[[], Path]]:
    """Makes scratch copies of the export (hypothesis runs many examples per test function)."""
    made: list[Path] = []

    def copy() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="hostile-")))
        for name in ("entries.jsonl", "checkpoint", "trust.json"):
            (made[-1] / name).write_bytes((export / name).read_bytes())
        return made[-1]

    yield copy
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def invoke(*args: str) -> Result:
    result = runner.invoke(AUDIT, list(args))
    output = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{args[0]} raised {type(result.exception).__name__}: {result.exception}")
    assert "Traceback" not in output
    # whatever hostile text a refusal quotes comes out printable
    assert printable_output(output), ascii(output[:500])
    return result


# -- strategies ------------------------------------------------------------------------------------


@st.composite
def hostile_lines(draw: st.DrawFn, lines: list[bytes]) -> bytes:
    """One line that is no valid entry: a hostile value as the line, inside a real entry's
    payload or envelope, a truncated or byte-mangled real entry, or random bytes."""
    original = draw(st.sampled_from(lines))
    how = draw(st.sampled_from(["whole", "payload", "envelope", "truncated", "mangled", "random"]))
    if how == "whole":
        return draw(hostile_values).encode("utf-8", "surrogatepass")
    if how in ("payload", "envelope"):
        obj: dict[str, Any] = json.loads(original)
        target = obj["payload"] if how == "payload" and obj["payload"] else obj
        target[draw(st.sampled_from(sorted(target)))] = "@@HOSTILE@@"
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.replace('"@@HOSTILE@@"', draw(hostile_values)).encode("utf-8", "surrogatepass")
    if how == "truncated":
        return original[:draw(st.integers(0, len(original) - 1))]
    if how == "mangled":
        at = draw(st.integers(0, len(original)))
        junk = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"\r", b"\xef\xbb\xbf",
                                     "\u202e".encode(), b"\x1b[31m"]))
        return original[:at] + junk + original[at:]
    return draw(st.binary(min_size=0, max_size=300)).replace(b"\n", b" ")


def _with_line(lines: list[bytes], position: int, line: bytes) -> bytes:
    hostile = list(lines)
    hostile[position] = line
    return b"".join(item + b"\n" for item in hostile)


# -- entries.jsonl: verify, verify --json, rewards ---------------------------------------------------


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_a_hostile_entry_is_named_by_verify_and_rewards(log: GeneratedLog, folder: Callable[[], Path],
                                                        data: st.DataObject) -> None:
    lines = log.lines()
    position = data.draw(st.integers(0, len(lines) - 1), label="position")
    line = data.draw(hostile_lines(lines), label="line")
    command = data.draw(st.sampled_from(["verify", "verify --json", "rewards"]), label="command")
    target = folder()
    (target / "entries.jsonl").write_bytes(_with_line(lines, position, line))
    result = invoke(*command.split()[:1], str(target), *command.split()[1:])
    assert result.exit_code == 1, result.stdout
    if command == "verify --json":
        report = json.loads(result.stdout)
        assert report["ok"] is False and report["unusable"] is False
        assert report["problem"]["index"] == position and report["problem"]["reason"]
    else:
        assert result.stdout.startswith(f"INVALID entry {position}: "), result.stdout


@settings(FUZZ, max_examples=15)
@given(cut=st.integers(1, 2_000))
def test_a_truncated_log_names_the_entry_where_it_ends(log: GeneratedLog, folder: Callable[[], Path],
                                                       cut: int) -> None:
    data = b"".join(line + b"\n" for line in log.lines())
    cut = min(cut, len(data) - 1)
    target = folder()
    (target / "entries.jsonl").write_bytes(data[:len(data) - cut])
    kept = data[:len(data) - cut]
    broken_at = kept.count(b"\n")  # the first entry that is missing or cut
    result = invoke("verify", str(target), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["problem"]["index"] == broken_at


# -- entries.jsonl: prove, consistency (they hash lines; `verify` names the entry) -------------------


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_prove_and_consistency_refuse_hostile_entries(log: GeneratedLog, folder: Callable[[], Path],
                                                      data: st.DataObject) -> None:
    lines = log.lines()
    position = data.draw(st.integers(0, len(lines) - 1), label="position")
    target = folder()
    (target / "entries.jsonl").write_bytes(_with_line(lines, position, data.draw(hostile_lines(lines))))
    if data.draw(st.booleans(), label="prove"):
        index = data.draw(st.integers(0, len(lines) - 1), label="index")
        result = invoke("prove", str(target), "--index", str(index))
        assert result.exit_code == 1
        assert f"INVALID inclusion proof of entry {index}" in result.stdout
    else:
        earlier = target / "earlier.note"
        earlier.write_text(log.checkpoint(size=data.draw(st.integers(1, len(lines) - 1), label="old")))
        result = invoke("consistency", str(target), "--from", str(earlier))
        # a consistency proof needs only the tree's inner nodes: it can hold around a bad line
        assert result.exit_code in (0, 1)
        assert result.exit_code == 0 or "\nINVALID the earlier checkpoint" in result.stdout


# -- trust.json, checkpoint, state and --from files ---------------------------------------------------


@settings(FUZZ, max_examples=35)
@given(data=st.data())
def test_a_hostile_trust_file_is_unusable_for_every_command(log: GeneratedLog, export: Path,
                                                            data: st.DataObject) -> None:
    document = data.draw(hostile_documents(log.trust.to_json()), label="trust")
    with tempfile.TemporaryDirectory() as scratch:
        trust = Path(scratch) / "trust.json"
        trust.write_bytes(document)
        earlier = Path(scratch) / "earlier.note"
        earlier.write_text(log.checkpoint(size=2))
        command = data.draw(st.sampled_from([
            ["verify", str(export)], ["verify", str(export), "--json"], ["rewards", str(export)],
            ["prove", str(export), "--index", "1"], ["consistency", str(export), "--from", str(earlier)],
            ["export", "--db", "sqlite:///" + scratch + "/none.db", "--out", scratch + "/out"]]),
            label="command")
        result = invoke(*command, "--trust", str(trust))
    assert result.exit_code == 2, result.stdout
    assert "unusable input:" in result.stderr and "trust" in result.stderr
    if "--json" in command:
        report = json.loads(result.stdout)
        assert report["ok"] is False and report["unusable"] is True and "trust" in report["problem"]["reason"]


@st.composite
def hostile_notes(draw: st.DrawFn, note: bytes) -> bytes:
    how = draw(st.sampled_from(["inserted", "truncated", "random", "oversized", "huge size"]))
    if how == "inserted":  # anywhere except as a new line (an unknown extra signer is allowed)
        at = draw(st.integers(0, len(note)))
        junk = draw(st.one_of(hostile_chars.filter(lambda c: c != "\n").map(
            lambda c: c.encode("utf-8", "surrogatepass")), st.sampled_from([b"\xff", b"\xed\xa0\x80"])))
        return note[:at] + junk + note[at:]
    if how == "truncated":
        return note[:draw(st.integers(0, len(note) - 1))]
    if how == "oversized":
        return note + b"x" * (1 << 20)
    if how == "huge size":
        origin, _size, rest = note.split(b"\n", 2)
        return origin + b"\n" + b"9" * draw(st.integers(21, 6_000)) + b"\n" + rest
    return draw(st.binary(max_size=300))


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_a_hostile_checkpoint_is_refused_by_every_command(log: GeneratedLog, folder: Callable[[], Path],
                                                         data: st.DataObject) -> None:
    target = folder()
    note = (target / "checkpoint").read_bytes()
    (target / "checkpoint").write_bytes(data.draw(hostile_notes(note), label="checkpoint"))
    earlier = target / "earlier.note"
    earlier.write_text(log.checkpoint(size=2))
    command = data.draw(st.sampled_from([["verify"], ["verify", "--json"], ["rewards"],
                                         ["prove", "--index", "0"], ["consistency", "--from", str(earlier)]]),
                        label="command")
    result = invoke(command[0], str(target), *command[1:])
    assert result.exit_code == 1
    if "--json" in command:
        report = json.loads(result.stdout)
        assert report["problem"]["index"] is None and report["problem"]["reason"].startswith("checkpoint: ")
    else:
        assert result.stdout.startswith("INVALID checkpoint: "), result.stdout


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_a_hostile_state_file_is_unusable(log: GeneratedLog, export: Path, data: st.DataObject) -> None:
    valid = {"version": 1, "checkpoint": log.checkpoint(size=2), "leaf_hashes": None}
    document = data.draw(st.one_of(
        hostile_documents(valid),
        st.builds(lambda note: json.dumps({**valid, "checkpoint": note.decode("utf-8", "replace")}).encode(),
                  hostile_notes(log.checkpoint(size=2).encode()))), label="state")
    as_json = data.draw(st.booleans(), label="json")
    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch) / "state.json"
        state.write_bytes(document)
        result = invoke("verify", str(export), "--state", str(state), *(["--json"] if as_json else []))
        assert state.read_bytes() == document  # nothing written
    assert result.exit_code == 2, result.stdout
    assert "unusable input:" in result.stderr and "state" in result.stderr
    if as_json:
        report = json.loads(result.stdout)
        assert report["unusable"] is True and "state" in report["problem"]["reason"]


@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_a_hostile_earlier_checkpoint_is_unusable(log: GeneratedLog, export: Path,
                                                  data: st.DataObject) -> None:
    note = log.checkpoint(size=2).encode()
    document = data.draw(st.one_of(hostile_notes(note), hostile_documents({"checkpoint": note.decode()})),
                         label="from")
    with tempfile.TemporaryDirectory() as scratch:
        earlier = Path(scratch) / "earlier"
        earlier.write_bytes(document)
        result = invoke("consistency", str(export), "--from", str(earlier))
    assert result.exit_code == 2, result.stdout
    assert "unusable input:" in result.stderr and "earlier" in result.stderr


# -- the installed command, as a user runs it ----------------------------------------------------------


def test_the_console_script_reports_a_hostile_line_without_a_traceback(log: GeneratedLog,
                                                                      folder: Callable[[], Path]) -> None:
    target = folder()
    (target / "entries.jsonl").write_bytes(_with_line(log.lines(), 3, b"[" * 100_000 + b"]" * 100_000))
    script = Path(sys.executable).parent / "audit"
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "audit.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([*cli, "verify", str(target), "--json"], capture_output=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done
    problem = json.loads(done.stdout)["problem"]
    assert problem == {"index": 3, "reason": "nested too deeply for the JSON parser"}


def test_a_check_that_cannot_cope_still_names_the_entry(folder: Callable[[], Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The last line of defence: an exception a check was not written for (here forced) becomes a
    refusal of that entry, not a traceback."""
    def broken(text: str) -> None:
        raise TypeError("unexpected \x1b[2J content")

    monkeypatch.setattr("audit.verify._check_time", broken)  # on every line's path
    result = invoke("verify", str(folder()))
    assert result.exit_code == 1
    assert result.stdout == "INVALID entry 0: cannot be checked (TypeError: unexpected \\x1b[2J content)\n"


def test_rich_markup_in_a_quoted_name_is_printed_not_interpreted(tmp_path: Path) -> None:
    missing = tmp_path / "[/bold]x[red]"
    result = invoke("verify", str(missing))
    assert result.exit_code == 2 and f"{missing}: not a folder" in result.stderr
