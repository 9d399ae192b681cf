"""A hospital's Flower process sized for many per machine (issue "Scale"): thread pools and malloc
arenas capped unless the operator says otherwise, the one-process SuperNode's arguments, and the
first-round warm-up done before any study arrives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from federated.runtime import site as site_module
from federated.runtime.deployment import write_node_config
from federated.runtime.executor import prewarm
from federated.runtime.hosted_supernode import parse_args
from federated.runtime.process_limits import ARENA_MAX, THREAD_ENV, limit_env, trim


def test_limits_fill_in_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in (*THREAD_ENV, "MALLOC_ARENA_MAX"):
        monkeypatch.delenv(key, raising=False)
    env = limit_env({"OMP_NUM_THREADS": "3"})
    assert env["OMP_NUM_THREADS"] == "3"  # set in the child's own environment: kept
    assert env["MKL_NUM_THREADS"] == "1" and env["MALLOC_ARENA_MAX"] == str(ARENA_MAX)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the operator's own value reaches the child
    assert limit_env({})["MALLOC_ARENA_MAX"] == "8"


def test_torch_starts_with_one_intra_op_thread() -> None:
    """The real thing: in a fresh interpreter, `limit_threads()` before torch's import leaves torch
    one thread (torch reads OMP_NUM_THREADS when its pool starts)."""
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_ENV, "MALLOC_ARENA_MAX")}
    code = ("from federated.runtime.process_limits import limit_threads, trim\n"
            "limit_threads()\nimport torch\ntrim()\nprint(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_trim_is_safe_to_call_any_time() -> None:
    trim()
    trim()


def test_hosted_supernode_reads_its_runtime_api_and_site(tmp_path: Path) -> None:
    config = tmp_path / "node-config.toml"
    config.write_text('hospital-id = "hospital-a"\n')
    address, node_config = parse_args(["--superlink", "127.0.0.1:1", "--node-config", str(config),
                                       "--insecure", "--isolation", "process", "--host", "127.0.0.1",
                                       "--port", "4567"])
    assert address == "127.0.0.1:4567" and node_config == config
    assert parse_args(["--isolation", "process", "--host", "::1", "--port", "1",
                       "--node-config", str(tmp_path / "absent.toml")]) == ("[::1]:1", None)
    with pytest.raises(SystemExit, match="--isolation: must be 'process'"):
        parse_args(["--isolation", "subprocess"])


def test_prewarm_loads_the_site_before_any_study(tmp_path: Path) -> None:
    from federated.runtime.demo_sites import provision_sites

    demo = provision_sites(tmp_path / "sites", hospitals=("hospital-a",))["hospital-a"]
    config = write_node_config(tmp_path / "node-config.toml", demo.site.node_config())
    site_module._file_cache.clear()
    assert prewarm(config) == []
    cached = {kind for kind, _path in site_module._file_cache}
    assert {"records-path", "contracts-path", "key-path"} <= cached
    # a site not provisioned yet is not an error of the process: its first round loads it
    problems = prewarm(write_node_config(tmp_path / "other.toml", {"hospital-id": "hospital-b"}))
    assert len(problems) == 1 and problems[0].startswith("site: SiteConfigError: records-path")


def test_a_survival_round_runs_without_the_libraries_a_hospital_does_not_hold(tmp_path: Path) -> None:
    """In a fresh interpreter set up as the hospital's Flower process (`hosted_supernode`: thread
    limits, pandas and Pygments refused), a site loads and a survival study's first two rounds train, with
    the consent gate, the privacy plan (PRV) and the evaluation, and none of torch (the NumPy
    engine, `federated.numpy_dp`), pandas, scikit-learn, scikit-survival, Opacus, SymPy, Pygments
    or pyarrow is imported (issue "Scale":
    memory per hospital, docs/benchmarks/scale.md; pyarrow: the records file is NumPy's `.npz`
    and the gate encodes pairs without Arrow)."""
    import json

    import numpy as np

    from federated.dp import public_initial_state
    from federated.runtime.demo_sites import approve, demo_spec, provision_sites

    sites = provision_sites(tmp_path / "sites", dataset="flchain",
                            categories=("demographics", "labs", "diagnoses"))
    demo = next(iter(sites.values()))
    spec = demo_spec("memory-study", dataset="flchain", epsilon=3.0, rounds=2)
    approve(demo.site, spec.study_id)
    np.save(tmp_path / "w.npy", public_initial_state(spec.template, list(spec.columns), spec.task))
    (tmp_path / "node.json").write_text(json.dumps(demo.site.node_config()))
    code = f"""
import json, sys
from pathlib import Path
from federated.runtime.process_limits import limit_threads, refuse_imports
limit_threads()
refuse_imports()
import numpy as np
from federated.client_app import evaluate_hospital, train_hospital_round
from federated.runtime.demo_sites import demo_spec
from federated.runtime.site import Site
try:
    import pandas
    print("pandas imported")
except ModuleNotFoundError as exc:
    print("refused:", exc)
root = Path({str(tmp_path)!r})
site = Site.from_node_config(json.loads((root / "node.json").read_text()))
site.warm()
spec = demo_spec("memory-study", dataset="flchain", epsilon=3.0, rounds=2)
w = np.load(root / "w.npy")
for r in (1, 2):
    out = train_hospital_round(site, spec, r, w)
    print("round", r, out.status)
    w = out.weights
    ev = evaluate_hospital(site, spec, w, r)
    print("evaluation", r, ev.status, len(ev.eval_stats))
import httpx, flwr.supernode.cli  # httpx without its CLI (Pygments refused), flwr's SuperNode
print("httpx", httpx.Client.__name__, "main" in dir(httpx))
print("loaded", sorted({{m.split('.')[0] for m in sys.modules}}
                       & {{"pandas", "sklearn", "sksurv", "opacus", "sympy", "pygments", "pyarrow",
                          "torch"}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: pandas: not imported in this process"), lines
    # each evaluation releases the survival statistics (Breslow, Kaplan-Meier: eval_stats)
    assert lines[1:5] == ["round 1 ok", "evaluation 1 ok 31", "round 2 ok", "evaluation 2 ok 31"], lines
    assert lines[-2] == "httpx Client True", lines
    assert lines[-1] == "loaded []", lines
