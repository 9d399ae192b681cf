"""The server side of SecAgg+: the four stages of Flower's `SecAggPlusWorkflow`, on our exchange.

Same protocol and the same messages as flwr 1.42's `SecAggPlusWorkflow` (the hospitals run
Flower's own `secaggplus_mod`), driven with the study's fast push/poll exchange instead of
`Grid.send_and_receive` (which sleeps 3 s per poll), and without the legacy Strategy layer:

1. setup: the round's parameters to every sampled hospital; each replies two public keys;
2. share keys: each hospital gets its neighbours' keys and replies its Shamir shares (of its
   private-mask seed and its first secret key) encrypted for each neighbour;
3. collect masked vectors: each gets the shares meant for it and the global model, trains, and
   replies its status record (receipt) and its masked, quantized, weighted delta;
4. unmask: each hospital whose masked vector is aggregated is told who is in the aggregate and
   who dropped, and replies its shares: private-mask seeds of the members, first secret keys of
   the dropped (to remove the pairwise masks they left in the members' vectors).

What differs from the workflow, on purpose (each is the protocol's own rule, applied strictly):
- a hospital whose reply is malformed is treated as dropped at that stage, with the reason,
  instead of crashing the server;
- the aggregate is formed only from hospitals whose stage-3 reply is a valid ``ok`` (a signed
  receipt that verifies, a masked vector of the right shape); every other masked vector is left
  out and its sender treated as dropped, so only the members' inputs are in the model;
- "dropped" for the unmask stage means "its shares were distributed (stage 2 done) but its
  masked vector is not aggregated"; the workflow also lists hospitals lost in stages 1-2 there,
  whose shares nobody holds, which makes any such round fail;
- two integrity checks before a model is accepted: a reconstructed first secret key must match
  the public key its owner sent in the setup stage, and the unmasked weight sum must equal the
  sum the members' record counts predict (`SecAggParams.q_ratio`); a wrong or stale share, or a
  hospital with another mask generator, fails the round with the reason, never a wrong model.
No hospital that was not sampled at setup takes part in the round (a late joiner waits for the
next round): its keys would be missing from everyone else's masks.

Pipelining: stages 1-2 of round r + 1 do not depend on the model, so they ride inside round r's
collect and unmask messages (`NEXT_KEY`; the hospital's `secagg_mod` runs them on a separate
state slot) and round r + 1 starts at its collect stage (`SecAggRound.next`, `KeyExchange`):
two messages per hospital per round instead of four, fresh keys every round as before. The
pipelined exchange is used only for the same hospitals, all of which completed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from federated.runtime import flwr_internals
from federated.secagg.params import MIN_HOSPITALS, SecAggParams, SecAggParamsError

log = logging.getLogger("federated.secagg")

CONFIGS_KEY = flwr_internals.SECAGG_CONFIGS_KEY
#: the next round's stage riding in this round's message and reply (`federated.secagg.client`)
NEXT_KEY, NEXT_ROUND, NEXT_ERROR = "secagg_next", "round", "error"
K = flwr_internals.SECAGG_KEYS
SETUP, SHARE_KEYS, COLLECT, UNMASK = flwr_internals.SECAGG_STAGES
#: Once every secret of the unmask stage has its threshold of shares, the stage waits for the
#: other replies at most this many seconds, or `UNMASK_GRACE_FACTOR` times the time the threshold
#: took when that is longer: a hospital lost after its masked vector arrived no longer holds the
#: round for the stage's whole timeout, and a merely slower one still brings its reply (with the
#: next round's share-keys stage riding in it, which keeps that round pipelined).
UNMASK_GRACE_MIN_S = 1.0
UNMASK_GRACE_FACTOR = 1.0


class HospitalReply(Protocol):
    """A decoded stage-3 reply (`federated.server_app.HospitalReply`)."""

    node_id: int
    status: str
    reason: str
    receipt: Any
    metrics: dict[str, float]


class PhaseResult(Protocol):
    """One exchange's replies (`federated.server_app.PhaseResult`)."""

    replies: dict[int, Message]
    missing: list[int]
    hospital_of: dict[int, str]
    missing_hospitals: list[str]
    #: it ended before its timeout because the replies in sufficed (`Transport.send_many`)
    ended_early: bool


class Transport(Protocol):
    """How the driver talks to the hospitals; the ServerApp provides it
    (`federated.server_app.SecAggTransport`), so this module does not depend on the ServerApp."""

    #: the status of a reply that contributes an update
    ok: str

    def send_many(
        self,
        batches: Sequence[tuple[Mapping[int, RecordDict], int]],
        timeout: float,
        enough: Callable[[int, Message], float | None] | None = None,
    ) -> Sequence[PhaseResult]:
        """For each batch (contents by node, round), one TRAIN message per node, all pushed at
        once; each batch's replies within `timeout`, in batch order. `enough(node, reply)`, told
        of each reply (its records as the hospital built them) as it arrives: None while the
        replies so far do not suffice, else the seconds the exchange still waits for the rest
        (the exchange then ends early, `PhaseResult.ended_early`)."""

    def model(self, weights: np.ndarray) -> RecordDict:
        """The content that carries the global model to a hospital."""


