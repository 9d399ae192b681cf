"""Provision hospital sites on disk for the demo, the integration tests and the benchmark.

Each site gets exactly what a real node hands its SuperNode (`federated.runtime.site`): a records
file (its part of the non-IID split of a scikit-learn dataset, `federated.data`), signed consent
contracts (one per record), a privacy ledger database with its total budget, an Ed25519 key and
its approved-studies file. Real formats and real signatures; only the data is a public demo set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from audit.signing import Signer
from consent.model import Contract, Provision, next_version, revoke, sign
from consent.request import StudyRequest
from federated.runtime.site import Site, write_records
from federated.study_spec import StudySpec

LABELS = {"breast_cancer": "malignant", "diabetes": "progression", "flchain": "time", "gbsg2": "time"}
CONTRACT_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class DemoSite:
    site: Site
    signer: Signer
    consent_issuer: Signer
    contracts: dict[str, Contract]


def _contract(pseudonym: str, hospital: str, categories: Sequence[str], reward: str | None) -> Contract:
    return Contract(contract_id=f"c-{pseudonym}", pseudonym=pseudonym, hospital=hospital, version=1,
                    issued=CONTRACT_EPOCH, reward_account=reward,
                    provision=Provision(type="permit", purposes=("DUO:0000042",),
                                        data_categories=tuple(categories)))


def provision_sites(root: Path, *, dataset: str = "breast_cancer",
                    hospitals: Sequence[str] = ("hospital-a", "hospital-b", "hospital-c"),
                    consenting: dict[str, float] | None = None, budgets: dict[str, float] | None = None,
                    categories: Sequence[str] = ("labs", "imaging"),
                    categories_by_hospital: dict[str, Sequence[str]] | None = None,
                    reward_every: int = 4, min_records: int = 100) -> dict[str, DemoSite]:
    """One site per hospital under `root/<hospital>/`.

    `consenting[h]`: share of h's records with a permitting contract (default 1.0; 0 gives a
    hospital whose patients all refused). `budgets[h]`: h's total epsilon budget (default 100).
    Contracts permit the data `categories` (per hospital: `categories_by_hospital[h]`).
    Every `reward_every`-th consenting record names a pseudonymous reward account.
    `min_records`: fewest records per hospital of a non-survival split (breast cancer's 569 give
    10 hospitals about 51 each: benchmarks at 10 hospitals lower it).
    """
    from sqlalchemy import create_engine

    from federated.clinical_data import SURVIVAL_DATASETS, load_survival_federated
    from federated.data import load_federated
    from federated.privacy_ledger import PrivacyLedger, metadata

    parts = (load_survival_federated(dataset, len(hospitals), hospital_ids=hospitals)
             if dataset in SURVIVAL_DATASETS
             else load_federated(dataset, len(hospitals), hospital_ids=hospitals, min_records=min_records))
    out: dict[str, DemoSite] = {}
    for data in parts:
        h = data.hospital_id
        base = root / h
        base.mkdir(parents=True, exist_ok=True)
        records = write_records(base / "records.npz", data, LABELS[dataset])
        issuer = Signer.generate()
        share = (consenting or {}).get(h, 1.0)
        n_consent = round(len(data) * share)
        contracts: dict[str, Contract] = {}
        lines = []
        for i, p in enumerate(data.pseudonyms):
            if i >= n_consent:
                continue
            reward = f"reward:{h}-{i}" if i % reward_every == 0 else None
            permitted = (categories_by_hospital or {}).get(h, categories)
            signed = sign(_contract(p, h, permitted, reward), issuer)
            contracts[p] = signed.contract  # as stored: with the issuer key stamped in
            lines.append(json.dumps(signed.to_json()))
        (base / "contracts.jsonl").write_text("\n".join(lines) + ("\n" if lines else ""))
        ledger_path = base / "ledger.db"
        engine = create_engine(f"sqlite:///{ledger_path}")
        metadata.create_all(engine)  # what the node migration does on a real node
        PrivacyLedger(engine, total_budget=(budgets or {}).get(h, 100.0))
        engine.dispose()
        key_path = base / "hospital.key"
        signer = Signer.generate()
        if key_path.exists():
            key_path.unlink()
        signer.save(key_path)
        approvals = base / "approvals.json"
        approvals.write_text(json.dumps({"approved": []}))
        site = Site(hospital_id=h, records_path=records, contracts_path=base / "contracts.jsonl",
                    ledger_url=f"sqlite:///{ledger_path}", key_path=key_path, approvals_path=approvals)
        out[h] = DemoSite(site, signer, issuer, contracts)
    return out


def approve(site: Site, *study_ids: str) -> None:
    """Add studies to a site's approved list (what the node daemon does on approval)."""
    approved = set(json.loads(site.approvals_path.read_text())["approved"]) | set(study_ids)
    tmp = site.approvals_path.with_name(site.approvals_path.name + ".tmp")
    tmp.write_text(json.dumps({"approved": sorted(approved)}))
    tmp.replace(site.approvals_path)  # atomic: a ClientApp never reads half a file


