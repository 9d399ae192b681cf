"""C2SP tlog-tiles: the spec's path and size examples, tiles equal to the tree, verify from tiles."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.generate import generate_log
from audit.merkle import MemoryTree, leaf_hash
from audit.tiles import (
    ENTRIES,
    TILE_WIDTH,
    FolderTiles,
    Tile,
    TileBuilder,
    TileError,
    decode_bundle,
    encode_bundle,
    iter_entries,
    parse_tile_path,
    tiles_for_size,
    verify_tiles,
    write_tiles,
)

runner = CliRunner()


@pytest.mark.parametrize(("path", "tile"), [
    # The spec's example, then golang.org/x/mod/sumdb/tlog's tilePaths without their height
    # component (torchwood's C2SP paths are exactly those).
    ("tile/0/x001/x234/067", Tile(0, 1234067)),
    ("tile/0/001", Tile(0, 1)),
    ("tile/0/001.p/5", Tile(0, 1, 5)),
    ("tile/5/x123/x456/078", Tile(5, 123456078)),
    ("tile/5/x123/x456/078.p/2", Tile(5, 123456078, 2)),
    ("tile/0/x003/x057/500", Tile(0, 3057500)),
    ("tile/entries/x003/x057/500", Tile(ENTRIES, 3057500)),
    ("tile/entries/000.p/255", Tile(ENTRIES, 0, 255)),
    ("tile/63/000", Tile(63, 0)),
])
def test_tile_paths_round_trip(path: str, tile: Tile) -> None:
    assert tile.path == path
    assert parse_tile_path(path) == tile


@pytest.mark.parametrize("path", [
    "tile/5/123/456/078",  # groups before the last need an x
    "tile/-1/000", "tile/64/000", "tile/01/000", "tile/data/000", "tile/0/x000/001",
    "tile/0/001.p/256", "tile/0/001.p/0", "tile/0/001.p/05", "tile/0/1", "tile/0/0001",
    "tiles/0/000", "tile/0", "tile/0/000.p", "tile/0/x001",
])
def test_malformed_tile_paths_are_refused(path: str) -> None:
    with pytest.raises(TileError):
        parse_tile_path(path)


def test_the_spec_size_examples() -> None:
    def shape(size: int) -> Counter[tuple[int, bool, int]]:
        return Counter((t.level, t.partial, t.width) for t in tiles_for_size(size)
                       if t.level != ENTRIES)

    # "a tree of size 70,000 will be represented by 273 full level 0 tiles, one partial level 0
    # tile of width 112, one full level 1 tile, one partial level 1 tile of width 17, and one
    # partial level 2 tile of width 1"
    assert shape(70_000) == Counter({(0, False, 256): 273, (0, True, 112): 1, (1, False, 256): 1,
                                     (1, True, 17): 1, (2, True, 1): 1})
    # "a tree of size 256 will be represented by a full level 0 tile and a partial level 1 tile
    # of width 1"
    assert shape(256) == Counter({(0, False, 256): 1, (1, True, 1): 1})
    assert tiles_for_size(0) == []
    bundles = [t for t in tiles_for_size(70_000) if t.level == ENTRIES]
    assert len(bundles) == 274 and bundles[-1] == Tile(ENTRIES, 273, 112)


def test_builder_tiles_are_the_tree_hashes_and_exactly_the_expected_set() -> None:
    size = TILE_WIDTH * TILE_WIDTH + 3 * TILE_WIDTH + 7  # full level-1 tile, partials on 0/1/2
    emitted: dict[Tile, bytes] = {}
    builder = TileBuilder(emitted.__setitem__, with_entries=False)
    tree = MemoryTree()
    for i in range(size):
        leaf = leaf_hash(str(i).encode())
        tree.append(leaf)
        builder.add_hash(leaf)
    builder.finish()
    assert set(emitted) == {t for t in tiles_for_size(size) if t.level != ENTRIES}
    for tile, data in emitted.items():
        for i in range(tile.width):
            # Hash i of tile n at level l is MTH of leaves [(n*256+i)*256^l, ... + 256^l).
            assert data[32 * i:32 * i + 32] == tree.node(8 * tile.level,
                                                         tile.index * TILE_WIDTH + i)


def test_bundles_encode_lengths_and_refuse_what_does_not_fit() -> None:
    entries = [b"", b"a", b"x" * 300]
    data = encode_bundle(entries)
    assert data[:2] == b"\x00\x00" and data[2:5] == b"\x00\x01a" and data[5:7] == b"\x01\x2c"
    assert decode_bundle(data, Tile(ENTRIES, 0, 3)) == entries
    with pytest.raises(TileError, match="holds 3 entries, expected 4"):
        decode_bundle(data, Tile(ENTRIES, 0, 4))
    with pytest.raises(TileError, match="claims 300 bytes"):
        decode_bundle(data[:-1], Tile(ENTRIES, 0, 3))
    with pytest.raises(TileError, match="larger than the 65535"):
        encode_bundle([b"x" * 65_536])


def test_an_export_written_as_tiles_verifies_from_the_tiles(tmp_path: Path) -> None:
    log = generate_log(700, seed=6, witnesses=3)
    export = tmp_path / "export"
    log.write(export)
    folder = tmp_path / "tiles"
    code = runner.invoke(app, ["tiles", str(export), "--out", str(folder)])
    assert code.exit_code == 0, code.stdout
    assert (folder / "tile/entries/002.p/188").is_file() and (folder / "tile/1/000.p/2").is_file()
    assert list(iter_entries(FolderTiles(folder), 700)) == log.lines()
    report = verify_tiles(FolderTiles(folder), log.trust)
    assert report.ok and report.entries == 700, report.problem
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0 and "700 entries" in result.stdout


def test_a_tampered_or_missing_tile_is_named(tmp_path: Path) -> None:
    log = generate_log(600, seed=7)
    folder = tmp_path / "tiles"
    write_tiles(folder, log.lines(), log.checkpoint(), log.trust)
    level0 = folder / "tile/0/001"
    original = level0.read_bytes()
    level0.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    report = verify_tiles(FolderTiles(folder), log.trust)
    assert report.problem is not None and report.problem.reason == (
        "tiles: tile/0/001: does not match the hashes of the entries 256.. it covers")
    level0.write_bytes(original)
    (folder / "tile/entries/001").unlink()
    report = verify_tiles(FolderTiles(folder), log.trust)
    assert report.problem is not None and report.problem.index == 256
    assert "tile/entries/001: cannot read" in report.problem.reason
    bundle = folder / "tile/entries/000"
    bundle.write_bytes(bundle.read_bytes()[:-3])
    report = verify_tiles(FolderTiles(folder), log.trust)
    assert report.problem is not None and report.problem.index == 0
    result = runner.invoke(app, ["verify", str(folder)])
    assert result.exit_code == 1 and "tile/entries/000" in result.stdout


def test_entries_too_long_for_a_bundle_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(TileError, match="entry 1: 70000 bytes"):
        write_tiles(tmp_path / "t", [b"ok", b"x" * 70_000], "note\n")
    assert not (tmp_path / "t").exists()