#: the ServerApp's reply decoding, given the collect stage's exchange (what `Transport.send` returned)
Decoder = Callable[[Any], Sequence[HospitalReply]]


class SecAggRoundError(RuntimeError):
    """The round cannot produce a secure aggregate; the message says why (it goes in the log)."""


@dataclass
class SecAggRound:
    """What one SecAgg+ round produced."""

    params: SecAggParams
    #: the collect-masked-vectors stage (the one that trains): its replies, decoded
    phase: PhaseResult
    decoded: list[HospitalReply]
    #: the hospitals whose inputs formed the aggregate (each with its verified receipt)
    members: list[HospitalReply] = field(default_factory=list)
    weights: np.ndarray | None = None
    #: why no aggregate came out (None: `weights` is the new global model)
    failure: str | None = None
    #: hospitals lost before the collect stage (no update from them)
    lost: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    #: the next round's key exchange, when it ran during this round (pipelining)
    next: KeyExchange | None = None
    #: why `next` is None, or whom it lacks (logged; None: complete, or no pipelining asked)
    next_note: str | None = None


@dataclass
class KeyExchange:
    """Stages 1 and 2 of one round, done: who takes part and the shares each must receive."""

    round: int
    hospital_of: dict[int, str]
    params: SecAggParams
    sampled: list[int]
    neighbours: dict[int, set[int]]
    public_keys: dict[int, tuple[bytes, bytes]]
    #: hospitals that sent their shares (stage 2): the round's possible members
    shared: set[int]
    #: node -> [(source node, ciphertext)] to deliver in the collect stage
    forward: dict[int, list[tuple[int, bytes]]]
    timings: dict[str, float] = field(default_factory=dict)


def _configs(message: Message | ConfigRecord) -> ConfigRecord:
    if isinstance(message, ConfigRecord):  # a pipelined stage's reply (`_pipelined`)
        if NEXT_ERROR in message:
            raise ValueError(f"pipelined stage failed at the hospital: {message[NEXT_ERROR]!r}")
        return message
    if message.has_error():
        raise ValueError(f"flower error {message.error.code}: {message.error.reason}")
    record = message.content.config_records.get(CONFIGS_KEY)
    if record is None:
        raise ValueError(f"reply has no {CONFIGS_KEY} record")
    return record


def _riding(content: RecordDict, round_: int) -> ConfigRecord:
    """A next-round stage record to carry inside this round's message (`client.NEXT_KEY`)."""
    record = ConfigRecord(dict(content.config_records[CONFIGS_KEY]))
    record[NEXT_ROUND] = round_
    return record


def _pipelined(phase: PhaseResult) -> dict[int, Message | ConfigRecord]:
    """The next round's stage replies that rode along in this exchange's replies (`NEXT_KEY`)."""
    out: dict[int, Message | ConfigRecord] = {}
    for node, reply in phase.replies.items():
        if not reply.has_error() and NEXT_KEY in reply.content.config_records:
            out[node] = reply.content.config_records[NEXT_KEY]
    return out


def _list_of(record: ConfigRecord, key: str, kind: type) -> list[Any]:
    value = record.get(key)
    if not isinstance(value, list) or any(type(v) is not kind for v in value):
        raise ValueError(f"{key}: expected a list of {kind.__name__}")
    return value


