"""SecAgg+ on the real deployment: a SuperLink and five SuperNodes (each with its warm executor)
as separate processes, TLS and SuperNode authentication on, the ServerApp run by `run_study`.

hospital-d's SuperNode and executor are killed with SIGKILL in the middle of round 1, after its
keys were shared and while the others train; hospital-e's, after its masked vector arrived, as
the unmask stage starts. The round completes with the four others as members (hospital-e's
input is in the aggregate, its mask seed rebuilt from the others' shares; hospital-d's pairwise
masks removed with its key rebuilt; the threshold is 3 of 5), the unmask stage ends once the
three live members' shares suffice instead of waiting out the stage's timeout, the aggregate
passes the integrity check (the unmasked weight sum equals what the members' record counts
predict, which a wrong unmasking cannot meet), only the members get receipts, and the next round
goes on with the three left.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import federated.server_app as server_app
from federated import packing
from federated.runtime.demo_sites import approve, demo_spec, provision_sites
from federated.runtime.deployment import LocalFederation
from federated.runtime.flwr_internals import SECAGG_CONFIGS_KEY
from federated.runtime.server_runner import run_study
from federated.runtime.settings import RuntimeSettings
from federated.runtime.tls import generate_node_keys, generate_tls

pytestmark = [pytest.mark.flower, pytest.mark.slow, pytest.mark.timeout(300)]

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d", "hospital-e")


class Observer:
    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict[str, float], list[Any]]] = []
        self.completed: tuple[Path, str] | None = None
        self.failed: list[str] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append((round, dict(metrics), list(receipts)))

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self.completed = (model_path, sha256)

    def on_failed(self, reason: str) -> None:
        self.failed.append(reason)


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalFederation, dict[str, Any], Path]]:
    root = tmp_path_factory.mktemp("secagg")
    sites = provision_sites(root / "sites", hospitals=HOSPITALS)
    tls = generate_tls(root / "tls")
    keys = {h: generate_node_keys(root / "node-keys", h) for h in sites}
    fed = LocalFederation(
        root / "fed",
        {h: d.site.node_config() for h, d in sites.items()},
        settings=RuntimeSettings(),
        tls=tls,
        supernode_auth=True,
        node_keys=keys,
    )
    with fed:
        yield fed, sites, root
    assert all(not p.alive() for p in fed.processes())


def test_sigkill_of_a_hospital_mid_round_under_secure_aggregation(
    federation: tuple[LocalFederation, dict[str, Any], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    fed, sites, root = federation
    node_d, node_e = fed.nodes["hospital-d"], fed.nodes["hospital-e"]
    real_exchange = server_app.exchange_many
    killed, killed_e = threading.Event(), threading.Event()
    wire: list[bool] = []  # each SecAgg+ message packed (`federated.packing`) as it is pushed

    def exchange(grid: Any, batches: Any, **kwargs: Any) -> Any:
        wire.extend(packing.is_packed(m.content) for messages in batches for m in messages)
        contents = [packing.unpack(m.content) for messages in batches for m in messages]  # as built
        stages = {
            str(c.config_records[SECAGG_CONFIGS_KEY].get("stage"))
            for c in contents
            if SECAGG_CONFIGS_KEY in c.config_records
        }
        if "collect_masked_vectors" in stages and not killed.is_set():
            # keys are shared; the others now train: hospital-d's processes die (SIGKILL)
            killed.set()
            threading.Timer(0.2, node_d.kill).start()
        if "unmask" in stages and not killed_e.is_set():
            # hospital-e's masked vector is in: it dies before its unmask message is pushed
            killed_e.set()
            node_e.kill()
        return real_exchange(grid, batches, **kwargs)

    monkeypatch.setattr(server_app, "exchange_many", exchange)
    spec = demo_spec(
        "secagg-kill",
        rounds=2,
        min_hospitals=3,
        accountant="rdp",
        secure_aggregation=True,
        round_timeout_s=20,
    )
    for demo in sites.values():
        approve(demo.site, spec.study_id)
    tls = fed.superlink.tls
    assert tls is not None
    observer = Observer()
    result = run_study(
        fed.superlink.address,
        spec,
        observer,
        root / "models",
        root_certificates=tls.root_certificates(),
        settings=fed.settings,
        hospital_keys={h: d.signer.public_key for h, d in sites.items()},
    )
    assert result.status == "completed", result.reason
    assert killed.is_set() and not any(p.alive() for p in node_d.processes())
    assert killed_e.is_set() and not any(p.alive() for p in node_e.processes())
    assert wire and all(wire)
    members = {"hospital:hospital-a", "hospital:hospital-b", "hospital:hospital-c"}
    by_round = {r: (m, rc) for r, m, rc in observer.rounds}
    for round_, expected in ((1, members | {"hospital:hospital-e"}), (2, members)):
        metrics, receipts = by_round[round_]
        assert metrics["secure_aggregation"] == 1.0 and metrics["aggregate_members"] == len(expected)
        assert {r.hospital for r in receipts} == expected
        assert metrics["dropped"] >= 1
    assert by_round[1][0]["secagg_sampled"] == 5 and by_round[1][0]["secagg_threshold"] == 3
    # the unmask stage did not wait out its 20 s for hospital-e: the three live members' shares
    # met the threshold for every secret (hospital-e's seed, hospital-d's key)
    assert by_round[1][0]["secagg_unmask_ended_early"] == 1.0
    assert by_round[1][0]["secagg_unmask_s"] < 10.0
    # the aggregate is a sensible model (a wrong unmasking gives values around 2**31)
    assert by_round[2][0]["ref_accuracy"] > 0.8
