"""Benchmark: one hospital's Flower process replayed in a fresh interpreter, and where its memory is.

    .venv/bin/python -m tests.bench.bench_flower_memory              # 3 survival rounds, flchain
    .venv/bin/python -m tests.bench.bench_flower_memory --rounds 1 --json out.json

The parent provisions a demo site (records, signed consent contracts, ledger, key) and the
study's initial model, then starts a child set up exactly as `hosted_supernode` sets up the
Flower process (thread and arena limits, refused imports, the ClientApp and flwr's SuperNode
imported, `executor.prewarm` with the site's node config) which trains and evaluates the rounds
with the real `train_hospital_round` / `evaluate_hospital`, trims the heap and reports its
memory from /proc (`memory_map.breakdown`, grouped) and which heavy packages it imported. No
SuperLink, gRPC traffic or daemon: the figure is the Flower process's own working set after a
study, the part of a hospital that `bench_scale` cannot attribute module by module
(docs/benchmarks/scale.md, "Memory per hospital").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: Packages reported when the child has them in sys.modules (the heavy ones a hospital may hold).
HEAVY = ("torch", "pyarrow", "scipy", "pandas", "sklearn", "sksurv", "opacus", "sympy", "pygments",
         "fastapi", "alembic", "sqlalchemy", "flwr", "grpc")

_CHILD = """
import json, os, sys, time
from pathlib import Path
t0 = time.process_time()
from federated.runtime.process_limits import limit_threads, refuse_imports, trim
limit_threads()
refuse_imports()
import numpy as np
import flwr.supernode.cli  # the SuperNode's side of the process
from federated.client_app import evaluate_hospital, train_hospital_round
from federated.runtime.executor import prewarm
from federated.runtime.demo_sites import demo_spec
from federated.runtime.site import Site
sys.path.insert(0, {repo!r})
from tests.bench.memory_map import breakdown
root = Path({root!r})
problems = prewarm(root / "node-config.toml")
ready_cpu = time.process_time() - t0
site = Site.from_node_config(json.loads((root / "node.json").read_text()))
spec = demo_spec("memory-study", dataset="flchain", epsilon=3.0, rounds={rounds})
w = np.load(root / "w.npy")
statuses = []
for r in range(1, {rounds} + 1):
    out = train_hospital_round(site, spec, r, w)
    w = out.weights
    ev = evaluate_hospital(site, spec, w, r)
    statuses.append([out.status, ev.status])
trim()
groups = {{}}
def group(name):
    for key, prefix in (("torch", "libtorch"), ("torch", "libc10"), ("torch", "libgomp"),
                        ("arrow", "libarrow"), ("arrow", "libparquet"), ("scipy", "libscipy"),
                        ("numpy", "libopenblas"), ("numpy", "libscipy_openblas"), ("grpc", "cygrpc"),
                        ("python", "libpython")):
        if name.startswith(prefix):
            return key
    if name in ("[heap]", "[anon]"):
        return name
    if name.startswith("_") and ".so" in name or ".cpython-" in name:
        return "extension modules"
    return "other files"
for name, row in breakdown(os.getpid()).items():
    g = groups.setdefault(group(name), {{"rss": 0.0, "private": 0.0, "anon": 0.0}})
    for k in g:
        g[k] += row[k]
rollup = {{}}
for line in open("/proc/self/smaps_rollup"):
    parts = line.split()
    if parts[0] in ("Rss:", "Pss:", "Anonymous:"):
        rollup[parts[0][:-1].lower()] = int(parts[1]) / 1024
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps({{"rollup": rollup, "groups": groups, "heavy": heavy, "modules": len(sys.modules),
                  "statuses": statuses, "problems": problems, "ready_cpu_s": ready_cpu,
                  "total_cpu_s": time.process_time() - t0}}))
"""


def provision(root: Path, rounds: int) -> None:
    """The site and the study's initial model, written where the child reads them."""
    import numpy as np

    from federated.dp import public_initial_state
    from federated.runtime.demo_sites import approve, demo_spec, provision_sites
    from federated.runtime.deployment import write_node_config

    sites = provision_sites(root / "sites", dataset="flchain",
                            categories=("demographics", "labs", "diagnoses"))
    demo = next(iter(sites.values()))
    spec = demo_spec("memory-study", dataset="flchain", epsilon=3.0, rounds=rounds)
    approve(demo.site, spec.study_id)
    np.save(root / "w.npy", public_initial_state(spec.template, list(spec.columns), spec.task))
    (root / "node.json").write_text(json.dumps(demo.site.node_config()))
    write_node_config(root / "node-config.toml", demo.site.node_config())


def replay(root: Path, rounds: int) -> dict[str, Any]:
    """Run the child once; its report."""
    repo = str(Path(__file__).resolve().parents[2])
    code = _CHILD.format(root=str(root), rounds=rounds, repo=repo, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-4000:])
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for _ in range(args.repeats):  # a fresh site each time: a replayed study spends its budget
        with tempfile.TemporaryDirectory(prefix="flower-memory-") as tmp:
            provision(Path(tmp), args.rounds)
            results.append(replay(Path(tmp), args.rounds))
    for result in results:
        roll = result["rollup"]
        print(f"RSS {roll['rss']:.0f} MB, anonymous {roll['anonymous']:.0f} MB, "
              f"modules {result['modules']}, CPU to ready {result['ready_cpu_s']:.2f} s, "
              f"total {result['total_cpu_s']:.2f} s, rounds {result['statuses']}")
        for name, row in sorted(result["groups"].items(), key=lambda kv: -kv[1]["rss"]):
            print(f"  {name:<20} rss {row['rss']:6.1f}  private {row['private']:6.1f}  "
                  f"anon {row['anon']:6.1f}")
        print("  heavy packages:", ", ".join(result["heavy"]))
        if result["problems"]:
            print("  prewarm problems:", result["problems"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