class SecAggDriver:
    """Runs the four stages for one round over a `Transport`."""

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float,
        min_members: int,
        integer_step: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`integer_step`: distributed noise (`federated.distributed_noise`): each member's input
        is an integer vector of one more value than the model, sent with weight ratio 1; the
        unmasked sum goes to `integer_step(weights, sum)` instead of being dequantized."""
        self.integer_step = integer_step
        self.transport = transport
        self.timeout = timeout
        self.min_members = min_members
        self.crypto = flwr_internals.secagg_primitives()
        flwr_internals.patch_secagg_prg()

    # -- the round --------------------------------------------------------------------------------
    def run(
        self,
        targets: Mapping[int, str],
        weights: np.ndarray,
        round_: int,
        decode: Decoder,
        *,
        prepared: KeyExchange | None = None,
        pipeline: bool = False,
    ) -> SecAggRound:
        """One round. `prepared`: its key exchange, done during the previous round (used only if
        it is for this round and these hospitals); `pipeline`: run the next round's key exchange
        inside this round's collect and unmask exchanges (`SecAggRound.next`)."""
        hospital_of = dict(targets)
        if prepared is not None:
            problem = self._prepared_problem(prepared, round_, hospital_of)
            if problem:
                # a fresh key exchange, so a hospital whose pipelined reply went wrong once (or a
                # newcomer) is not kept out of a whole round for it
                log.warning("secagg round %d: the key exchange prepared during round %d is not used: "
                            "%s; this round runs its own", round_, round_ - 1, problem)
                prepared = None
        if prepared is None:
            params = SecAggParams.for_round(len(targets), min_members=self.min_members)
            keys = self._key_exchange(hospital_of, params, round_)
            if isinstance(keys, SecAggRound):
                return keys
        else:
            keys, params = prepared, prepared.params
            # a hospital of the prepared exchange that is not connected now is this round's
            # dropout after sharing: its masks come off with its shares (protocol rule)
            absent = sorted(set(prepared.hospital_of) - set(hospital_of))
            if absent:
                # not asked to train and their shares not forwarded: no member masks with them,
                # as for a hospital lost before the collect stage
                log.warning("secagg round %d: %s of the prepared key exchange not connected now: left "
                            "out of this round", round_, _names(prepared.hospital_of, absent))
            hospital_of = dict(prepared.hospital_of)
        timings = dict(keys.timings)
        timings["secagg_pipelined"] = 1.0 if prepared is not None else 0.0
        sampled, neighbours = keys.sampled, keys.neighbours
        shared = keys.shared & set(targets)  # the hospitals asked to train

        def lost(nodes: set[int]) -> list[str]:
            return sorted(hospital_of[n] for n in set(sampled) - nodes)

        # the next round's key exchange rides along (its own slot at each hospital)
        next_hospitals = {n: hospital_of[n] for n in shared} if pipeline else {}
        #: why round r + 1 gets no prepared key exchange (logged when this round ends)
        next_missing: str | None = None
        next_params = None
        if pipeline and len(next_hospitals) < MIN_HOSPITALS:
            next_missing = (f"only {len(next_hospitals)} hospital(s) completed this round's key exchange, "
                            f"SecAgg+ needs {MIN_HOSPITALS}")
        if len(next_hospitals) >= MIN_HOSPITALS:
            try:
                next_params = SecAggParams.for_round(len(next_hospitals), min_members=self.min_members)
            except SecAggParamsError as exc:
                next_params, next_missing = None, str(exc)
        next_sampled = sorted(next_hospitals)
        next_neighbours = self._neighbours(next_sampled, next_params.share_num) if next_params else {}

        # 3. collect masked vectors (the hospitals train here)
        t0 = time.perf_counter()
        model = self.transport.model(weights)
        contents = {}
        for node in sorted(shared):
            pairs = [(src, c) for src, c in keys.forward[node] if src in shared]
            record = ConfigRecord(
                {
                    K["STAGE"]: COLLECT,
                    K["CIPHERTEXT_LIST"]: [c for _, c in pairs],
                    K["SOURCE_LIST"]: [src for src, _ in pairs],
                }
            )
            contents[node] = RecordDict({**dict(model), CONFIGS_KEY: record})
        if next_params is not None:  # round r + 1's setup rides in the same messages
            for node, setup in self._setup_contents(next_params, next_sampled).items():
                contents[node][NEXT_KEY] = _riding(setup, round_ + 1)
        (collect,) = self._exchange_many([(contents, round_)])
        collect.hospital_of = {n: hospital_of[n] for n in contents}
        collect.missing_hospitals = sorted(hospital_of[n] for n in collect.missing)
        decoded = list(decode(collect))
        vectors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        members: list[HospitalReply] = []
        n_values = weights.shape[0] + (1 if self.integer_step is not None else 0)
        for answer in decoded:
            if answer.status != self.transport.ok or answer.receipt is None:
                log.warning(
                    "secagg %s: hospital %s (node %d) not aggregated: %s %s",
                    COLLECT,
                    hospital_of.get(answer.node_id, "?"),
                    answer.node_id,
                    answer.status,
                    answer.reason,
                )
                continue
            try:
                vectors[answer.node_id] = self._masked_vector(
                    collect.replies[answer.node_id], params, n_values
                )
            except ValueError as exc:
                answer.status, answer.reason = "invalid", f"masked vector: {exc}"
                self._drop(hospital_of, answer.node_id, COLLECT, exc)
                continue
            members.append(answer)
        timings["secagg_collect_s"] = time.perf_counter() - t0
        next_keys: dict[int, tuple[bytes, bytes]] = {}
        #: hospital -> why it is not in the next round's prepared key exchange
        next_left: dict[str, str] = {}
        if next_params is not None:
            next_keys = self._read_setup(_pipelined(collect), next_hospitals, pipelined=round_ + 1)
            for node in sorted(set(next_hospitals) - set(next_keys)):
                next_left[hospital_of[node]] = f"setup: {self._why_no_pipelined(node, collect)}"
        result = SecAggRound(params, collect, decoded, members, lost=lost(shared), metrics=timings)
        if len(members) < self.min_members:
            # the caller reports this as a round with too few contributors (its usual reason)
            return result
        member_nodes = set(vectors)
        problem = self._below_threshold(
            params,
            sampled,
            member_nodes,
            neighbours=neighbours,
            hospital_of=hospital_of,
            stage=COLLECT,
            among=shared,
        )
        if problem:
            result.failure = f"round {round_}: {problem}"
            return result

        # 4. unmask (and the next round's share-keys stage)
        t0 = time.perf_counter()
        dead = shared - member_nodes
        contents = {}
        for node in sorted(member_nodes):
            record = ConfigRecord(
                {
                    K["STAGE"]: UNMASK,
                    K["ACTIVE_NODE_ID_LIST"]: sorted(neighbours[node] & member_nodes),
                    K["DEAD_NODE_ID_LIST"]: sorted(neighbours[node] & dead),
                }
            )
            contents[node] = RecordDict({CONFIGS_KEY: record})
        # round r + 1's share-keys stage rides in the unmask messages: every hospital of round
        # r + 1 must be a member here (a non-member gets no unmask message): else no pipelining
        next_ok = False
        if next_params is not None:
            outside = sorted(set(next_keys) - member_nodes)
            unusable = self._keys_usable(
                next_keys, next_params, next_sampled, next_neighbours, next_hospitals
            )
            if outside:
                next_missing = (f"{_names(hospital_of, outside)} sent keys for round {round_ + 1} but "
                                f"{'is' if len(outside) == 1 else 'are'} not aggregated in round {round_}, "
                                "so no unmask message carries their share-keys stage")
            elif unusable:
                next_missing = unusable
            else:
                next_ok = True
        if next_ok:
            for node, share in self._share_contents(next_keys, next_neighbours).items():
                contents[node][NEXT_KEY] = _riding(share, round_ + 1)
        # the stage may end once every secret it needs (members' mask seeds, the dropped
        # hospitals' keys) has its threshold of shares: a member lost now does not hold the round
        counts = dict.fromkeys(member_nodes | dead, 0)
        t_unmask = time.perf_counter()

        def enough(node: int, reply: Message) -> float | None:
            try:
                owners, _ = self._unmask_shares(node, reply, neighbours, member_nodes, dead)
            except ValueError:
                return None  # reported with the reason below
            for owner in owners:
                counts[owner] += 1
            if any(c < params.threshold for c in counts.values()):
                return None
            return max(UNMASK_GRACE_MIN_S, UNMASK_GRACE_FACTOR * (time.perf_counter() - t_unmask))

        (phase,) = self.transport.send_many([(contents, round_)], self.timeout, enough)
        if phase.ended_early:
            timings["secagg_unmask_ended_early"] = 1.0
            log.warning("secagg %s (round %d): ended after %.1f s without the reply of %s: every secret "
                        "had its threshold of shares", UNMASK, round_, time.perf_counter() - t0,
                        _names(hospital_of, phase.missing))
        shares: dict[int, list[bytes]] = {n: [] for n in shared}
        for node, reply in phase.replies.items():
            try:
                owners, values = self._unmask_shares(node, reply, neighbours, member_nodes, dead)
            except ValueError as exc:
                self._drop(hospital_of, node, UNMASK, exc)
                continue
            for owner, piece in zip(owners, values, strict=True):
                shares[owner].append(piece)
        try:
            result.weights = self._unmask(
                params,
                vectors=vectors,
                shares=shares,
                dead=dead,
                neighbours=neighbours,
                public_keys=keys.public_keys,
                members=members,
                weights=weights,
                hospital_of=hospital_of,
            )
        except SecAggRoundError as exc:
            result.failure = f"round {round_}: secure aggregation failed: {exc}"
        timings["secagg_unmask_s"] = time.perf_counter() - t0
        if next_ok and next_params is not None:
            forward, next_shared = self._read_shares(
                _pipelined(phase), next_keys, next_neighbours, next_hospitals, pipelined=round_ + 1
            )
            for node in sorted(set(next_keys) - next_shared):
                next_left[hospital_of[node]] = f"share keys: {self._why_no_pipelined(node, phase)}"
            below = self._below_threshold(
                next_params,
                next_sampled,
                next_shared,
                neighbours=next_neighbours,
                hospital_of=next_hospitals,
                stage=SHARE_KEYS,
            )
            if below:
                next_missing = below
            else:
                result.next = KeyExchange(
                    round_ + 1,
                    next_hospitals,
                    next_params,
                    next_sampled,
                    next_neighbours,
                    next_keys,
                    next_shared,
                    forward,
                    {},
                )
        if pipeline:
            self._report_pipelining(round_, result, next_missing, next_left)
        return result

    @staticmethod
    def _unmask_shares(
        node: int,
        reply: Message,
        neighbours: Mapping[int, set[int]],
        members: set[int],
        dead: set[int],
    ) -> tuple[list[int], list[bytes]]:
        """A valid unmask reply's (owners, shares): one share for each neighbour of `node` that
        is a member or dropped; ValueError says what is wrong."""
        record = _configs(reply)
        owners = _list_of(record, K["NODE_ID_LIST"], int)
        values = _list_of(record, K["SHARE_LIST"], bytes)
        asked = (neighbours[node] & members) | (neighbours[node] & dead)
        if len(owners) != len(values) or set(owners) != asked or len(set(owners)) != len(owners):
            raise ValueError(f"shares: expected one share for each of {sorted(asked)}")
        return owners, values

    @staticmethod
    def _report_pipelining(
        round_: int, result: SecAggRound, missing: str | None, left: Mapping[str, str]
    ) -> None:
        """Say why round r + 1 will run its own key exchange, or whom its prepared one lacks (a
        prepared exchange without a connected hospital is not used: `_prepared_problem`)."""
        why = "; ".join(f"{h}: {reason}" for h, reason in sorted(left.items()))
        result.next_note = None
        if result.next is None:
            reason = missing or why or (result.failure or "the round stopped before its unmask stage")
            if missing and why:
                reason = f"{missing} ({why})"
            result.next_note = (f"no key exchange prepared for round {round_ + 1}: {reason}; round "
                                f"{round_ + 1} runs its own")
        elif left:
            result.next_note = (f"the key exchange prepared for round {round_ + 1} lacks {why}; round "
                                f"{round_ + 1} uses it only if {'it is' if len(left) == 1 else 'they are'} "
                                "no longer connected then")
        if result.next_note:
            log.warning("secagg round %d: %s", round_, result.next_note)

    def _why_no_pipelined(self, node: int, phase: PhaseResult) -> str:
        """Why `node`'s reply in `phase` carried no usable pipelined stage."""
        reply = phase.replies.get(node)
        if reply is None:
            if node not in phase.missing:
                return "not asked"
            if phase.ended_early:
                return "no reply before the unmask stage ended (every secret had its threshold of shares)"
            return f"no reply within the stage's {self.timeout:g} s"
        if reply.has_error():
            return f"its reply is Flower's error {reply.error.code}: {reply.error.reason}"
        record = reply.content.config_records.get(NEXT_KEY)
        if record is None:
            return "its reply carries no pipelined stage"
        if NEXT_ERROR in record:
            return f"the pipelined stage failed at the hospital: {record[NEXT_ERROR]!r}"
        return "its pipelined reply is malformed (the warning above says how)"

    @staticmethod
    def _prepared_problem(prepared: KeyExchange, round_: int, hospital_of: Mapping[int, str]) -> str | None:
        """Why the key exchange prepared during the previous round cannot serve this round (None:
        it can). Connected hospitals that are not in it would be left out of a whole round;
        hospitals of it that are no longer connected are left out (as if lost before the collect
        stage) while every one left keeps its threshold of neighbours."""
        if prepared.round != round_:
            return f"it is for round {prepared.round}"
        new = sorted(n for n, h in hospital_of.items() if prepared.hospital_of.get(n) != h)
        if new:
            return (f"{_names(hospital_of, new)} connected after it was made (a new node id or a new "
                    "hospital)")
        incomplete = sorted(set(hospital_of) - prepared.shared)
        if incomplete:
            return (f"{_names(hospital_of, incomplete)} did not complete it (the warning of round "
                    f"{round_ - 1})")
        present = prepared.shared & set(hospital_of)
        return SecAggDriver._below_threshold(
            prepared.params,
            prepared.sampled,
            present,
            neighbours=prepared.neighbours,
            hospital_of=prepared.hospital_of,
            stage=COLLECT,
            among=present,
        )

    # -- stages 1 and 2 ---------------------------------------------------------------------------
    def _exchange_many(
        self, batches: Sequence[tuple[Mapping[int, RecordDict], int]]
    ) -> Sequence[PhaseResult]:
        return self.transport.send_many(batches, self.timeout)

    def _key_exchange(
        self, hospital_of: dict[int, str], params: SecAggParams, round_: int
    ) -> KeyExchange | SecAggRound:
        """Stages 1 and 2 on their own (the first round, or when the hospitals changed)."""
        sampled = sorted(hospital_of)
        neighbours = self._neighbours(sampled, params.share_num)
        timings: dict[str, float] = {}

        def lost(nodes: set[int]) -> list[str]:
            return sorted(hospital_of[n] for n in set(sampled) - nodes)

        t0 = time.perf_counter()
        (phase,) = self._exchange_many([(self._setup_contents(params, sampled), round_)])
        public_keys = self._read_setup(phase.replies, hospital_of)
        timings["secagg_setup_s"] = time.perf_counter() - t0
        seen = [k for pair in public_keys.values() for k in pair]
        if len(set(seen)) != len(seen):
            return self._failed(
                params,
                phase,
                lost=lost(set()),
                timings=timings,
                reason=f"round {round_}: secure aggregation setup: two hospitals sent the same public key",
            )
        problem = self._below_threshold(
            params, sampled, set(public_keys), neighbours=neighbours, hospital_of=hospital_of, stage=SETUP
        )
        if problem:
            return self._failed(
                params,
                phase,
                lost=lost(set(public_keys)),
                timings=timings,
                reason=f"round {round_}: {problem}",
            )
        t0 = time.perf_counter()
        (phase,) = self._exchange_many([(self._share_contents(public_keys, neighbours), round_)])
        forward, shared = self._read_shares(phase.replies, public_keys, neighbours, hospital_of)
        timings["secagg_share_keys_s"] = time.perf_counter() - t0
        problem = self._below_threshold(
            params, sampled, shared, neighbours=neighbours, hospital_of=hospital_of, stage=SHARE_KEYS
        )
        if problem:
            return self._failed(
                params, phase, lost=lost(shared), timings=timings, reason=f"round {round_}: {problem}"
            )
        return KeyExchange(
            round_, hospital_of, params, sampled, neighbours, public_keys, shared, forward, timings
        )

    @staticmethod
    def _setup_contents(params: SecAggParams, sampled: Sequence[int]) -> dict[int, RecordDict]:
        setup: dict[str, Any] = {
            K["STAGE"]: SETUP,
            K["SAMPLE_NUMBER"]: params.sample_num,
            K["SHARE_NUMBER"]: params.share_num,
            K["THRESHOLD"]: params.threshold,
            K["CLIPPING_RANGE"]: float(params.clipping_range),
            K["TARGET_RANGE"]: params.quantization_range,
            K["MOD_RANGE"]: params.modulus_range,
            K["MAX_WEIGHT"]: float(params.max_weight),
        }
        # one content per node: secaggplus_mod pops the stage from the record it is given
        return {n: RecordDict({CONFIGS_KEY: ConfigRecord(dict(setup))}) for n in sampled}

    def _read_setup(
        self,
        replies: Mapping[int, Message | ConfigRecord],
        hospital_of: Mapping[int, str],
        *,
        pipelined: int | None = None,
    ) -> dict[int, tuple[bytes, bytes]]:
        """The public keys of the setup replies; `pipelined`: the round whose setup rode in
        this round's messages (named in the log)."""
        stage = SETUP if pipelined is None else f"{SETUP} (round {pipelined}, pipelined)"
        public_keys: dict[int, tuple[bytes, bytes]] = {}
        for node, reply in replies.items():
            try:
                record = _configs(reply)
                pk1, pk2 = record.get(K["PUBLIC_KEY_1"]), record.get(K["PUBLIC_KEY_2"])
                if not isinstance(pk1, bytes) or not isinstance(pk2, bytes):
                    raise ValueError("public keys: expected bytes")
                self.crypto.bytes_to_public_key(pk1)
                self.crypto.bytes_to_public_key(pk2)
                public_keys[node] = (pk1, pk2)
            except ValueError as exc:
                self._drop(hospital_of, node, stage, exc)
        return public_keys

    def _keys_usable(
        self,
        public_keys: Mapping[int, tuple[bytes, bytes]],
        params: SecAggParams,
        sampled: Sequence[int],
        neighbours: Mapping[int, set[int]],
        hospital_of: Mapping[int, str],
    ) -> str | None:
        """Why a pipelined setup cannot go on (a repeated key, too few keys), or None: the next
        round then runs its own key exchange, and the reason is logged (`_report_pipelining`)."""
        seen = [k for pair in public_keys.values() for k in pair]
        if len(set(seen)) != len(seen):
            return "two hospitals sent the same public key in its setup stage"
        return self._below_threshold(
            params, sampled, set(public_keys), neighbours=neighbours, hospital_of=hospital_of, stage=SETUP
        )

    @staticmethod
    def _share_contents(
        public_keys: Mapping[int, tuple[bytes, bytes]], neighbours: Mapping[int, set[int]]
    ) -> dict[int, RecordDict]:
        contents = {}
        for node in public_keys:
            record = ConfigRecord(
                {str(n): list(public_keys[n]) for n in sorted(neighbours[node] & set(public_keys))}
            )
            record[K["STAGE"]] = SHARE_KEYS
            contents[node] = RecordDict({CONFIGS_KEY: record})
        return contents

    def _read_shares(
        self,
        replies: Mapping[int, Message | ConfigRecord],
        public_keys: Mapping[int, tuple[bytes, bytes]],
        neighbours: Mapping[int, set[int]],
        hospital_of: Mapping[int, str],
        *,
        pipelined: int | None = None,
    ) -> tuple[dict[int, list[tuple[int, bytes]]], set[int]]:
        stage = SHARE_KEYS if pipelined is None else f"{SHARE_KEYS} (round {pipelined}, pipelined)"
        forward: dict[int, list[tuple[int, bytes]]] = {n: [] for n in public_keys}
        shared: set[int] = set()
        for node, reply in replies.items():
            try:
                record = _configs(reply)
                dsts = _list_of(record, K["DESTINATION_LIST"], int)
                ciphertexts = _list_of(record, K["CIPHERTEXT_LIST"], bytes)
                expected = (neighbours[node] & set(public_keys)) - {node}
                if len(dsts) != len(ciphertexts) or set(dsts) != expected or len(set(dsts)) != len(dsts):
                    raise ValueError(f"shares: expected one ciphertext for each of {sorted(expected)}")
            except ValueError as exc:
                self._drop(hospital_of, node, stage, exc)
                continue
            shared.add(node)
            for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
                forward[dst].append((node, ciphertext))
        return forward, shared

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _neighbours(sampled: Sequence[int], share_num: int) -> dict[int, set[int]]:
        """SecAggPlusWorkflow's ring of neighbours (with share_num = sample_num: everyone)."""
        order = list(sampled)
        np.random.default_rng().shuffle(order)
        half = share_num >> 1
        return {
            nid: {order[(i + off) % len(order)] for off in range(-half, half + 1)}
            for i, nid in enumerate(order)
        }

    @staticmethod
    def _drop(hospital_of: Mapping[int, str], node: int, stage: str, exc: Exception) -> None:
        log.warning(
            "secagg %s: hospital %s (node %d) left out: %s", stage, hospital_of.get(node, "?"), node, exc
        )

    @staticmethod
    def _below_threshold(
        params: SecAggParams,
        sampled: Sequence[int],
        active: set[int],
        *,
        neighbours: Mapping[int, set[int]],
        hospital_of: Mapping[int, str],
        stage: str,
        among: set[int] | None = None,
    ) -> str | None:
        for node in sampled if among is None else sorted(among):
            have = len(neighbours[node] & active)
            if have < params.threshold:
                return (
                    f"secure aggregation stopped at stage {stage!r}: {len(active)} of {len(sampled)} "
                    f"hospitals remain, the threshold is {params.threshold} (hospital "
                    f"{hospital_of.get(node, '?')} has {have} active neighbours)"
                )
        return None

    def _failed(
        self,
        params: SecAggParams,
        phase: PhaseResult,
        *,
        lost: list[str],
        timings: dict[str, float],
        reason: str,
    ) -> SecAggRound:
        log.warning("%s", reason)
        return SecAggRound(params, phase, [], [], failure=reason, lost=lost, metrics=timings)

    def _masked_vector(
        self, message: Message, params: SecAggParams, n_weights: int
    ) -> tuple[np.ndarray, np.ndarray]:
        record = _configs(message)
        blobs = _list_of(record, K["MASKED_PARAMETERS"], bytes)
        if len(blobs) != 2:
            raise ValueError(f"expected 2 arrays (weight, delta), got {len(blobs)}")
        arrays = []
        for blob, shape in zip(blobs, ((1,), (n_weights,)), strict=True):
            try:
                array = np.asarray(self.crypto.bytes_to_ndarray(blob))
            except Exception as exc:  # numpy raises several types for a bad .npy
                raise ValueError(f"not a numpy array ({type(exc).__name__})") from None
            if array.shape != shape or array.dtype.kind not in "iu":
                raise ValueError(
                    f"expected an integer array of shape {shape}, got {array.dtype} {array.shape}"
                )
            array = array.astype(np.int64)
            if array.size and (array.min() < 0 or array.max() >= params.modulus_range):
                raise ValueError(f"values outside [0, {params.modulus_range})")
            arrays.append(array)
        return arrays[0], arrays[1]

    def _combine(self, shares: list[bytes], owner: str) -> bytes:
        try:
            return self.crypto.combine_shares(shares)
        except Exception as exc:  # malformed share bytes: several exception types inside flwr
            raise SecAggRoundError(
                f"the shares of {owner} do not combine ({type(exc).__name__}: {exc})"
            ) from None

    def _unmask(
        self,
        params: SecAggParams,
        *,
        vectors: Mapping[int, tuple[np.ndarray, np.ndarray]],
        shares: Mapping[int, list[bytes]],
        dead: set[int],
        neighbours: Mapping[int, set[int]],
        public_keys: Mapping[int, tuple[bytes, bytes]],
        members: Sequence[HospitalReply],
        weights: np.ndarray,
        hospital_of: Mapping[int, str],
    ) -> np.ndarray:
        modulus = params.modulus_range
        factor = np.zeros(1, dtype=np.int64)
        total = np.zeros(weights.shape[0] + (1 if self.integer_step is not None else 0), dtype=np.int64)
        for f, v in vectors.values():
            factor = (factor + f) % modulus
            total = (total + v) % modulus
        shapes = [(1,), (total.shape[0],)]
        for owner in sorted(set(vectors) | dead):
            got = shares.get(owner, [])
            if len(got) < params.threshold:
                raise SecAggRoundError(
                    f"{len(got)} share(s) of {hospital_of[owner]}'s secret came back, "
                    f"{params.threshold} are needed"
                )
            secret = self._combine(got, hospital_of[owner])
            if owner in vectors:  # a member: remove its private mask
                mask_f, mask_v = flwr_internals.secagg_prg(secret, modulus, shapes)
                factor, total = (factor - mask_f) % modulus, (total - mask_v) % modulus
                continue
            # dropped after sharing: rebuild its first secret key, check it, remove its pairwise masks
            try:
                key = self.crypto.bytes_to_private_key(secret)
                public = self.crypto.public_key_to_bytes(key.public_key())
            except Exception as exc:
                raise SecAggRoundError(
                    f"the shares of {hospital_of[owner]}'s key are malformed ({type(exc).__name__})"
                ) from None
            if public != public_keys[owner][0]:
                raise SecAggRoundError(
                    f"the shares of {hospital_of[owner]}'s key do not rebuild the key it "
                    "announced (a malformed or stale share)"
                )
            for member in sorted(neighbours[owner] & set(vectors)):
                shared_key = self.crypto.generate_shared_key(
                    key, self.crypto.bytes_to_public_key(public_keys[member][0])
                )
                mask_f, mask_v = flwr_internals.secagg_prg(shared_key, modulus, shapes)
                if owner > member:
                    factor, total = (factor + mask_f) % modulus, (total + mask_v) % modulus
                else:
                    factor, total = (factor - mask_f) % modulus, (total - mask_v) % modulus
        # the weight each member's mod used: the `num_examples` of its own status record
        # (`federated.secagg.client._as_fitres` reads the same value)
        # (distributed noise: every member sends weight max_weight, ratio 1)
        expected = (
            sum(params.q_ratio(member_weight(r)) for r in members)
            if self.integer_step is None
            else len(members) * params.q_ratio(int(params.max_weight))
        ) % modulus
        if int(factor[0]) != expected:
            raise SecAggRoundError(
                "the unmasked weight sum does not match the members' record counts (a malformed "
                "or stale share, or a hospital whose masks differ): no model is taken"
            )
        if expected == 0:
            raise SecAggRoundError("the members' weights sum to zero")
        if self.integer_step is not None:
            try:
                return self.integer_step(weights, total)
            except ValueError as exc:
                raise SecAggRoundError(f"distributed noise: {exc}") from None
        (summed,) = self.crypto.dequantize([total], params.clipping_range, params.quantization_range)
        summed = (summed - (len(vectors) - 1) * params.clipping_range) * (
            params.quantization_range / expected
        )
        new = weights.astype(np.float64) + summed
        if not np.all(np.isfinite(new)):
            raise SecAggRoundError("the aggregate holds NaN or infinite values")
        return new.astype(np.float32)


def _names(hospital_of: Mapping[int, str], nodes: Sequence[int]) -> str:
    """`hospital x (node n), ...` for a log line."""
    return ", ".join(f"hospital {hospital_of.get(n, '?')} (node {n})" for n in nodes)


def member_weight(reply: HospitalReply) -> int:
    """The weight a hospital's SecAgg+ input carries: its `num_examples` metric, as an integer."""
    return int(reply.metrics.get("num_examples", 0.0))


def clipped_total(members: Sequence[HospitalReply]) -> float:
    """Coordinates the members clipped to fit SecAgg+'s quantization range (their own count)."""
    return float(sum(r.metrics.get("secagg_clipped", 0.0) for r in members))


__all__ = ["SecAggDriver", "SecAggRound", "SecAggRoundError", "Transport", "clipped_total", "member_weight"]
