"""The `audit` command: the auditor's tools, all offline except `export --db`.

Exit codes (every command):
    0  the check passed (or the command did its job)
    1  the log is invalid: a bad entry (its index and what is wrong), a checkpoint that does not
       verify or does not match, a history that forked from the saved state, a proof that fails
    2  unusable input: a missing folder or entries.jsonl, an unreadable or malformed trust, state
       or checkpoint file, a database that cannot be read, bad options (Typer's usage errors are
       2 as well). Nothing is verified, nothing is written.
A malformed line in entries.jsonl is a bad entry (1): it is the log's content that is wrong.
Every file read may be hostile: a refusal names the entry or file and the reason (quoted content
made printable), never a traceback; `verify --json` prints a JSON report for every outcome.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from audit.checkpoint import Checkpoint, CheckpointError, parse_note, verify_checkpoint
from audit.export import (
    ExportError,
    ExportPaths,
    Trust,
    iter_lines,
    read_checkpoint_text,
    read_trust,
    write_export,
)
from audit.merkle import MemoryTree, ProofError, leaf_hash, verify_consistency, verify_inclusion
from audit.signing import b64encode
from audit.untrusted import UntrustedJSONError, load_json, printable
from audit.verify import VerifyReport, default_workers, verify_export

EXIT_OK, EXIT_INVALID, EXIT_UNUSABLE = 0, 1, 2

app = typer.Typer(help="Verify the exchange's audit log offline, prove entries, recompute rewards.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

TrustOption = Annotated[Path | None, typer.Option(
    "--trust", help="Pinned trust.json (operator and log public keys, origin). Default: the "
                    "export's own trust.json; an auditor should pin a copy obtained out of band.")]


WitnessQuorumOption = Annotated[int | None, typer.Option(
    "--witness-quorum", min=0, max=1000,
    help="How many pinned witnesses must have cosigned the checkpoint (default: the trust "
         "policy's quorum, a majority of its witnesses; 0 accepts the log key alone).")]


def _unusable(message: str) -> typer.Exit:
    err.print(f"[bold red]unusable input:[/] {escape(printable(message))}")
    return typer.Exit(EXIT_UNUSABLE)


def _invalid(message: str) -> typer.Exit:
    out.print(f"[bold red]INVALID[/] {escape(printable(message))}")
    return typer.Exit(EXIT_INVALID)


@contextmanager
def _progress(total: int, label: str) -> Iterator[Any]:
    """A Rich progress bar on stderr, only when stderr is a terminal and the log is long."""
    if not err.is_terminal or total < (4 << 20):
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err,
                  transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)


def _load(folder: Path, trust_file: Path | None) -> tuple[ExportPaths, Trust, str, Checkpoint]:
    """Paths, pinned trust, checkpoint note text and its verified content, for prove/consistency."""
    paths = ExportPaths(folder)
    try:
        paths.require()
        trust = read_trust(trust_file or paths.trust)
        note = read_checkpoint_text(paths.checkpoint)
    except ExportError as exc:
        raise _unusable(str(exc)) from exc
    try:
        checkpoint = verify_checkpoint(note, trust.log_public_key, trust.log_key_name, trust.origin)
    except CheckpointError as exc:
        raise _invalid(f"checkpoint: {exc}") from exc
    return paths, trust, note.decode("utf-8"), checkpoint


def _tree(paths: ExportPaths, size: int) -> MemoryTree:
    """The tree of the first `size` lines of entries.jsonl (hashing only; `verify` checks them)."""
    tree = MemoryTree()
    for raw in iter_lines(paths.entries):
        if tree.size == size:
            break
        tree.append(leaf_hash(raw[:-1] if raw.endswith(b"\n") else raw))
    return tree


def _summary(report: VerifyReport) -> str:
    kinds = ", ".join(f"{count} {escape(printable(kind))}" for kind, count in sorted(report.kinds.items()))
    origin = escape(printable(report.origin))
    lines = [f"[bold green]OK[/] {report.entries} entries of {origin} verified: every "
             f"signature, key registration and checkpoint",
             f"  root {b64encode(report.root)}",
             f"  kinds: {kinds or 'none'}"]
    if report.ledger_checked and report.ledger is not None:
        lines.append(f"  ledger: minted {report.ledger['minted']}, escrow {report.ledger['escrow']}, "
                     f"{len(report.ledger['balances'])} accounts; conservation holds")
    lines.append(_witness_line(report))
    if report.consistent_with is not None:
        lines.append(f"  consistent with the saved checkpoint of size {report.consistent_with}")
    if report.state_saved:
        lines.append("  new checkpoint saved to the state file")
    return "\n".join(lines)


def _witness_line(report: VerifyReport) -> str:
    cosigned = report.cosignatures
    if cosigned is None or not (cosigned.signed or cosigned.missing or cosigned.future):
        return ("  witnesses: none pinned; the checkpoint is trusted on the log key alone"
                if report.witness_quorum == 0 else "  witnesses: none")
    signed = ", ".join(cosigned.signed) or "none"
    text = (f"  witnesses: {len(cosigned.signed)} cosigned (quorum {report.witness_quorum}): "
            f"{signed}")
    if cosigned.missing:
        text += f"; not signed by {', '.join(cosigned.missing)}"
    if cosigned.future:
        text += f"; dated in the future, not counted: {', '.join(cosigned.future)}"
    return text


def _witnesses_json(report: VerifyReport) -> dict[str, Any]:
    cosigned = report.cosignatures
    return {"quorum": report.witness_quorum,
            "signed": {} if cosigned is None else dict(cosigned.signed),
            "missing": [] if cosigned is None else list(cosigned.missing),
            "future": {} if cosigned is None else dict(cosigned.future)}


def _report_json(report: VerifyReport) -> dict[str, Any]:
    return {"ok": report.ok, "unusable": False, "entries": report.entries, "origin": report.origin,
            "root": b64encode(report.root),
            "problem": None if report.problem is None else
            {"index": report.problem.index, "reason": printable(report.problem.reason)},
            "kinds": {printable(kind): count for kind, count in sorted(report.kinds.items())},
            "ledger": report.ledger, "consistent_with": report.consistent_with,
            "state_saved": report.state_saved, "witnesses": _witnesses_json(report)}


def _unusable_json(message: str) -> dict[str, Any]:
    """The --json report when nothing could be verified (exit 2)."""
    return {"ok": False, "unusable": True, "entries": 0, "origin": None, "root": None,
            "problem": {"index": None, "reason": printable(message)}, "kinds": {}, "ledger": None,
            "consistent_with": None, "state_saved": False, "witnesses": None}


def _run_verify(folder: Path, trust: Path | None, state: Path | None,
                workers: int | None, witness_quorum: int | None = None) -> VerifyReport:
    """Verify the export (or tile folder); ExportError if the input is unusable (exit 2)."""
    from audit.tiles import TRUST_PATH, FolderTiles, TileError, is_tile_folder, verify_tiles

    if is_tile_folder(folder) and not ExportPaths(folder).entries.exists():
        try:
            pinned = read_trust(trust or folder / TRUST_PATH)
            return verify_tiles(FolderTiles(folder), pinned, state_path=state,
                                workers=default_workers() if workers is None else workers,
                                witness_quorum=witness_quorum)
        except TileError as exc:
            raise ExportError(str(exc)) from exc
    paths = ExportPaths(folder)
    try:
        size = paths.entries.stat().st_size
    except OSError:
        size = 0  # paths.require() in verify_export names what is missing
    with _progress(size, "verifying") as progress:
        return verify_export(folder, trust_path=trust, state_path=state, progress=progress,
                             workers=default_workers() if workers is None else workers,
                             witness_quorum=witness_quorum)


@app.command()
def verify(  # noqa: PLR0917 (Typer maps parameters to options)
    folder: Annotated[Path, typer.Argument(
        help="The export folder, or a tlog-tiles folder (checkpoint and tile/).")],
    trust: TrustOption = None,
    state: Annotated[Path | None, typer.Option(
        "--state", help="State file: the last checkpoint seen. If it exists, the log must be "
                        "consistent with it; after a successful check the new checkpoint is "
                        "saved there atomically.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, max=64, help="Worker processes for signature checks (0: none; "
                                         "default: one per spare core, at most 2).")] = None,
    witness_quorum: WitnessQuorumOption = None,
) -> None:
    """Check every entry, signature and key registration, rebuild the tree, match the checkpoint,
    and require the trust policy's quorum of witness cosignatures on it."""
    try:
        report = _run_verify(folder, trust, state, workers, witness_quorum)
    except ExportError as exc:
        if as_json:
            out.print_json(data=_unusable_json(str(exc)))
        raise _unusable(str(exc)) from exc
    if as_json:
        out.print_json(data=_report_json(report))
        raise typer.Exit(EXIT_OK if report.ok else EXIT_INVALID)
    if report.problem is not None:
        raise _invalid(str(report.problem))
    out.print(_summary(report))


