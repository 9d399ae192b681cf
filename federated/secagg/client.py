"""The hospital side of SecAgg+: Flower's `secaggplus_mod`, unmodified, between two adapters.

`secagg_mod` is the ClientApp's only mod. A TRAIN message that carries Flower's SecAgg+ config
record goes through `secaggplus_mod` (setup, share keys, collect masked vectors, unmask; its
per-round keys and shares live in the node's `context.state`, as in any Flower deployment); any
other message goes straight to the app, and the app itself refuses to send a study's update in
clear when the study requires secure aggregation (`federated.client_app`). Helpers the mod
calls are swapped for equivalents before each stage (`flwr_internals.patch_secagg_prg`, for
strength, and `patch_secagg_shamir` and `patch_secagg_key_parsing`, for speed; each checks
itself once per process).

In the collect-masked-vectors stage `secaggplus_mod` calls the app and masks what it returns,
which it reads in Flower's legacy FitRes layout. `_as_fitres` gives it that: the hospital's
update as a DELTA from the global model the message carried (small values, so Flower's +-8
clipping range quantizes them finely, and the server adds the average delta back), weighted by
the records used, or a zero vector of weight 0 when the hospital did not train. Values that
Flower's quantizer would clip are clipped here first and counted (`m.secagg_clipped`), so a
clip is visible in the round's metrics instead of silent. The hospital's status record
(status, reason, signed receipt, metrics) travels next to the masked vector, as in a plain
round; the server ignores the masked vector of a hospital whose reply is not a valid ``ok``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from federated import packing
from federated.distributed_noise import INTEGER_METRIC
from federated.runtime import flwr_internals
from federated.secagg.server import NEXT_ERROR, NEXT_KEY, NEXT_ROUND
from federated.server_app import GLOBAL_KEY, METRIC_PREFIX, REPLY_KEY, STATUS_OK, UPDATE_KEY, WEIGHTS_KEY

CONFIGS_KEY = flwr_internals.SECAGG_CONFIGS_KEY
STAGE = flwr_internals.SECAGG_KEYS["STAGE"]
SETUP, SHARE_KEYS, COLLECT = flwr_internals.SECAGG_STAGES[:3]
#: stages whose reply the server answers with the round's next stage as soon as all replies are in
#: (the unmask stage is a round's last: the next message waits for the server's aggregation)
FOLLOWED_AT_ONCE = (SETUP, SHARE_KEYS, COLLECT)
#: secaggplus_mod's Key.MAX_WEIGHT / CLIPPING_RANGE / TARGET_RANGE values, read from its state
_STATE_KEY = "secaggplus_state"

Handler = Callable[[Message, Context], Message]


def is_secagg_message(message: Message) -> bool:
    """A SecAgg+ stage message (as opposed to a plain train message)."""
    return (
        message.metadata.message_type == MessageType.TRAIN and CONFIGS_KEY in message.content.config_records
    )


def secagg_mod(message: Message, context: Context, call_next: Handler) -> Message:
    """The ClientApp mod: SecAgg+ stage messages through Flower's mod, the rest unchanged.

    A message whose records the server packed into one (`federated.packing`: fewer objects, so
    fewer requests per message) is unpacked first and its reply packed the same way, so
    everything below sees the records as the server built them.
    A stage message may carry the NEXT round's setup or share-keys stage as well (`NEXT_KEY`,
    pipelining, `federated.secagg.server`): it runs after this round's stage, in the same task,
    on its own state slot, and its reply travels under `NEXT_KEY` in the same reply; if it fails,
    the reply says why there and this round's reply is unaffected."""
    if not message.has_content() or not packing.is_packed(message.content):
        return _secagg_mod(message, context, call_next)
    packed = message.content
    message.content = packing.unpack(packed)
    try:
        reply = _secagg_mod(message, context, call_next)
    finally:
        message.content = packed  # the message as it came (an in-process grid keeps it)
    if reply.has_content():
        reply.content = packing.pack(reply.content)
    return reply


def _secagg_mod(message: Message, context: Context, call_next: Handler) -> Message:
    if not is_secagg_message(message):
        return call_next(message, context)
    pipelined = message.content.config_records.get(NEXT_KEY)
    if pipelined is not None:
        del message.content[NEXT_KEY]
    stage = message.content.config_records[CONFIGS_KEY].get(STAGE)
    reply = _stage(message, context, call_next)
    if stage in FOLLOWED_AT_ONCE and not reply.has_error():
        # the server sends this round's next stage as soon as every reply is in: this node's
        # SuperNode (hosted in this process) polls for it faster for a while, once this reply is out
        flwr_internals.supernode_expects_follow_up()
    if pipelined is None or reply.has_error():
        return reply
    reply.content[NEXT_KEY] = _next_stage(message, context, pipelined)
    return reply


