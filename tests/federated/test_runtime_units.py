"""Unit tests of the Flower runtime pieces that need no running Flower process: settings,
environment, node config files, TLS material, the study spec and the hospital site description
(the guarded flwr internals are tested in test_flwr_internals.py)."""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from federated.runtime import flwr_internals
from federated.runtime.deployment import SuperLinkProcess, is_loopback, write_node_config
from federated.runtime.settings import NO_PHONE_HOME_ENV, RuntimeSettings, flower_env
from federated.runtime.site import NODE_CONFIG_KEYS, Site, SiteConfigError, read_records, write_records
from federated.runtime.tls import generate_node_keys, generate_tls, node_public_key_bytes
from federated.study_spec import StudySpec, StudySpecError

# -- settings and environment ------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("mode", "turbo"), ("server_poll", 0), ("pull_backoff", -1),
                                              ("supernode_idle_sleep", 600), ("supernode_heartbeat", 5),
                                              ("supernode_idle_sleep_max", 0.05), ("executor_poll_max", 0.01),
                                              ("supernode_hot_s", -1), ("superlink_long_poll", 11),
                                              ("superlink_long_poll_max", -1),
                                              ("superlink_long_poll_max", 2.5),
                                              ("executor_in_process", "yes"),
                                              ("supernode_follow_up_sleep", 0.2),
                                              ("supernode_follow_up_sleep", -0.01),
                                              ("supernode_follow_up_s", 11),
                                              ("server_reply_pulls", 0), ("server_reply_pulls", 1.5),
                                              ("server_reply_pulls", True)])
def test_bad_settings_are_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        RuntimeSettings(**{field: value})