@app.command()
def rewards(
    folder: Annotated[Path, typer.Argument(help="The export folder.")],
    trust: TrustOption = None,
    witness_quorum: WitnessQuorumOption = None,
) -> None:
    """Verify the log, then print the ledger fold: {"minted", "escrow", "balances"} as JSON."""
    try:
        report = _run_verify(folder, trust, None, None, witness_quorum)
    except ExportError as exc:
        raise _unusable(str(exc)) from exc
    if report.problem is not None:
        raise _invalid(str(report.problem))
    if report.ledger is None:
        raise _unusable("the ledger (audit.ledger) is not available in this installation")
    out.print_json(data=report.ledger)


@app.command()
def generate(  # noqa: PLR0917 (Typer maps parameters to options)
    entries: Annotated[int, typer.Option("--entries", min=0, help="How many entries.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Export folder to create.")],
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Reproducible content and keys (default: fresh random keys).")] = None,
    origin: Annotated[str, typer.Option("--origin", help="The log's origin line.")] =
        "exchange.example/log",
    witnesses: Annotated[int, typer.Option(
        "--witnesses", min=0, max=5, help="How many of the 5 hospitals register a witness key "
                                          "and cosign the checkpoint (trust.json lists them).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder.")] = False,
) -> None:
    """Write a well-formed signed log of N realistic entries (fresh keys) as an export folder."""
    from audit.generate import write_generated_log

    try:
        log = write_generated_log(out_dir, entries, seed=seed, origin=origin, witnesses=witnesses,
                                  overwrite=force)
    except (ExportError, CheckpointError, ValueError) as exc:
        raise _unusable(str(exc)) from exc
    cosigned = f", cosigned by {witnesses} witness(es)" if witnesses else ""
    out.print(f"wrote {entries} entries to {out_dir} (origin {origin}{cosigned}; trust.json pins "
              f"the operator key {log.operator.key_id} and the log key {log.log_signer.key_id})")


