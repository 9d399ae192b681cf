"""A message's records packed into one ConfigRecord, and back: fewer objects per message.

flwr 1.42 moves every object of a message's tree with its own HTTP request, at the sender
(`PushObject`, each with the SuperLink's checks and a database write) and at the receiver
(`PullObject`): the message, its RecordDict, each record, each Array and each of its chunks. A
SecAgg+ collect message was seven objects (the model's ArrayRecord, Array and chunk, the stage's
ConfigRecord, the next round's riding stage), a reply four or five, and at ten hospitals the
SuperLink's CPU goes to those requests (docs/benchmarks/flower.md, "Per-message cost"). Packed, a
message is three objects whatever it carries: the message, its RecordDict and one ConfigRecord.

This is an encoding at the transport boundary only: `pack` runs just before a message is sent and
`unpack` just after one arrives (the ServerApp's SecAgg+ transport, the hospital's `secagg_mod`),
so Flower's `secaggplus_mod`, the protocol's stages and our ClientApp see exactly the RecordDict
they saw before. Config and metric records keep their values and types; an ArrayRecord keeps its
arrays' order and each Array's dtype, shape, stype and bytes (what `Array.numpy()` reads). An
ArrayRecord larger than `inline_limit` bytes stays a record of its own: its objects are shared by
every message of the exchange (pushed once), while inlined bytes are pushed once per message.

The packed record's layout: `PACKED_HEADER` is a JSON description (version, then per record its
kind, name and keys, and per array its dtype, stype and shape); every value sits under
`"<record index>.<key index>"`, so no record name or key needs escaping.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

#: the one record of a packed message's content
PACKED_KEY = "exchange_packed"
PACKED_HEADER = "h"
_VERSION = 1
#: ArrayRecords up to this many bytes are inlined (the bench's models: 31 weights, 124 bytes)
DEFAULT_INLINE_LIMIT = 64 * 1024


class PackingError(ValueError):
    """A packed record that does not unpack (malformed, or another version)."""


def is_packed(content: RecordDict) -> bool:
    """Whether `content` was made by `pack`."""
    return PACKED_KEY in content.config_records


def _array_bytes(record: ArrayRecord) -> int:
    return sum(len(array.data) for array in record.values())


def pack(content: RecordDict, *, inline_limit: int = DEFAULT_INLINE_LIMIT) -> RecordDict:
    """`content` as one ConfigRecord (plus any ArrayRecord over `inline_limit` bytes, as is).

    A content already packed, or holding a record named `PACKED_KEY`, is returned unchanged."""
    if PACKED_KEY in content:
        return content
    header: list[dict[str, Any]] = []
    packed = ConfigRecord()
    kept: dict[str, Any] = {}
    for name, record in content.items():
        i = len(header)
        if isinstance(record, ArrayRecord):
            if _array_bytes(record) > inline_limit:
                kept[name] = record
                continue
            arrays = list(record.items())
            header.append({"kind": "array", "name": name, "keys": [k for k, _ in arrays],
                           "arrays": [[a.dtype, a.stype, list(a.shape)] for _, a in arrays]})
            for j, (_, array) in enumerate(arrays):
                packed[f"{i}.{j}"] = array.data
            continue
        kind = "config" if isinstance(record, ConfigRecord) else "metric"
        items = list(record.items())
        header.append({"kind": kind, "name": name, "keys": [k for k, _ in items]})
        for j, (_, value) in enumerate(items):
            packed[f"{i}.{j}"] = value
    packed[PACKED_HEADER] = json.dumps({"v": _VERSION, "records": header}, separators=(",", ":"))
    return RecordDict({PACKED_KEY: packed, **kept})


def unpack(content: RecordDict) -> RecordDict:
    """The RecordDict `pack` was given (a content that is not packed is returned unchanged)."""
    if not is_packed(content):
        return content
    packed = content.config_records[PACKED_KEY]
    try:
        header = json.loads(str(packed[PACKED_HEADER]))
        if header.get("v") != _VERSION:
            raise PackingError(f"packed message: version {header.get('v')!r}, expected {_VERSION}")
        out: dict[str, Any] = {}
        for i, spec in enumerate(header["records"]):
            values: list[Any] = [packed[f"{i}.{j}"] for j in range(len(spec["keys"]))]
            if spec["kind"] == "array":
                if not all(isinstance(v, bytes) for v in values):
                    raise PackingError(f"packed message: record {spec['name']!r}: an array that is not bytes")
                out[spec["name"]] = ArrayRecord({
                    key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)
                    for key, (dtype, stype, shape), data in zip(spec["keys"], spec["arrays"], values,
                                                                 strict=True)})
            elif spec["kind"] == "config":
                out[spec["name"]] = ConfigRecord(dict(zip(spec["keys"], values, strict=True)))
            elif spec["kind"] == "metric":
                out[spec["name"]] = MetricRecord(dict(zip(spec["keys"], values, strict=True)))
            else:
                raise PackingError(f"packed message: unknown record kind {spec['kind']!r}")
    except PackingError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # a malformed header or a missing value
        raise PackingError(f"packed message: malformed ({type(exc).__name__}: {exc})") from None
    for name, record in content.items():
        if name != PACKED_KEY:
            out[name] = record
    return RecordDict(out)
