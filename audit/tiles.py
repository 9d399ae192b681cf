"""The log as C2SP tlog-tiles: static, cacheable files that any client can fetch in parallel.

Why: an export of a big log is one large file that must be downloaded in one piece; tiles cut
the same data into immutable files of 256 entries or hashes, which a CDN can cache and a client
can fetch in parallel, and from which any proof can be computed (c2sp.org/tlog-tiles).

Layout under a prefix (a folder, or a URL):

    checkpoint                    the signed note (text/plain; charset=utf-8), cosignatures included
    tile/<L>/<N>[.p/<W>]          Merkle tree tiles: level L, index N, width W if partial
    tile/entries/<N>[.p/<W>]      entry bundles: each entry as a big-endian uint16 length, then
                                  its bytes (here: the RFC 8785 envelope, the Merkle leaf input)
    trust.json                    not part of tlog-tiles: this project's trust policy, a
                                  convenience copy as in an export folder (pin your own)

<N> is written in groups of three digits, all but the last prefixed with "x" (1234067 ->
x001/x234/067). A full tile holds 256 hashes (8,192 bytes); a tile at level 0 holds leaf hashes,
at level l > 0 each hash is the root of a full tile of level l - 1. The partial tile at level l of
a tree of size s holds floor(s / 256^l) mod 256 hashes and is never hashed into the level above;
empty tiles do not exist. Entry bundles follow level 0.

`TileBuilder` makes the tiles from a stream of leaf hashes (and entries), in constant memory;
the writer and the verifier both use it, so a served tile that does not match the entries is
named by its path.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from audit.export import replace_synced, write_synced
from audit.merkle import HASH_SIZE, NODE_PREFIX, leaf_hash
from audit.trust import Trust, trust_json_bytes

if TYPE_CHECKING:
    from audit.verify import VerifyReport

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_LEVEL = 63
MAX_ENTRY_BYTES = 0xFFFF
ENTRIES = -1  # the "level" of entry bundles
CHECKPOINT_PATH = "checkpoint"
TRUST_PATH = "trust.json"
_COMPONENT = re.compile(r"x[0-9]{3}")
_LAST = re.compile(r"[0-9]{3}")
_WIDTH = re.compile(r"[1-9][0-9]{0,2}")
_LEVEL = re.compile(r"0|[1-9][0-9]?")


class TileError(ValueError):
    """A tile path, tile or bundle is malformed or does not match; the message says which."""


@dataclass(frozen=True)
class Tile:
    """Tile `index` at `level` (ENTRIES for an entry bundle), `width` hashes or entries."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if not ENTRIES <= self.level <= MAX_LEVEL:
            raise TileError(f"tile level: {self.level} is not between 0 and {MAX_LEVEL}")
        if self.index < 0:
            raise TileError(f"tile index: must be >= 0, got {self.index}")
        if not 1 <= self.width <= TILE_WIDTH:
            raise TileError(f"tile width: {self.width} is not between 1 and {TILE_WIDTH}")

    @property
    def partial(self) -> bool:
        return self.width < TILE_WIDTH

    @property
    def path(self) -> str:
        level = "entries" if self.level == ENTRIES else str(self.level)
        return f"tile/{level}/{encode_index(self.index)}" + (
            f".p/{self.width}" if self.partial else "")

    def start(self) -> int:
        """The first leaf index the tile covers."""
        return self.index * TILE_WIDTH ** (max(self.level, 0) + 1)


def encode_index(index: int) -> str:
    """<N> in three-digit groups, all but the last prefixed with 'x' (1234067: x001/x234/067)."""
    if index < 0:
        raise TileError(f"tile index: must be >= 0, got {index}")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(groups))