@app.command()
def export(
    db: Annotated[str, typer.Option("--db", help="Database URL of the coordinator's log.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Export folder to create.")],
    trust: Annotated[Path | None, typer.Option(
        "--trust", help="The operator's trust.json (origin, operator and log public keys). "
                        "Default: the trust anchors the log recorded when it was created; if "
                        "given, it must agree with them.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder.")] = False,
) -> None:
    """Export the log in a database: the entries covered by its latest checkpoint."""
    from sqlalchemy.exc import SQLAlchemyError

    from audit.store import AuditStoreError, read_entries, read_latest_checkpoint, read_stored_trust

    source = str(trust) if trust is not None else f"the trust anchors stored in {db}"
    try:
        given = read_trust(trust) if trust is not None else None  # a bad option before the database
        stored = read_stored_trust(db)
        pinned = given if given is not None else stored
        if pinned is None:
            raise _unusable(f"{db}: the database holds no trust anchors (audit_log_meta is empty: "
                            f"no coordinator has opened this log since migration 0004); pass "
                            f"--trust FILE")
        if stored is not None and stored.anchors() != pinned.anchors():
            differ = [name for name in ("origin", "operator_public_key", "log_public_key")
                      if getattr(stored, name) != getattr(pinned, name)]
            raise _unusable(f"--trust: {trust} disagrees with the trust anchors stored in {db} "
                            f"({', '.join(differ)} differ)")
        note = read_latest_checkpoint(db)
        if note is None:
            raise _unusable(f"{db}: the log has signed no checkpoint yet")
        checkpoint = verify_checkpoint(note, pinned.log_public_key, pinned.log_key_name,
                                       pinned.origin)
        lines = (entry.leaf_bytes() for entry in read_entries(db, 0, checkpoint.size))
        count = write_export(out_dir, lines, note, pinned, overwrite=force)
    except CheckpointError as exc:
        raise _unusable(f"{db}: latest checkpoint does not verify with {source}: {exc}") from exc
    except (ExportError, AuditStoreError, ValueError) as exc:
        raise _unusable(str(exc)) from exc
    except SQLAlchemyError as exc:  # a bad URL or a database that cannot be read
        raise _unusable(f"{db}: cannot read the log ({exc})") from exc
    if count != checkpoint.size:
        raise _unusable(f"{db}: the checkpoint covers {checkpoint.size} entries but only {count} "
                        f"could be read")
    out.print(f"exported {count} entries to {out_dir} (checkpoint size {checkpoint.size})")