def test_the_hosted_executor_setting_reaches_the_flower_process_by_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`executor_in_process` travels as EXCHANGE_EXECUTOR_IN_PROCESS (0 or 1) to
    `hosted_supernode`; anything else there is refused by its name."""
    from federated.runtime.supernode_main import settings_from_env

    monkeypatch.delenv("EXCHANGE_EXECUTOR_IN_PROCESS", raising=False)
    assert settings_from_env().executor_in_process is True
    monkeypatch.setenv("EXCHANGE_EXECUTOR_IN_PROCESS", "0")
    assert settings_from_env().executor_in_process is False
    monkeypatch.setenv("EXCHANGE_EXECUTOR_IN_PROCESS", "true")
    with pytest.raises(ValueError, match=r"^EXCHANGE_EXECUTOR_IN_PROCESS"):
        settings_from_env()


def test_plain_mode_polls_like_flower() -> None:
    assert RuntimeSettings(mode="plain").effective_server_poll == 3.0
    assert RuntimeSettings(server_poll=0.2).effective_server_poll == 0.2


def test_flower_env_turns_phoning_home_off(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "home", base={"PATH": "/usr/bin", "FLWR_TELEMETRY_ENABLED": "1"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert NO_PHONE_HOME_ENV.items() <= env.items()


# -- node config, loopback rule ----------------------------------------------------------------


def test_node_config_file_round_trips_through_flowers_parser(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    config: dict[str, str | int | float | bool] = {
        "hospital-id": "hospital-a", "records-path": str(tmp_path / 'a b "c".parquet'),
        "ledger-url": "sqlite:////x/ledger.db", "budget": 2.5, "n": 3, "flag": True}
    path = write_node_config(tmp_path / "node.toml", config)
    assert parse_config_args([str(path)]) == config


def test_node_config_refuses_dotted_keys_and_odd_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"a.b"):
        write_node_config(tmp_path / "n.toml", {"a.b": "x"})
    with pytest.raises(ValueError, match="must be str"):
        write_node_config(tmp_path / "n.toml", {"k": [1, 2]})  # type: ignore[dict-item]


def test_tls_is_required_off_loopback(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.0.0.5") and not is_loopback("example.org")
    with pytest.raises(ValueError, match=r"^tls"):
        SuperLinkProcess(tmp_path, host="10.0.0.5", port=9999)
    with pytest.raises(ValueError, match=r"^supernode_auth"):
        SuperLinkProcess(tmp_path, supernode_auth=True)


# -- TLS material ------------------------------------------------------------------------------


def test_generated_certificates_chain_and_cover_loopback(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    files = generate_tls(tmp_path / "tls")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert files.server_key.stat().st_mode & 0o777 == 0o600
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


def test_node_keys_are_what_flower_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    keys = generate_node_keys(tmp_path, "node-a")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert uses_nist_ec_curve(private.public_key())
    assert keys.private_key.stat().st_mode & 0o777 == 0o600
    assert len(node_public_key_bytes(keys.public_key)) > 0


# -- study spec ----------------------------------------------------------------------------------


def _spec(**overrides: Any) -> StudySpec:
    from federated.runtime.demo_sites import demo_spec

    return demo_spec("s-1", columns=["mean radius", "mean texture"], **overrides)


def test_spec_round_trips_through_the_run_config() -> None:
    spec = _spec()
    config = spec.to_run_config()
    assert set(config) == {"study-id", "study-spec"}
    again = StudySpec.from_run_config(config)
    assert again == spec and again.sha256() == spec.sha256()


def test_spec_errors_name_the_field() -> None:
    spec = _spec()
    obj = spec.to_json()
    with pytest.raises(StudySpecError, match="epsilon"):
        StudySpec.from_json({**obj, "epsilon": -1})
    with pytest.raises(StudySpecError, match="surprise"):
        StudySpec.from_json({**obj, "surprise": 1})
    with pytest.raises(StudySpecError, match="label"):
        StudySpec.from_json({**obj, "label": "mean radius"})
    with pytest.raises(StudySpecError, match=r"request.epsilon"):
        StudySpec.from_json({**obj, "request": {**obj["request"], "epsilon": 9.0}})
    with pytest.raises(StudySpecError, match="study-id"):
        StudySpec.from_run_config({"study-id": "other", "study-spec": spec.canonical_bytes().decode()})
    with pytest.raises(StudySpecError, match="study-spec: missing"):
        StudySpec.from_run_config({"study-id": "s-1", "study-spec": ""})
    with pytest.raises(StudySpecError, match="not JSON"):
        StudySpec.from_run_config({"study-id": "s-1", "study-spec": "{"})


# -- the site --------------------------------------------------------------------------------------


def test_site_config_names_the_missing_key() -> None:
    config = {key: f"/x/{key}" for key in NODE_CONFIG_KEYS}
    Site.from_node_config(config)
    del config["ledger-url"]
    with pytest.raises(SiteConfigError, match=r"^ledger-url"):
        Site.from_node_config(config)


def _same_records(back: Any, part: Any) -> None:
    assert back.pseudonyms == part.pseudonyms and back.columns == part.columns
    assert all(type(p) is str for p in back.pseudonyms)
    np.testing.assert_array_equal(back.x, part.x)
    np.testing.assert_array_equal(back.is_test, part.is_test)
    assert back.x.dtype == np.float32 and back.is_test.dtype == np.bool_
    assert dict(back.categories) == dict(part.categories) and back.target_scale == part.target_scale
    assert (back.dataset, back.hospital_id, back.task) == (part.dataset, part.hospital_id, part.task)


def test_records_file_round_trips(tmp_path: Path) -> None:
    from federated.data import load_federated

    part = load_federated("diabetes", 3)[1]
    write_records(tmp_path / "r.npz", part, "progression")
    assert (tmp_path / "r.npz").read_bytes()[:4] == b"PK\x03\x04"  # NumPy's archive, no pyarrow
    back, label = read_records(tmp_path / "r.npz")
    assert label == "progression"
    _same_records(back, part)
    np.testing.assert_array_equal(back.y, part.y)
    # a node's export names no label: y is NaN; the name given is the file's, whatever its suffix
    write_records(tmp_path / "export.parquet", part, None)
    assert not (tmp_path / "export.parquet.npz").exists()
    back, label = read_records(tmp_path / "export.parquet")
    assert label is None and np.isnan(back.y).all()
    _same_records(back, part)
    empty = part.select_records([])
    write_records(tmp_path / "empty.npz", empty, "progression")
    back, _label = read_records(tmp_path / "empty.npz")
    assert len(back) == 0 and back.x.shape == (0, len(part.columns))


def test_a_parquet_records_file_of_an_earlier_version_is_still_read(tmp_path: Path) -> None:
    """A node upgraded with its records still in Parquet (as `write_records` wrote them before)
    trains on them until its next export (to `records.npz`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from federated.data import load_federated

    part = load_federated("diabetes", 3)[1]
    columns: dict[str, Any] = {"pseudonym": list(part.pseudonyms), "is_test": part.is_test.astype(bool),
                               "progression": np.asarray(part.y, dtype=np.float32)}
    for j, name in enumerate(part.columns):
        columns[name] = np.asarray(part.x[:, j], dtype=np.float32)
    meta = {"dataset": part.dataset, "hospital_id": part.hospital_id, "task": part.task,
            "label": "progression", "features": list(part.columns), "categories": dict(part.categories),
            "target_scale": part.target_scale, "target_offset": part.target_offset}
    table = pa.table(columns).replace_schema_metadata({b"health-exchange.records": json.dumps(meta).encode()})
    pq.write_table(table, tmp_path / "old.parquet")
    back, label = read_records(tmp_path / "old.parquet")
    assert label == "progression"
    _same_records(back, part)
    np.testing.assert_array_equal(back.y, part.y)


def test_a_records_file_that_is_not_one_is_named(tmp_path: Path) -> None:
    """Hostile or damaged archives: refused by name (`records-path`), never unpickled."""
    from federated.data import load_federated

    part = load_federated("diabetes", 3)[1]
    good = tmp_path / "good.npz"
    write_records(good, part, "progression")
    with np.load(good) as archive:
        arrays = {name: archive[name] for name in archive.files}
    bad: dict[str, dict[str, Any]] = {
        "pickled pseudonyms": {**arrays, "pseudonym": np.asarray(list(part.pseudonyms), dtype=object)},
        "short x": {**arrays, "x": arrays["x"][:-1]},
        "x as float64": {**arrays, "x": arrays["x"].astype(np.float64)},
        "no meta": {k: v for k, v in arrays.items() if k != "meta"},
        "meta not JSON": {**arrays, "meta": np.frombuffer(b"{nope", np.uint8)},
        "no y for the label": {k: v for k, v in arrays.items() if k != "y"},
    }
    for what, content in bad.items():
        path = tmp_path / f"{what}.npz"
        with path.open("wb") as handle:
            np.savez(handle, **content)
        with pytest.raises(SiteConfigError, match=r"^records-path"):
            read_records(path)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(SiteConfigError, match=r"^records-path"):
        read_records(truncated)


def test_bad_records_or_approvals_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "r.parquet").write_text("nope")
    with pytest.raises(SiteConfigError, match=r"^records-path"):
        read_records(tmp_path / "r.parquet")
    approvals = tmp_path / "approvals.json"
    approvals.write_text(json.dumps({"approved": "s-1"}))
    site = Site("h", tmp_path / "r.parquet", tmp_path / "c.jsonl", "sqlite://", tmp_path / "k", approvals)
    with pytest.raises(SiteConfigError, match=r"^approvals-path"):
        site.approved_studies()
    with pytest.raises(SiteConfigError, match=r"^key-path"):
        site.signer()