def parse_tile_path(path: str) -> Tile:
    """The tile a path names; TileError unless it is exactly a path `Tile.path` would write."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TileError(f"tile path: {path!r} does not start with tile/<L>/")
    if parts[1] == "entries":
        level = ENTRIES
    elif _LEVEL.fullmatch(parts[1]):
        level = int(parts[1])
    else:
        raise TileError(f"tile path: {path!r}: level {parts[1]!r} is not 0-63 or 'entries'")
    rest = parts[2:]
    width = TILE_WIDTH
    if len(rest) >= 2 and rest[-2].endswith(".p"):
        if not _WIDTH.fullmatch(rest[-1]) or not 1 <= int(rest[-1]) < TILE_WIDTH:
            raise TileError(f"tile path: {path!r}: partial width must be 1-255")
        width = int(rest[-1])
        rest = [*rest[:-2], rest[-2][:-2]]
    if not rest or not all(_COMPONENT.fullmatch(p) for p in rest[:-1]) or \
            not _LAST.fullmatch(rest[-1]):
        raise TileError(f"tile path: {path!r}: the index must be xNNN/.../NNN")
    index = 0
    for part in rest:
        index = index * 1000 + int(part.lstrip("x"))
    tile = Tile(level, index, width)
    if tile.path != path:  # e.g. a leading x000 group
        raise TileError(f"tile path: {path!r} is not canonical (expected {tile.path!r})")
    return tile


def tiles_for_size(size: int) -> list[Tile]:
    """Every tile (full and partial, hashes and entry bundles) of a tree of `size` leaves."""
    tiles: list[Tile] = []
    full, partial = divmod(size, TILE_WIDTH)
    tiles += [Tile(ENTRIES, n) for n in range(full)]
    if partial:
        tiles.append(Tile(ENTRIES, full, partial))
    level, count = 0, size
    while count:
        full, partial = divmod(count, TILE_WIDTH)
        tiles += [Tile(level, n) for n in range(full)]
        if partial:
            tiles.append(Tile(level, full, partial))
        count //= TILE_WIDTH
        level += 1
    return tiles


def tile_root(hashes: bytes) -> bytes:
    """The Merkle root of a full tile's 256 hashes (a perfect subtree of height 8)."""
    row = [hashes[i:i + HASH_SIZE] for i in range(0, len(hashes), HASH_SIZE)]
    sha256 = hashlib.sha256
    while len(row) > 1:
        row = [sha256(NODE_PREFIX + row[i] + row[i + 1]).digest() for i in range(0, len(row), 2)]
    return row[0]


def encode_bundle(entries: Iterable[bytes]) -> bytes:
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY_BYTES:
            raise TileError(f"entry: {len(entry)} bytes, larger than the {MAX_ENTRY_BYTES} an "
                            f"entry bundle can hold")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def decode_bundle(data: bytes, tile: Tile) -> list[bytes]:
    """The entries of a bundle, which must hold exactly `tile.width` of them and nothing else."""
    entries: list[bytes] = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            raise TileError(f"{tile.path}: truncated length prefix at byte {at}")
        length = int.from_bytes(data[at:at + 2], "big")
        at += 2
        if at + length > len(data):
            raise TileError(f"{tile.path}: entry {len(entries)} claims {length} bytes, only "
                            f"{len(data) - at} remain")
        entries.append(data[at:at + length])
        at += length
    if len(entries) != tile.width:
        raise TileError(f"{tile.path}: holds {len(entries)} entries, expected {tile.width}")
    return entries


