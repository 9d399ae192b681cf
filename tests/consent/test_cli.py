"""`exchange consent check|validate` through the real Typer app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from exchange.cli import app

EXAMPLES = Path(__file__).resolve().parents[2] / "consent" / "examples"
DATA = Path(__file__).resolve().parent / "data"
runner = CliRunner()


def check(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["consent", "check", *args])
    return result.exit_code, result.output


def test_check_permit_and_deny_exit_zero() -> None:
    code, out = check(
        str(EXAMPLES / "fhir-r4-hmb-deny-org.json"),
        "--purpose",
        "DUO:0000007",
        "--disease",
        "C50",
        "--org",
        "uni-a",
        "--region",
        "DE",
        "--categories",
        "labs,vitals",
        "--at",
        "2027-01-01T00:00:00Z",
    )
    assert code == 0, out
    body = json.loads(out)
    assert body["decision"] == "permit" and body["kind"] == "fhir-R4"
    assert {r["category"] for r in body["reasons"]} == {"labs", "vitals"}
    code, out = check(
        str(EXAMPLES / "fhir-r4-hmb-deny-org.json"),
        "--purpose",
        "DUO:0000007",
        "--disease",
        "C50",
        "--org",
        "pharma-x",
        "--region",
        "DE",
        "--at",
        "2027-01-01T00:00:00Z",
    )
    assert code == 0
    body = json.loads(out)
    assert body["decision"] == "deny"
    assert body["reasons"][0]["path"] == "provision.provisions[0]"


def test_check_native_signed_and_flags() -> None:
    path = str(EXAMPLES / "native-hmb-ncu-irb.json")
    base = [path, "--purpose", "HMB", "--org", "uni-a", "--region", "FR", "--at", "2027-01-01T00:00:00Z"]
    assert json.loads(check(*base)[1])["decision"] == "deny"  # IRB missing
    assert json.loads(check(*base, "--irb")[1])["decision"] == "permit"
    assert json.loads(check(*base, "--irb", "--commercial")[1])["decision"] == "deny"
    assert json.loads(check(*base, "--irb", "--categories", "labs,genomics")[1])["decision"] == "deny"
    signed = [
        str(EXAMPLES / "native-gru-signed.json"),
        "--purpose",
        "GRU",
        "--org",
        "uni-a",
        "--region",
        "US",
        "--at",
        "2027-01-01T00:00:00Z",
    ]
    out = json.loads(check(*signed, "--epsilon", "2")[1])
    assert out["decision"] == "permit" and out["kind"] == "native-signed"
    assert json.loads(check(*signed, "--epsilon", "5")[1])["reasons"][0]["code"] == "privacy-cap"
    revoked = [str(EXAMPLES / "native-gru-revoked-v2-signed.json"), *signed[1:]]
    assert json.loads(check(*revoked, "--epsilon", "2")[1])["decision"] == "deny"


def test_check_unreadable_file_exits_2(tmp_path: Path) -> None:
    args = ["--purpose", "GRU", "--org", "uni-a", "--region", "DE"]
    assert check(str(tmp_path / "missing.json"), *args)[0] == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, out = check(str(bad), *args)
    assert code == 2 and "not JSON" in out
    assert check(str(DATA / "fhir-r4-unmappable.json"), *args)[0] == 2
    tampered = json.loads((EXAMPLES / "native-gru-signed.json").read_text())
    tampered["contract"]["reward_account"] = "acct-evil"
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps(tampered))
    code, out = check(str(forged), *args)
    assert code == 2 and "signature" in out


def test_check_bad_options() -> None:
    path = str(EXAMPLES / "native-gru-signed.json")
    code, out = check(path, "--purpose", "DS", "--org", "uni-a", "--region", "DE")
    assert code == 2 and "disease" in out
    code, out = check(path, "--purpose", "GRU", "--org", "uni-a", "--region", "DE", "--at", "2027-01-01")
    assert code == 2 and "time zone" in out


def test_validate(tmp_path: Path) -> None:
    result = runner.invoke(app, ["consent", "validate", str(EXAMPLES)])
    assert result.exit_code == 0, result.output
    assert "0 bad" in result.output
    for path in EXAMPLES.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(DATA / "fhir-r4-unmappable.json", tmp_path / "zz-unmappable.json")
    (tmp_path / "broken.json").write_text("[]")
    result = runner.invoke(app, ["consent", "validate", str(tmp_path)])
    assert result.exit_code == 1
    bad = [line for line in result.output.splitlines() if line.startswith("BAD")]
    assert len(bad) == 2
    assert any("zz-unmappable.json: Consent.provision.dataPeriod" in line for line in bad)
    assert any("broken.json: not a JSON object" in line for line in bad)
    assert runner.invoke(app, ["consent", "validate", str(tmp_path / "nope")]).exit_code == 2


def test_sign(tmp_path: Path) -> None:
    from audit.signing import Signer

    key = tmp_path / "issuer.key"
    signer = Signer.generate()
    signer.save(key)
    out = tmp_path / "signed.json"
    result = runner.invoke(
        app,
        [
            "consent",
            "sign",
            str(EXAMPLES / "fhir-r5-ds-breast-cancer.json"),
            "--key",
            str(key),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    body = json.loads(out.read_text())
    assert body["contract"]["issuer_key"] == signer.key_id
    validated = runner.invoke(app, ["consent", "validate", str(tmp_path)])
    assert validated.exit_code == 0 and "native-signed" in validated.output
    again = runner.invoke(
        app,
        ["consent", "sign", str(EXAMPLES / "native-hmb-ncu-irb.json"), "--key", str(key), "--out", str(out)],
    )
    assert again.exit_code == 2 and "exists" in again.output  # never overwrites
    key.chmod(0o644)
    loose = runner.invoke(
        app,
        [
            "consent",
            "sign",
            str(EXAMPLES / "native-hmb-ncu-irb.json"),
            "--key",
            str(key),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert loose.exit_code == 2 and "must not be readable by others" in loose.output


def test_check_methods_development_against_nmds(tmp_path: Path) -> None:
    """Issue 21, item 5: methods research alone (purpose MDS) or on a disease (--methods), decided
    as the DUOS matcher does: an NMDS consent refuses general methods research."""
    from datetime import UTC, datetime

    from consent import duo
    from consent.model import Contract, Provision

    nmds = Contract(contract_id="c", pseudonym="p", hospital="h", version=1,
                    issued=datetime(2026, 1, 1, tzinfo=UTC),
                    provision=Provision(type="permit", purposes=(duo.GRU,), modifiers=(duo.NMDS,)))
    path = tmp_path / "gru-nmds.json"
    path.write_text(json.dumps(nmds.to_json()))
    base = [str(path), "--org", "uni-a", "--region", "DE", "--at", "2027-01-01T00:00:00Z"]
    assert json.loads(check(*base, "--purpose", "HMB")[1])["decision"] == "permit"
    refused = json.loads(check(*base, "--purpose", "HMB", "--methods")[1])
    assert refused["decision"] == "deny"
    assert any(r.get("term") == duo.NMDS for r in refused["reasons"]), refused
    assert json.loads(check(*base, "--purpose", "MDS")[1])["decision"] == "deny"
    plain = tmp_path / "gru.json"
    plain.write_text(json.dumps(nmds.model_copy(update={"provision": Provision(
        type="permit", purposes=(duo.GRU,))}).to_json()))
    assert json.loads(check(str(plain), *base[1:], "--purpose", "MDS")[1])["decision"] == "permit"
