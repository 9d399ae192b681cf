"""RFC 6962 / RFC 9162 proof vectors from transparency-dev/merkle, vendored in data/rfc6962/
(source, commit and licence in its README.md).

Every vector must come out exactly as its `wantErr` says: success when false, ProofError when
true. The reference tree checks leaf hashes and roots for sizes 0..8, plus every inclusion and
consistency proof we generate over it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from audit.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    ProofError,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).resolve().parent / "data" / "rfc6962"
INCLUSION = sorted((VECTORS / "inclusion").rglob("*.json"))
CONSISTENCY = sorted((VECTORS / "consistency").rglob("*.json"))


def _b64(value: str) -> bytes:
    return base64.b64decode(value) if value else b""


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


def test_all_vectors_are_present() -> None:
    # The README promises 98 + 98 cases, 6 positive of each kind; a missing folder must fail.
    assert len(INCLUSION) == 98
    assert len(CONSISTENCY) == 98
    assert sum(not _load(p)["wantErr"] for p in INCLUSION) == 6
    assert sum(not _load(p)["wantErr"] for p in CONSISTENCY) == 6
    # vendored data travels with its licence and its source
    assert "Apache License" in (VECTORS / "LICENSE.transparency-dev-merkle.Apache-2.0").read_text()
    assert "transparency-dev/merkle" in (VECTORS / "README.md").read_text()


@pytest.mark.parametrize("path", INCLUSION, ids=_name)
def test_inclusion_vector(path: Path) -> None:
    case = _load(path)
    proof = [_b64(p) for p in case["proof"] or []]
    args = (_b64(case["leafHash"]), case["leafIdx"], case["treeSize"], proof, _b64(case["root"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("path", CONSISTENCY, ids=_name)
def test_consistency_vector(path: Path) -> None:
    case = _load(path)
    proof = [_b64(p) for p in case["proof"] or []]
    args = (case["size1"], case["size2"], proof, _b64(case["root1"]), _b64(case["root2"]))
    if case["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def _reference() -> dict[str, Any]:
    return _load(VECTORS / "rfc6962-reference-tree.json")


def test_reference_tree_leaf_hashes_and_roots() -> None:
    ref = _reference()
    inputs = [bytes.fromhex(h) for h in ref["leaf_inputs_hex"]]
    assert [leaf_hash(d).hex() for d in inputs] == ref["leaf_hashes_hex"]
    tree = MemoryTree()
    assert tree.root() == EMPTY_ROOT == bytes.fromhex(ref["roots_by_tree_size_hex"]["0"])
    for data in inputs:
        tree.append_data(data)
    for size_text, root_hex in ref["roots_by_tree_size_hex"].items():
        assert tree.root(int(size_text)).hex() == root_hex, size_text


def test_generated_proofs_over_the_reference_tree_verify() -> None:
    ref = _reference()
    tree = MemoryTree(bytes.fromhex(h) for h in ref["leaf_hashes_hex"])
    for size in range(1, tree.size + 1):
        for index in range(size):
            verify_inclusion(tree.leaf(index), index, size, tree.inclusion_proof(index, size),
                             tree.root(size))
        for old in range(1, size + 1):
            verify_consistency(old, size, tree.consistency_proof(old, size), tree.root(old),
                               tree.root(size))


def test_happy_path_vectors_are_what_we_generate() -> None:
    # Upstream's positive inclusion proofs over the 8-leaf tree are exactly our proofs.
    ref = _reference()
    tree = MemoryTree(bytes.fromhex(h) for h in ref["leaf_hashes_hex"])
    checked = 0
    for path in INCLUSION:
        case = _load(path)
        if case["wantErr"] or case["treeSize"] > tree.size:
            continue
        if case["root"] and _b64(case["root"]) != tree.root(case["treeSize"]):
            continue
        proof = [_b64(p) for p in case["proof"] or []]
        assert tree.inclusion_proof(case["leafIdx"], case["treeSize"]) == proof, _name(path)
        checked += 1
    assert checked >= 1