class TileBuilder:
    """Turns leaves, in order, into tiles; calls `emit(tile, data)` for each finished tile.

    Constant memory: one unfinished tile per level (at most 8 KiB each) and one bundle.
    `finish()` emits the partial tiles of the final size.
    """

    def __init__(self, emit: Callable[[Tile, bytes], None], *, with_entries: bool = True) -> None:
        self._emit = emit
        self._levels: list[bytearray] = [bytearray()]
        self._counts: list[int] = [0]  # full tiles emitted per level
        self._bundle: list[bytes] = []
        self._bundles = 0
        self._with_entries = with_entries
        self.size = 0

    def add(self, entry: bytes, leaf: bytes | None = None) -> None:
        if self._with_entries:
            if len(entry) > MAX_ENTRY_BYTES:
                raise TileError(f"entry {self.size}: {len(entry)} bytes, larger than the "
                                f"{MAX_ENTRY_BYTES} an entry bundle can hold")
            self._bundle.append(entry)
            if len(self._bundle) == TILE_WIDTH:
                self._emit(Tile(ENTRIES, self._bundles), encode_bundle(self._bundle))
                self._bundle = []
                self._bundles += 1
        self.add_hash(leaf if leaf is not None else leaf_hash(entry))

    def add_hash(self, leaf: bytes) -> None:
        self.size += 1
        level, value = 0, leaf
        while True:
            row = self._levels[level]
            row += value
            if len(row) < TILE_WIDTH * HASH_SIZE:
                return
            data = bytes(row)
            self._emit(Tile(level, self._counts[level]), data)
            self._counts[level] += 1
            row.clear()
            value = tile_root(data)
            level += 1
            if level == len(self._levels):
                self._levels.append(bytearray())
                self._counts.append(0)

    def finish(self) -> None:
        if self._with_entries and self._bundle:
            self._emit(Tile(ENTRIES, self._bundles, len(self._bundle)),
                       encode_bundle(self._bundle))
        for level, row in enumerate(self._levels):
            if row:
                self._emit(Tile(level, self._counts[level], len(row) // HASH_SIZE), bytes(row))


def write_tiles(out: Path, entries: Iterable[bytes], checkpoint_note: str | Callable[[], str],
                trust: Trust | None = None, *, overwrite: bool = False) -> int:
    """Write a tile tree of `entries` (leaf bytes, no newline) under `out`, atomically.

    The folder is built beside `out` and renamed into place, as `write_export` does; returns
    the number of entries. `checkpoint_note` may be a function called after the last entry.
    """
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise TileError(f"{out}: already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))

    def emit(tile: Tile, data: bytes) -> None:
        path = staging / tile.path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synced(path, data)

    try:
        builder = TileBuilder(emit)
        for entry in entries:
            builder.add(entry)
        builder.finish()
        note = checkpoint_note() if callable(checkpoint_note) else checkpoint_note
        write_synced(staging / CHECKPOINT_PATH, note.encode())
        if trust is not None:
            write_synced(staging / TRUST_PATH, trust_json_bytes(trust))
        replace_synced(staging, out)
        return builder.size
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class TileSource(Protocol):
    """Where tiles are read from: a folder or an HTTP prefix. `read` raises TileError."""

    def read(self, path: str) -> bytes: ...


class FolderTiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, path: str) -> bytes:
        try:
            return (self.folder / path).read_bytes()
        except OSError as exc:
            raise TileError(f"{self.folder / path}: cannot read ({exc.strerror})") from exc


def iter_entries(source: TileSource, size: int) -> Iterator[bytes]:
    """The first `size` entries, bundle by bundle (partial last bundle by its .p/ path)."""
    full, partial = divmod(size, TILE_WIDTH)
    bundles = [Tile(ENTRIES, n) for n in range(full)]
    if partial:
        bundles.append(Tile(ENTRIES, full, partial))
    for tile in bundles:
        yield from decode_bundle(source.read(tile.path), tile)


class TileChecker:
    """Rebuilds the tiles from the entries as they stream by and compares the served ones.

    `problem` names the first tile that is missing or differs (None: all match).
    """

    def __init__(self, source: TileSource) -> None:
        self._source = source
        self.problem: str | None = None
        self._builder = TileBuilder(self._compare, with_entries=False)

    def _compare(self, tile: Tile, data: bytes) -> None:
        if self.problem is not None:
            return
        try:
            served = self._source.read(tile.path)
        except TileError as exc:
            self.problem = f"{tile.path}: missing ({exc})"
            return
        if served != data:
            self.problem = (f"{tile.path}: does not match the hashes of the entries "
                            f"{tile.start()}.. it covers")

    def add(self, leaf: bytes) -> None:
        self._builder.add_hash(leaf)

    def finish(self) -> str | None:
        self._builder.finish()
        return self.problem


def is_tile_folder(folder: Path) -> bool:
    return (folder / "tile").is_dir() and (folder / CHECKPOINT_PATH).is_file()


def verify_tiles(source: TileSource, trust: Trust, *, checkpoint: bytes | None = None,
                 state_path: Path | None = None, workers: int | None = None,
                 witness_quorum: int | None = None,
                 progress: Callable[[int], None] | None = None) -> VerifyReport:
    """`audit verify` on a tile tree: the entries from the bundles, and every tile checked.

    The checkpoint (read from the source unless given) says how many entries to read; the
    bundles' entries go through the same verifier as an export's lines, and each hash tile the
    entries imply must be served byte for byte. A bundle or tile that is missing or malformed
    is named with the index of its first entry.
    """
    from audit.checkpoint import CheckpointError, parse_checkpoint
    from audit.verify import Problem, load_state, verify_lines

    note = checkpoint if checkpoint is not None else source.read(CHECKPOINT_PATH)
    try:
        size = parse_checkpoint(note).size
    except CheckpointError:
        size = 0  # verify_lines reports what is wrong with the note
    state = load_state(state_path, trust) if state_path is not None else None
    checker = TileChecker(source)
    failure: list[Problem] = []

    def lines() -> Iterator[bytes]:
        index = 0
        try:
            for entry in iter_entries(source, size):
                checker.add(leaf_hash(entry))
                index += 1
                yield entry + b"\n"
        except TileError as exc:
            failure.append(Problem(index, f"tiles: {exc}"))

    def after() -> Problem | None:
        if failure:
            return failure[0]
        problem = checker.finish()
        return None if problem is None else Problem(None, f"tiles: {problem}")

    return verify_lines(lines(), note, trust, state=state, state_path=state_path,
                        progress=progress, workers=workers, witness_quorum=witness_quorum,
                        after_entries=after)