def revoke_all(demo: DemoSite, at: datetime) -> None:
    """Every patient of the site revokes consent at `at` (a new version that permits nothing)."""
    lines = [line for line in demo.site.contracts_path.read_text().splitlines() if line.strip()]
    for contract in demo.contracts.values():
        lines.append(json.dumps(sign(revoke(contract, at), demo.consent_issuer).to_json()))
    tmp = demo.site.contracts_path.with_name(demo.site.contracts_path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(demo.site.contracts_path)


def _append_contracts(demo: DemoSite, contracts: Sequence[Contract]) -> None:
    lines = [line for line in demo.site.contracts_path.read_text().splitlines() if line.strip()]
    for contract in contracts:
        signed = sign(contract, demo.consent_issuer)
        lines.append(json.dumps(signed.to_json()))
        demo.contracts[contract.pseudonym] = signed.contract
    tmp = demo.site.contracts_path.with_name(demo.site.contracts_path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(demo.site.contracts_path)


def cap_patients(demo: DemoSite, pseudonyms: Sequence[str], cap: float, at: datetime) -> None:
    """Each named patient issues a new contract version at `at` that permits the same but caps
    their LIFETIME epsilon at this hospital at `cap` (`max_epsilon`)."""
    _append_contracts(demo, [next_version(demo.contracts[p], demo.contracts[p].provision, at,
                                          max_epsilon=cap) for p in pseudonyms])


def merge_patients(demo: DemoSite, owner: str, others: Sequence[str]) -> None:
    """Rewrite the site's records so that the records of `others` belong to patient `owner`
    (one patient with several records, as a node's records table allows)."""
    from federated.runtime.site import read_records

    data, label = read_records(demo.site.records_path)
    renamed = tuple(owner if p in set(others) else p for p in data.pseudonyms)
    write_records(demo.site.records_path, replace(data, pseudonyms=renamed), label)


def demo_spec(study_id: str, *, dataset: str = "breast_cancer", template: str | None = None,
              epsilon: float = 3.0, rounds: int = 3, min_hospitals: int = 2, round_timeout_s: float = 60.0,
              columns: Sequence[str] | None = None, delta: float = 1e-5, **overrides: object) -> StudySpec:
    """A valid study over the demo data (all columns of the dataset unless `columns`; a survival
    dataset's studies use template cox_ph, the time as label and the ``event`` column)."""
    from federated.clinical_data import EVENT_COLUMN, SURVIVAL_DATASETS, survival_feature_specs
    from federated.data import feature_specs

    survival = dataset in SURVIVAL_DATASETS
    specs = survival_feature_specs(dataset) if survival else feature_specs(dataset)
    cols = tuple(columns) if columns is not None else tuple(s.name for s in specs)
    cats = tuple(sorted({s.category for s in specs if s.name in cols}))
    task: Literal["binary", "regression", "survival"] = (
        "survival" if survival else "binary" if dataset == "breast_cancer" else "regression")
    default = {"binary": "logistic_regression", "regression": "linear_regression", "survival": "cox_ph"}
    if survival:
        overrides.setdefault("event", EVENT_COLUMN)
    return StudySpec(
        study_id=study_id, template=template or default[task],
        task=task, columns=cols, label=LABELS[dataset],
        request=StudyRequest(purpose="DUO:0000042", organisation="org-research", region="DE",
                             data_categories=cats, epsilon=epsilon, study_id=study_id),
        epsilon=epsilon, delta=delta, rounds=rounds, min_hospitals=min_hospitals,
        round_timeout_s=round_timeout_s, **overrides)  # type: ignore[arg-type]


