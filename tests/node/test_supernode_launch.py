"""The SuperNode command line the daemon builds, and one real start of it.

flwr 1.42 exits with code 303 when `--auth-supernode-private-key` comes with `--insecure`, so the
node key goes with TLS only; insecure (loopback) mode is checked against a real SuperLink."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from exchange.node.daemon import supernode_specs
from exchange.node.settings import NodeSettings
from exchange.node.site_export import site_paths
from exchange.node.supervisor import Supervisor
from federated.runtime.deployment import READY_LINE, SuperLinkProcess, free_port
from tests.node.helpers import wait_for


def _with(settings: NodeSettings, **supernode: object) -> NodeSettings:
    return settings.model_copy(update={"supernode": settings.supernode.model_copy(update=supernode)})


def _write_node_config(settings: NodeSettings) -> None:
    path = site_paths(settings)["node_config"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('hospital-id = "hospital-a"\n')


def test_insecure_mode_passes_no_node_key(settings: NodeSettings) -> None:
    specs = {s.name: s for s in supernode_specs(_with(settings, insecure=True, executor="warm"))}
    argv = specs["supernode"].argv
    assert "--insecure" in argv
    assert "--auth-supernode-private-key" not in argv and "--root-certificates" not in argv
    # one process: the SuperNode hosting the warm executor, ready once that logged its line
    assert list(specs) == ["supernode"]
    assert argv[1:3] == ("-m", "federated.runtime.hosted_supernode")
    assert argv[argv.index("--isolation") + 1] == "process"
    assert specs["supernode"].ready_line == READY_LINE and specs["supernode"].after is None
    # thread pools and malloc arenas capped for a machine hosting several hospitals
    assert specs["supernode"].env["OMP_NUM_THREADS"] == "1"
    assert specs["supernode"].env["MALLOC_ARENA_MAX"] == "2"


def test_operator_thread_settings_win(settings: NodeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    [spec] = supernode_specs(_with(settings, insecure=True, executor="warm"))
    assert spec.env["OMP_NUM_THREADS"] == "4" and spec.env["MKL_NUM_THREADS"] == "1"


def test_tls_mode_passes_the_node_key_and_the_ca(settings: NodeSettings) -> None:
    [supernode] = supernode_specs(_with(settings, insecure=False, root_certificates=Path("ca.pem"),
                                             executor="plain"))
    argv = list(supernode.argv)
    assert "--insecure" not in argv
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(settings.flower_key_path)
    assert argv[argv.index("--root-certificates") + 1] == str(settings.data_dir / "ca.pem")
    assert supernode.after is None


@pytest.mark.flower
@pytest.mark.slow
def test_an_insecure_supernode_joins_a_loopback_superlink(settings: NodeSettings, tmp_path: Path) -> None:
    """The daemon's own command line (plain executor: nothing but the SuperNode) registers with a
    real insecure SuperLink; with the node key as well, flwr would exit 303 instead."""
    link = SuperLinkProcess(tmp_path / "superlink")
    link.start()
    node = _with(settings, insecure=True, executor="plain", superlink_address=link.address,
                 clientappio_address=f"127.0.0.1:{free_port()}")
    _write_node_config(node)
    sup = Supervisor()
    try:
        for spec in supernode_specs(node):
            sup.want(spec)
        sup.tick()
        wait_for(lambda: link.online_node_ids() or not sup.children["supernode"].running,
                 "the supernode to register", deadline_s=120)
        log = (node.data_dir / "logs" / "supernode.log").read_text(errors="replace")
        assert sup.children["supernode"].running, log
        assert len(link.online_node_ids()) == 1
        assert "Exit Code" not in log
    finally:
        sup.stop_all(grace_s=10.0)
        link.stop()


@pytest.mark.flower
@pytest.mark.slow
def test_the_node_key_with_insecure_is_refused_by_flower(settings: NodeSettings, tmp_path: Path) -> None:
    """Why the key goes with TLS only: the old command line (both flags) ends with Flower's 303."""
    node = _with(settings, insecure=True, executor="plain", superlink_address=f"127.0.0.1:{free_port()}",
                 clientappio_address=f"127.0.0.1:{free_port()}")
    _write_node_config(node)
    [spec] = supernode_specs(node)
    old = replace(spec, argv=(*spec.argv, "--auth-supernode-private-key", str(node.flower_key_path)))
    sup = Supervisor(initial_backoff_s=600.0)
    try:
        sup.want(old)
        sup.tick()
        wait_for(lambda: (sup.tick(), sup.children["supernode"].last_exit is not None)[1],
                 "flower to refuse the command line", deadline_s=120)
        assert sup.children["supernode"].flower_exit == 303
    finally:
        sup.stop_all(grace_s=5.0)


