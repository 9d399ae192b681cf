"""The console's study page vs the JSON API calls that return the same data.

    .venv/bin/python -m tests.bench.bench_console            # 300 requests each
    .venv/bin/python -m tests.bench.bench_console --quick    # 60

A coordinator with one completed study (scripted run, SQLite) behind Litestar's TestClient;
one signed-in researcher. Timed, best of `--repeat` runs, sequential requests:
- the page: GET /console/studies/{id} (session lookup, the study, its results, the payout
  read back from the log's end, two SVG charts, the Jinja template);
- the baseline: GET /v1/studies/{id} and GET /v1/studies/{id}/results with the API key (the
  same data as JSON, no payouts, no HTML).
The ratio is the page's throughput over the baseline's (1.0: as fast as the two API calls).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.console.conftest import Console
from tests.exchange.conftest import make_world


def _best(repeat: int, fn: object, count: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(count):
            fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    count = 60 if args.quick else args.requests
    with tempfile.TemporaryDirectory() as tmp:
        worlds = make_world(f"sqlite:///{Path(tmp) / 'bench.db'}", Path(tmp))
        world = next(worlds)
        try:
            study = world.submit("alice")
            world.decide("h-one", study["id"])
            world.decide("h-two", study["id"])
            world.wait_runs()
            console = Console(world)
            console.sign_in("alice")
            page_path = f"/console/studies/{study['id']}"
            headers = world.headers("alice")

            def page() -> None:
                assert console.get(page_path).status_code == 200

            def api() -> None:
                assert world.client.get(f"/v1/studies/{study['id']}", headers=headers).status_code == 200
                assert world.client.get(f"/v1/studies/{study['id']}/results",
                                        headers=headers).status_code == 200

            page()
            api()  # warm both paths
            t_page = _best(args.repeat, page, count)
            t_api = _best(args.repeat, api, count)
        finally:
            for _ in worlds:
                pass
    print(f"study page : {count / t_page:8.1f} req/s ({1000 * t_page / count:.2f} ms each)")
    print(f"API (2 GET): {count / t_api:8.1f} req/s ({1000 * t_api / count:.2f} ms each)")
    print(f"ratio page/API throughput: {t_api / t_page:.2f}x")


if __name__ == "__main__":
    main()