@app.command()
def fetch(  # noqa: PLR0917 (Typer maps parameters to options)
    url: Annotated[str, typer.Option("--url", help="The coordinator's base URL (JSON API), or a "
                                                   "tlog-tiles prefix with --tiles.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Export folder to create.")],
    trust: Annotated[Path | None, typer.Option(
        "--trust", help="Pinned trust.json to verify with (default: the server's own, which "
                        "proves nothing about the server; pin a copy obtained out of band).")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="EXCHANGE_API_KEY", show_default=False,
        help="Auditor API key (or EXCHANGE_API_KEY), sent as a Bearer token.")] = None,
    tiles: Annotated[bool, typer.Option("--tiles", help="URL is a tlog-tiles prefix.")] = False,
    page: Annotated[int, typer.Option("--page", min=1, max=100_000,
                                      help="Entries per request (JSON API).")] = 10_000,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64,
                                          help="Bundles fetched at once (tiles).")] = 8,
    state: Annotated[Path | None, typer.Option("--state", help="As for `audit verify`.")] = None,
    witness_quorum: WitnessQuorumOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder.")] = False,
) -> None:
    """Download a verifiable export over HTTP (checkpoint with cosignatures, trust, entries in
    pages or tiles), write it as an export folder, then verify it like `audit verify`."""
    from audit.fetch import fetch_api, fetch_tiles

    try:
        pinned = read_trust(trust) if trust is not None else None
        if tiles:
            fetched = fetch_tiles(url, out_dir, api_key=api_key, pinned=pinned, parallel=parallel,
                                  overwrite=force)
        else:
            fetched = fetch_api(url, out_dir, api_key=api_key, pinned=pinned, page=page,
                                overwrite=force)
    except ExportError as exc:
        raise _unusable(str(exc)) from exc
    err.print(f"fetched {fetched.entries} entries ({fetched.bytes:,} bytes) from {url} into "
              f"{out_dir}" + ("" if pinned else "; verifying with the SERVER's trust.json "
                                                "(pin your own with --trust)"))
    try:
        report = _run_verify(out_dir, trust, state, None, witness_quorum)
    except ExportError as exc:
        raise _unusable(str(exc)) from exc
    if report.problem is not None:
        raise _invalid(str(report.problem))
    out.print(_summary(report))


@app.command(name="tiles")
def tiles_command(
    folder: Annotated[Path, typer.Argument(help="The export folder.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Tile folder to create.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing folder.")] = False,
) -> None:
    """Write an export as a C2SP tlog-tiles tree (checkpoint, tile/<L>/<N>, tile/entries/<N>),
    to serve as static files; `audit verify` and `audit fetch --tiles` read it."""
    from audit.tiles import TileError, write_tiles

    paths = ExportPaths(folder)
    try:
        paths.require()
        note = read_checkpoint_text(paths.checkpoint).decode("utf-8")
        policy = read_trust(paths.trust) if paths.trust.exists() else None
        count = write_tiles(out_dir, (raw[:-1] if raw.endswith(b"\n") else raw
                                      for raw in iter_lines(paths.entries)), note,
                            policy, overwrite=force)
    except (ExportError, TileError, UnicodeDecodeError) as exc:
        raise _unusable(str(exc)) from exc
    out.print(f"wrote {count} entries as tiles to {out_dir} (not verified: run `audit verify "
              f"{out_dir}`)")