def test_plaintext_only_to_a_loopback_superlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, finding 5: the SuperNode used to run `--insecure` by default whatever the
    SuperLink's address (and the daemon then dropped the node key). Now plaintext is the default
    only without root certificates, and allowed only to loopback; the refusal names the setting."""
    from pydantic import ValidationError

    from exchange.node.settings import load_node_settings

    for name in list(__import__("os").environ):
        if name.startswith("EXCHANGE_NODE_"):
            monkeypatch.delenv(name)
    assert load_node_settings(supernode={"superlink_address": "127.0.0.1:9093"}).supernode.insecure is True
    assert load_node_settings(supernode={"superlink_address": "[::1]:9093"}).supernode.insecure is True
    tls = load_node_settings(supernode={"superlink_address": "superlink.example.org:9093",
                                        "root_certificates": "ca.pem"}).supernode
    assert tls.insecure is False
    [supernode] = supernode_specs(_with(load_node_settings(), **{**tls.model_dump(), "executor": "plain"}))
    assert "--insecure" not in supernode.argv and "--auth-supernode-private-key" in supernode.argv
    for supernode_settings in ({"superlink_address": "superlink.example.org:9093"},
                               {"superlink_address": "10.0.0.5:9093", "insecure": True}):
        with pytest.raises(ValidationError, match=r"supernode.insecure: plaintext gRPC is allowed only to a "
                                                  r"loopback SuperLink"):
            load_node_settings(supernode=supernode_settings)
    with pytest.raises(ValidationError, match=r"supernode\.insecure: true, but supernode\.root_certificates"):
        load_node_settings(supernode={"insecure": True, "root_certificates": "ca.pem"})
    # and the coordinator: http:// only on loopback
    for url in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080",
                "https://exchange.example.org"):
        assert load_node_settings(coordinator_url=url).coordinator_url == url
    for url in ("http://exchange.example.org", "http://10.0.0.5:8080", "http://coordinator:8080"):
        with pytest.raises(ValidationError, match=r"coordinator_url\n.*plaintext http:// is allowed only to "
                                                  r"a loopback coordinator"):
            load_node_settings(coordinator_url=url)
    config = tmp_path / "node.toml"
    config.write_text('[supernode]\nsuperlink_address = "203.0.113.7:9093"\n')
    with pytest.raises(ValidationError, match=r"supernode\.insecure"):
        load_node_settings(config)


@pytest.mark.flower
@pytest.mark.slow
def test_a_hosted_supernode_alive_but_not_online_is_restarted(settings: NodeSettings, tmp_path: Path) -> None:
    """The daemon's warm SuperNode (`hosted_supernode`) touches its liveness file after each
    heartbeat the SuperLink accepted. Its SuperLink SIGKILLed and not back, the process stays up
    retrying (alive, not online, no exit for the supervisor to see): after `restart_offline_s`
    the supervisor stops it, saying why, and starts it again; with a SuperLink back on the same
    port the new process is online."""
    link = SuperLinkProcess(tmp_path / "superlink")
    link.start()
    node = _with(settings, insecure=True, executor="warm", superlink_address=link.address,
                 clientappio_address=f"127.0.0.1:{free_port()}", restart_offline_s=30.0)
    _write_node_config(node)
    events: list[tuple[str, dict[str, object]]] = []
    sup = Supervisor(initial_backoff_s=1.0, on_event=lambda e, d: events.append((e, d)))
    [spec] = supernode_specs(node)
    assert spec.liveness_file is not None and spec.liveness_s == 30.0
    try:
        sup.want(spec)
        wait_for(lambda: (sup.tick(), spec.liveness_file.exists() and link.online_node_ids())[1],
                 "the supernode to be online", deadline_s=180)
        child = sup.children["supernode"]
        first = child.process
        assert first is not None
        assert link.proc is not None
        link.proc.kill()
        link.proc.popen.wait(30)
        wait_for(lambda: (sup.tick(), any(e == "child_unresponsive" for e, _ in events))[1],
                 "the supervisor to stop the silent supernode", deadline_s=180)
        assert [e for e, _ in events].count("child_exited") == 0  # it had not exited by itself
        [reason] = [str(d["reason"]) for e, d in events if e == "child_unresponsive"]
        assert "supernode.online untouched" in reason and "not online" in reason
        link.start()
        wait_for(lambda: (sup.tick(), child.process is not None and child.process is not first
                          and link.online_node_ids())[1], "the restarted supernode to be online",
                 deadline_s=180)
        exited = [d for e, d in events if e == "child_exited"]
        assert exited[0]["unresponsive"] is True and child.restarts >= 1
    finally:
        sup.stop_all(grace_s=10.0)
        link.stop()