def _next_stage(message: Message, context: Context, record: ConfigRecord) -> ConfigRecord:
    """The next round's key-exchange stage (setup or share keys only: neither trains)."""
    values = dict(record)
    round_ = values.pop(NEXT_ROUND, None)
    if not isinstance(round_, int) or values.get(STAGE) not in (SETUP, SHARE_KEYS):
        return ConfigRecord({NEXT_ERROR: "a pipelined stage must be setup or share_keys, with its round"})
    try:
        inner = Message(
            RecordDict({CONFIGS_KEY: ConfigRecord(values)}),
            dst_node_id=message.metadata.dst_node_id,
            message_type=MessageType.TRAIN,
            group_id=str(round_),
        )
        out = _stage(inner, context, _no_app)
    except Exception as exc:  # the mod raises on a bad stage or config: report it, keep this round
        return ConfigRecord({NEXT_ERROR: f"{type(exc).__name__}: {exc}"})
    if out.has_error():
        return ConfigRecord({NEXT_ERROR: out.error.reason or "error"})
    return out.content.config_records[CONFIGS_KEY]


def _no_app(message: Message, context: Context) -> Message:
    raise RuntimeError("a pipelined key-exchange stage does not run the app")


def _stage(message: Message, context: Context, call_next: Handler) -> Message:
    """One SecAgg+ stage through Flower's mod, on the state slot of the message's round."""
    flwr_internals.patch_secagg_prg()
    flwr_internals.patch_secagg_shamir()
    flwr_internals.patch_secagg_key_parsing()
    mod = flwr_internals.secaggplus_mod()
    states = context.state.config_records
    round_ = message.metadata.group_id
    slot = _slot(round_)
    # secaggplus_mod keeps one protocol state per node; each round's lives in its own slot, so
    # the server can run the key exchange of round r + 1 while round r trains and unmasks
    # (`federated.secagg.server`, pipelining). No slot: a fresh state (only `setup` is accepted).
    if slot in states:
        states[_STATE_KEY] = states[slot]
    else:
        states.pop(_STATE_KEY, None)
    try:
        reply = mod(message, context, lambda m, c: _as_fitres(m, c, call_next))
    finally:
        states = context.state.config_records  # a view: read it again after the mod wrote
        if _STATE_KEY in states:
            states[slot] = states.pop(_STATE_KEY)
        _forget_before(states, round_)
    if reply.has_error():
        return reply
    # Keep only what the server reads: the masked vector (and keys, shares) and our status record.
    content = RecordDict({CONFIGS_KEY: reply.content.config_records[CONFIGS_KEY]})
    status = reply.content.config_records.get(REPLY_KEY)
    if status is not None:
        content[REPLY_KEY] = status
    return Message(content, reply_to=message)


def _slot(round_: str) -> str:
    return f"{_STATE_KEY}:{round_}"


def _forget_before(states: Any, round_: str) -> None:
    """Drop the protocol states of rounds before `round_` - 1 (finished or abandoned)."""
    try:
        current = int(round_)
    except ValueError:
        return
    prefix = _STATE_KEY + ":"
    for key in [k for k in states if k.startswith(prefix)]:
        try:
            old = int(key[len(prefix) :]) < current - 1
        except ValueError:
            old = True
        if old:
            del states[key]


def _state_float(context: Context, key: str) -> float:
    state = context.state.config_records.get(_STATE_KEY)
    value = state.get(key) if state is not None else None
    if not isinstance(value, int | float):
        raise ValueError(f"secagg: no {key!r} in the SecAgg+ state (setup stage missing)")
    return float(value)


def _as_fitres(message: Message, context: Context, call_next: Handler) -> Message:
    """Run the app, hand `secaggplus_mod` the update as a weighted delta in FitRes layout."""
    reply = call_next(message, context)
    if reply.has_error():
        raise RuntimeError(f"the ClientApp failed: {reply.error.reason}")
    status = reply.content.config_records[REPLY_KEY]
    global_weights = np.asarray(
        message.content.array_records[GLOBAL_KEY][WEIGHTS_KEY].numpy(), dtype=np.float64
    )
    update = reply.content.array_records.get(UPDATE_KEY)
    num_examples = 0
    delta = np.zeros_like(global_weights)
    clipped = 0
    ok = status.get("status") == STATUS_OK
    if ok and update is not None and status.get(METRIC_PREFIX + INTEGER_METRIC) == 1.0:
        # distributed noise: an encoded integer vector (`federated.distributed_noise.encode`),
        # passed as it is with weight ratio 1, which secaggplus_mod quantizes to exactly its integers
        content = flwr_internals.fitres_content(
            np.asarray(update[WEIGHTS_KEY].numpy(), dtype=np.float64),
            int(_state_float(context, "max_weight")),
        )
        content[REPLY_KEY] = ConfigRecord(dict(status))
        return Message(content, reply_to=message)
    if ok and update is not None:
        # the same integer the server predicts the weight sum from (`server.member_weight`)
        num_examples = int(float(status.get(METRIC_PREFIX + "num_examples", 0.0)))  # type: ignore[arg-type]
        delta = np.asarray(update[WEIGHTS_KEY].numpy(), dtype=np.float64) - global_weights
        clip = _state_float(context, "clipping_range")
        max_weight = _state_float(context, "max_weight")
        target = _state_float(context, "target_range")
        scale = round(num_examples / max_weight * target) / target  # what the mod multiplies by
        if scale > 0:
            bound = clip / scale
            clipped = int(np.count_nonzero(np.abs(delta) > bound))
            delta = np.clip(delta, -bound, bound)
    content = flwr_internals.fitres_content(delta, num_examples)
    record = ConfigRecord(dict(status))
    record[METRIC_PREFIX + "secagg_clipped"] = float(clipped)
    content[REPLY_KEY] = record
    return Message(content, reply_to=message)