# -- the FAB and the components it names -------------------------------------------------------------


def test_fab_declares_our_components_and_study_keys() -> None:
    from flwr.clientapp import ClientApp
    from flwr.common.config import get_fab_config
    from flwr.serverapp import ServerApp
    from flwr.supercore.object_ref import load_app

    from federated.runtime.executor import EXPECTED_CLIENTAPP_REF
    from federated.runtime.server_runner import build_fab

    fab, sha = build_fab()
    config = get_fab_config(fab)["tool"]["flwr"]["app"]
    assert config["components"] == {"serverapp": "federated.server_app:app",
                                    "clientapp": EXPECTED_CLIENTAPP_REF}
    assert config["config"] == {"study-id": "", "study-spec": ""}
    assert len(sha) == 64 and build_fab()[1] == sha  # reproducible
    assert isinstance(load_app(config["components"]["serverapp"], ValueError), ServerApp)
    assert isinstance(load_app(config["components"]["clientapp"], ValueError), ClientApp)


def test_executor_reads_the_clientapp_a_fab_declares() -> None:
    """The warm executor refuses any FAB whose clientapp is not ours (no researcher code runs at a
    hospital); this is the check it applies."""
    from flwr.cli.build import build_fab_from_files

    from federated.app import APP_DIR
    from federated.runtime.executor import EXPECTED_CLIENTAPP_REF

    ours = (APP_DIR / "pyproject.toml").read_bytes()
    theirs = ours.replace(b'clientapp = "federated.client_app:app"', b'clientapp = "evil.client:app"')
    assert theirs != ours
    assert flwr_internals.fab_clientapp_ref(build_fab_from_files({"pyproject.toml": ours})[0]) == \
        EXPECTED_CLIENTAPP_REF
    assert flwr_internals.fab_clientapp_ref(build_fab_from_files({"pyproject.toml": theirs})[0]) == \
        "evil.client:app"


