"""A tiny log (leaves, tree, log key) and witnesses over it, for the witnessing tests."""

from __future__ import annotations

from dataclasses import dataclass, field

from audit.checkpoint import Checkpoint, sign_checkpoint
from audit.cosignature import CosignatureV1Signer
from audit.merkle import MemoryTree, leaf_hash
from audit.note import Vkey
from audit.signing import Signer
from audit.trust import Trust
from audit.witness import MemoryWitnessStore, Witness, WitnessedLog, WitnessStore

ORIGIN = "exchange.example/log"


@dataclass
class Clock:
    """A settable clock, POSIX seconds."""

    now: float = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class TinyLog:
    """Leaves "entry-<i>" unless told otherwise; `fork(at)` changes everything from `at` on."""

    log: Signer = field(default_factory=Signer.generate)
    operator: Signer = field(default_factory=Signer.generate)
    origin: str = ORIGIN
    tree: MemoryTree = field(default_factory=MemoryTree)

    def grow(self, count: int, tag: str = "entry") -> TinyLog:
        for _ in range(count):
            self.tree.append(leaf_hash(f"{tag}-{self.tree.size}".encode()))
        return self

    def fork(self, at: int, tag: str = "forked") -> TinyLog:
        """Another history, signed with the same keys, equal to this one before `at`."""
        other = TinyLog(self.log, self.operator, self.origin)
        other.tree.extend(self.tree.leaf(i) for i in range(at))
        return other.grow(self.tree.size - at, tag)

    def checkpoint(self, size: int | None = None) -> str:
        size = self.tree.size if size is None else size
        return sign_checkpoint(Checkpoint(self.origin, size, self.tree.root(size)), self.log)

    def proof(self, old: int, new: int | None = None) -> list[bytes]:
        return [] if old == 0 else self.tree.consistency_proof(old, new)

    @property
    def log_vkey(self) -> Vkey:
        return Vkey(self.origin, 0x01, self.log.public_key)

    def trust(self, witnesses: list[Vkey] | None = None, quorum: int | None = None) -> Trust:
        return Trust(self.origin, self.operator.public_key, self.log.public_key,
                     tuple(witnesses or ()), quorum)


def make_witness(log: TinyLog, name: str, *, clock: Clock | None = None,
                 store: WitnessStore | None = None, signer: Signer | None = None) -> Witness:
    return Witness(CosignatureV1Signer(name, signer or Signer.generate()),
                   [WitnessedLog(log.origin, log.log_vkey)], store or MemoryWitnessStore(),
                   clock=clock or Clock())
