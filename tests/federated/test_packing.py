"""`federated.packing`: a message's records as one ConfigRecord, and back, exactly (values, types,
array bytes and order), through Flower's own serialization of the record."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from federated import packing


def _content() -> RecordDict:
    return RecordDict(
        {
            "global": ArrayRecord(
                {"w": Array(np.arange(31, dtype=np.float32)), "z": Array(np.ones((2, 3), dtype=np.int64))}
            ),
            "secaggplus_configs": ConfigRecord(
                {"stage": "collect", "ctxts": [b"\x00a", b"b"], "srcs": [3, 1], "none": [], "f": 1.5,
                 "b": True, "i": -7}
            ),
            "metrics": MetricRecord({"n": 12, "loss": 0.25, "curve": [1.0, 0.5]}),
            "empty": ConfigRecord(),
        }
    )


def _over_the_wire(content: RecordDict) -> RecordDict:
    """Each record serialized and parsed as Flower does when it moves the object."""
    out = {}
    for name, record in content.items():
        out[name] = type(record).inflate(record.deflate(), {k: type(c).inflate(c.deflate(), {})
                                                            for k, c in (record.children or {}).items()})
    return RecordDict(out)


def test_a_packed_content_is_one_config_record_and_unpacks_to_the_same_objects() -> None:
    content = _content()
    packed = packing.pack(content)
    assert packing.is_packed(packed) and list(packed) == [packing.PACKED_KEY]
    assert isinstance(packed[packing.PACKED_KEY], ConfigRecord)  # no children: one object
    back = packing.unpack(_over_the_wire(packed))
    assert list(back) == list(content)
    for name, record in content.items():  # same content hash: the same values, types and bytes
        assert back[name].object_id == record.object_id, name
    assert list(back.array_records["global"]) == ["w", "z"]
    np.testing.assert_array_equal(back.array_records["global"]["z"].numpy(), np.ones((2, 3), dtype=np.int64))
    assert back.config_records["secaggplus_configs"]["srcs"] == [3, 1]
    assert type(back.metric_records["metrics"]["n"]) is int


def test_a_large_array_record_stays_a_record_of_its_own() -> None:
    big = ArrayRecord({"w": Array(np.zeros(100, dtype=np.float32))})
    size = len(big["w"].data)  # the serialized array: 400 bytes and numpy's header
    content = RecordDict({"global": big, "c": ConfigRecord({"stage": "x"})})
    packed = packing.pack(content, inline_limit=size - 1)
    assert sorted(packed) == sorted([packing.PACKED_KEY, "global"]) and packed["global"] is big
    assert packing.unpack(packed)["global"] is big
    assert list(packing.pack(content, inline_limit=size)) == [packing.PACKED_KEY]


def test_packing_is_idempotent_and_an_unpacked_content_passes_unchanged() -> None:
    content = _content()
    packed = packing.pack(content)
    assert packing.pack(packed) is packed
    assert packing.unpack(content) is content
    assert not packing.is_packed(content)


def _broken(mutate: str) -> RecordDict:
    packed = packing.pack(RecordDict({"g": ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})}))
    record = packed.config_records[packing.PACKED_KEY]
    header = json.loads(str(record[packing.PACKED_HEADER]))
    if mutate == "version":
        header["v"] = 99
    elif mutate == "missing value":
        del record["0.0"]
    elif mutate == "not bytes":
        record["0.0"] = "text"
    elif mutate == "kind":
        header["records"][0]["kind"] = "tensor"
    elif mutate == "header":
        record[packing.PACKED_HEADER] = "{not json"
        return packed
    record[packing.PACKED_HEADER] = json.dumps(header)
    return packed


@pytest.mark.parametrize("mutate", ["version", "missing value", "not bytes", "kind", "header"])
def test_a_malformed_packed_record_is_refused_with_the_reason(mutate: str) -> None:
    with pytest.raises(packing.PackingError, match="packed message"):
        packing.unpack(_broken(mutate))