def test_run_study_refuses_plain_http_off_loopback(tmp_path: Path) -> None:
    from federated.runtime.server_runner import run_study

    class Nobody:
        def on_round(self, round: int, metrics: Any, receipts: Any) -> None: ...
        def on_complete(self, model_path: Path, sha256: str) -> None: ...
        def on_failed(self, reason: str) -> None: ...

    with pytest.raises(ValueError, match=r"^root_certificates: TLS is required"):
        run_study("10.1.2.3:9093", _spec(), Nobody(), tmp_path)


def test_site_files_are_reread_when_replaced(tmp_path: Path) -> None:
    """The warm executor caches parsed files; an approval withdrawn by an atomic rewrite (same
    size, possibly the same mtime tick) must still be seen at the next message."""
    approvals = tmp_path / "approvals.json"
    approvals.write_text(json.dumps({"approved": ["s-1"]}))
    site = Site("h", tmp_path / "r", tmp_path / "c", "sqlite://", tmp_path / "k", approvals)
    assert site.approved_studies() == {"s-1"}
    stat = approvals.stat()
    replacement = tmp_path / "approvals.json.new"
    replacement.write_text(json.dumps({"approved": ["s-2"]}))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, same size
    replacement.replace(approvals)
    assert site.approved_studies() == {"s-2"}


def test_a_woken_executor_claims_at_once_and_does_not_poll_while_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a wake-up Event (`hosted_supernode`: the SuperNode sets it when it stored a task), an
    idle executor makes one claim attempt per `WAKE_FALLBACK_S`, not one per poll interval, and
    a task is claimed as soon as the Event is set."""
    import threading
    import time

    from federated.runtime import executor as executor_module

    claims: list[float] = []
    pending: list[flwr_internals.TaskClaim] = []

    class Queue:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def acquire(self) -> flwr_internals.TaskClaim | None:
            claims.append(time.monotonic())
            return pending.pop() if pending else None

        def close(self) -> None:
            pass

    monkeypatch.setattr(flwr_internals, "TaskQueue", Queue)
    monkeypatch.setattr(flwr_internals, "load_client_app", lambda ref: None)
    ran: list[float] = []
    wake = threading.Event()
    executor = executor_module.WarmExecutor("127.0.0.1:1", poll=0.01, pull_backoff=None, wake=wake)
    monkeypatch.setattr(executor, "run_task", lambda token: ran.append(time.monotonic()))
    thread = threading.Thread(target=executor.serve, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        assert len(claims) == 1  # polling every 0.01 s would have made ~50
        pending.append(flwr_internals.TaskClaim("token", 1))
        woken_at = time.monotonic()
        wake.set()
        deadline = time.monotonic() + 5
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ran and ran[0] - woken_at < 1.0 < executor_module.WAKE_FALLBACK_S
    finally:
        executor.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_a_long_exchange_is_polled_less_often_within_a_bounded_delay() -> None:
    """The ServerApp polls every `poll` early in an exchange, then a small fraction of the time
    so far (a reply waits at most that much longer), never less often than `POLL_MAX_S`; plain
    mode's 3 s poll is left alone."""
    from federated.server_app import POLL_ELAPSED_FRACTION, POLL_MAX_S, poll_interval

    assert poll_interval(0.05, 0.2) == 0.05
    assert poll_interval(0.05, 5.0) == pytest.approx(5.0 * POLL_ELAPSED_FRACTION)
    assert poll_interval(0.05, 5.0) <= 0.05 * 5.0  # at most a few percent of the exchange
    assert poll_interval(0.05, 600.0) == POLL_MAX_S
    assert poll_interval(3.0, 600.0) == 3.0