@app.command()
def prove(
    folder: Annotated[Path, typer.Argument(help="The export folder.")],
    index: Annotated[int, typer.Option("--index", min=0, help="0-based entry index.")],
    trust: TrustOption = None,
) -> None:
    """Print the inclusion proof of entry INDEX in the checkpoint's tree, and check it."""
    paths, _trust, _note, checkpoint = _load(folder, trust)
    if index >= checkpoint.size:
        raise _unusable(f"--index: {index} is not below the checkpoint size {checkpoint.size}")
    tree = _tree(paths, checkpoint.size)
    if tree.size < checkpoint.size:
        raise _invalid(f"entry {tree.size}: missing: the checkpoint commits to "
                       f"{checkpoint.size} entries but the log ends after {tree.size}")
    proof = tree.inclusion_proof(index, checkpoint.size)
    leaf = tree.leaf(index)
    out.print_json(data={"index": index, "tree_size": checkpoint.size, "leaf_hash": b64encode(leaf),
                         "root": b64encode(checkpoint.root),
                         "proof": [b64encode(p) for p in proof]})
    try:
        verify_inclusion(leaf, index, checkpoint.size, proof, checkpoint.root)
    except ProofError as exc:
        raise _invalid(f"inclusion proof of entry {index} does not reach the checkpoint root: "
                       f"{exc} (the entries do not match the checkpoint; run `audit verify`)") from exc
    err.print(f"[green]OK[/] entry {index} is included in the checkpoint of size {checkpoint.size}")


@app.command()
def consistency(
    folder: Annotated[Path, typer.Argument(help="The export folder.")],
    from_file: Annotated[Path, typer.Option(
        "--from", help="An earlier checkpoint (signed note) or an `audit verify` state file.")],
    trust: TrustOption = None,
) -> None:
    """Print the consistency proof from an earlier checkpoint to the export's, and check it."""
    paths, pinned, _note, checkpoint = _load(folder, trust)
    try:
        raw = from_file.read_bytes()
    except OSError as exc:
        raise _unusable(f"{from_file}: cannot read ({exc.strerror})") from exc
    text: Any = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            text = load_json(raw)["checkpoint"]
        except UntrustedJSONError as exc:
            raise _unusable(f"{from_file}: state file: {exc}") from exc
        except (KeyError, TypeError) as exc:
            raise _unusable(f"{from_file}: neither a checkpoint nor a state file") from exc
        if not isinstance(text, str):
            raise _unusable(f"{from_file}: state file: checkpoint must be a string")
    try:
        parse_note(text)
        old = verify_checkpoint(text, pinned.log_public_key, pinned.log_key_name, pinned.origin)
    except CheckpointError as exc:
        raise _unusable(f"{from_file}: not a checkpoint signed by the pinned log key: {exc}") from exc
    if old.size == 0:
        raise _unusable(f"{from_file}: a checkpoint of the empty log proves nothing")
    if old.size > checkpoint.size:
        raise _invalid(f"entry {checkpoint.size}: missing: the earlier checkpoint has {old.size} "
                       f"entries, the export's only {checkpoint.size} (rolled back?)")
    tree = _tree(paths, checkpoint.size)
    if tree.size < checkpoint.size:
        raise _invalid(f"entry {tree.size}: missing: the checkpoint commits to "
                       f"{checkpoint.size} entries but the log ends after {tree.size}")
    proof = tree.consistency_proof(old.size, checkpoint.size)
    out.print_json(data={"old_size": old.size, "new_size": checkpoint.size,
                         "old_root": b64encode(old.root), "new_root": b64encode(checkpoint.root),
                         "proof": [b64encode(p) for p in proof]})
    try:
        verify_consistency(old.size, checkpoint.size, proof, old.root, checkpoint.root)
    except ProofError as exc:
        raise _invalid(f"the earlier checkpoint (size {old.size}) is not consistent with the "
                       f"export's (size {checkpoint.size}): {exc}") from exc
    err.print(f"[green]OK[/] the log of size {old.size} is a prefix of the log of size "
              f"{checkpoint.size}")


def main() -> None:  # pragma: no cover - console entry point convenience
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
