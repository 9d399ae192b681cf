"""HTTP routes for witnessing and for what auditors fetch: checkpoints, cosignatures, export pages.

Why a module of its own: these handlers only move bytes between the HTTP layer and
`exchange.coordinator.checkpointing.Checkpointing`; the rest of the API does not need them.

- `GET /v1/hospital/witness/checkpoint?old_size=N&wait_s=S` (a hospital, signed request): the
  newest checkpoint as a C2SP tlog-witness add-checkpoint request body (`old N`, the
  consistency proof, a blank line, the signed note), waiting up to S seconds for one larger
  than N (a long poll, so a witness hears of a checkpoint as soon as it is signed). Header
  `Witness-Cosigned: 1` when this hospital's witness already cosigned it.
- `POST /v1/hospital/witness/cosignature` (a hospital): its witness's cosignature line(s) on
  the checkpoint of a size; refused (422, with the reason) unless they verify with the witness
  key the hospital registered in the log, on that checkpoint, dated no later than now + skew.
- `GET /v1/audit/checkpoint`: the served checkpoint (see `Checkpointing.served_note`);
  `Accept: text/plain` gives the signed note itself (so it can be saved and verified as is),
  otherwise JSON with the size, root and cosigners.
- `GET /v1/audit/export?start=&limit=`: entries as NDJSON, paged (all of them without `limit`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from litestar import Request, Response
from litestar.concurrency import sync_to_thread
from litestar.datastructures import State
from litestar.params import Parameter
from litestar.response import Stream
from pydantic import BaseModel, Field

from audit.checkpoint import parse_checkpoint
from audit.cosignature import check_cosignatures
from audit.signing import b64encode
from exchange.coordinator import problems
from exchange.coordinator.checkpointing import Checkpointing, CosignatureRefusedError

WITNESS_REQUEST_TYPE = "text/x.tlog.add-checkpoint; charset=utf-8"
NOTE_TYPE = "text/plain; charset=utf-8"
ExportStart = Annotated[int, Parameter(ge=0, le=2**53, description="first entry")]
ExportLimit = Annotated[int | None, Parameter(ge=1, le=100_000, description="entries at most")]


class CosignatureIn(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    size: Annotated[int, Field(ge=0, le=2**53, description="the cosigned checkpoint's size")]
    cosignature: Annotated[str, Field(min_length=1, max_length=4000,
                                      description="the witness's cosignature/v1 note line(s)")]


class CosignatureAccepted(BaseModel):
    size: int
    cosigned_by: list[str]
    quorum: int
    quorum_met: bool


class CheckpointOut(BaseModel):
    size: int
    root_hash: str
    checkpoint: Annotated[str, Field(description="C2SP tlog-checkpoint signed note, cosignatures "
                                                 "included")]
    cosigned_by: list[str] = Field(default_factory=list)
    quorum: int = 0


def checkpointing(state: State) -> Checkpointing:
    found: Checkpointing = state.checkpointing
    return found


async def witness_offer(state: State, hospital_id: str, old_size: int, wait_s: float) -> Response[bytes]:
    service = checkpointing(state)
    witness = await sync_to_thread(service.witness_of, hospital_id)
    offer = await service.offer_waiting(old_size, witness, wait_s)
    return Response(offer.body, media_type=WITNESS_REQUEST_TYPE,
                    headers={"Witness-Cosigned": "1" if offer.cosigned else "0",
                             "Checkpoint-Size": str(offer.size)})


def add_cosignature(state: State, hospital_id: str, data: CosignatureIn) -> CosignatureAccepted:
    service = checkpointing(state)
    try:
        cosigning = service.add_cosignature(data.size, data.cosignature, service.witness_of(hospital_id))
    except CosignatureRefusedError as exc:
        raise problems.unprocessable([{"field": exc.field, "reason": exc.reason}]) from exc
    return CosignatureAccepted(size=data.size, cosigned_by=sorted(cosigning.signed),
                               quorum=cosigning.required, quorum_met=cosigning.quorum_met)


def _wants_note(request: Request[Any, Any, Any]) -> bool:
    best = request.accept.best_match(["application/json", "text/plain"], default="application/json")
    return best == "text/plain"


def served_checkpoint(state: State, request: Request[Any, Any, Any]) -> Response[Any]:
    service = checkpointing(state)
    note = service.served_note()
    if _wants_note(request):
        return Response(note.encode(), media_type=NOTE_TYPE)
    parsed = parse_checkpoint(note)
    trust = service.trust()
    report = check_cosignatures(note, trust.witnesses)
    return Response(CheckpointOut(size=parsed.size, root_hash=b64encode(parsed.root), checkpoint=note,
                                  cosigned_by=sorted(report.signed),
                                  quorum=trust.default_quorum).model_dump())


def export_page(state: State, start: int, limit: int | None) -> Stream:
    log = state.audit_log
    size = log.size()
    stop = size if limit is None else min(size, start + limit)

    def lines() -> Iterator[bytes]:
        if start < stop:
            for entry in log.entries(start, stop):
                yield entry.leaf_bytes() + b"\n"

    return Stream(lines(), media_type="application/x-ndjson")