def test_the_runner_warm_up_imports_what_a_first_run_submission_would() -> None:
    """`server_runner.warm` (the coordinator's warm-up) imports the flwr modules a study's
    submission and task claim import and builds the FAB once, in a fresh interpreter: the first
    study's start then imports none of them."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import json, sys
        from federated.runtime import flwr_internals
        from federated.runtime.server_runner import build_fab, warm
        before = [m for m in flwr_internals.SERVER_RUN_MODULES if m in sys.modules]
        warm()
        after = [m for m in flwr_internals.SERVER_RUN_MODULES if m in sys.modules]
        print(json.dumps({"before": before, "after": after, "fab": len(build_fab()[0])}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "flwr.cli.build" not in result["before"] and "flwr.superlink.grid" not in result["before"]
    assert result["after"] == list(flwr_internals.SERVER_RUN_MODULES)
    assert result["fab"] > 0


def test_a_supernode_expecting_a_message_polls_fast_again(monkeypatch: pytest.MonkeyPatch) -> None:
    pacer = flwr_internals.IdlePacer(0.1, 0.5, hot_s=30.0)
    pacer._active_at -= 3600  # idle for an hour
    monkeypatch.setattr(flwr_internals, "_supernode_pacers", [pacer])
    assert [pacer.next_sleep() for _ in range(3)] == pytest.approx([0.15, 0.225, 0.3375])
    flwr_internals.supernode_expects_message()
    assert pacer.next_sleep() == 0.1
    monkeypatch.setattr(flwr_internals, "_supernode_pacers", [])
    flwr_internals.supernode_expects_message()  # no SuperNode in this process: nothing to do


def test_after_the_servers_warm_up_a_first_pre_training_imports_nothing_of_torch() -> None:
    """`federated.dp.warm_public_state` (the coordinator's warm-up) takes a process's first
    `torch.optim` step, which imports torch's compiler stack: the first study's public
    pre-training then imports none of it, and computes the same initial model."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        from federated.dp import public_initial_state, warm_public_state
        from federated.clinical_data import survival_feature_specs
        warm_public_state()
        before = set(sys.modules)
        cols = [s.name for s in survival_feature_specs("flchain")]
        state = public_initial_state("cox_ph", cols, "survival", seed=0)
        new = sorted(m for m in set(sys.modules) - before if m.startswith(("torch", "sympy")))
        print(json.dumps({"new": new, "state": state.tolist()}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["new"] == []
    from federated.clinical_data import survival_feature_specs
    from federated.dp import _public_initial_state
    from federated.templates import get_template

    cols = [s.name for s in survival_feature_specs("flchain")]
    unwarmed = _public_initial_state(get_template("cox_ph"), cols, "survival", 0, None)
    assert np.array_equal(np.asarray(result["state"], dtype=np.float32), unwarmed)


class _SlowPullGrid:
    """A grid whose reply pulls take `pull_s` (a busy SuperLink, replies' objects pulled one
    after another); the reply comes with the third pull."""

    def __init__(self, pull_s: float) -> None:
        self.pull_s, self.pulls = pull_s, 0

    def push_messages(self, messages: Any) -> list[str]:
        return ["m1"]

    def pull_messages(self, message_ids: Any) -> list[Any]:
        self.pulls += 1
        threading.Event().wait(self.pull_s)  # not time.sleep: the test records the ServerApp's sleeps
        if self.pulls < 3:
            return []
        return [types.SimpleNamespace(metadata=types.SimpleNamespace(reply_to_message_id="m1"))]


@pytest.mark.parametrize("pull_s", [0.0, 0.08])
def test_the_servers_poll_counts_from_the_start_of_its_last_pull(monkeypatch: pytest.MonkeyPatch,
                                                                  pull_s: float) -> None:
    """The sleep between two reply pulls counts from the last pull's start: after a pull that
    took longer than the poll interval the next one starts at once (a reply stored meanwhile
    does not wait another interval); after a quick one, the rest of the interval."""
    from federated import server_app

    slept: list[float] = []
    monkeypatch.setattr(server_app.time, "sleep", slept.append)
    message = types.SimpleNamespace(metadata=types.SimpleNamespace(dst_node_id=7, group_id="1"))
    grid = _SlowPullGrid(pull_s)
    (phase,) = server_app.exchange_many(grid, [[message]], timeout=30.0, poll=0.05)  # type: ignore[arg-type]
    assert list(phase.replies) == [7] and grid.pulls == 3
    if pull_s > 0.05:
        assert slept == []
    else:
        assert len(slept) == 2 and all(0.03 < s <= 0.05 for s in slept)
