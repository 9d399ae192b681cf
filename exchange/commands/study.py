"""`exchange study ...`: a researcher's commands, over the coordinator's HTTP API.

The API key comes from `--api-key` or `EXCHANGE_API_KEY` (never echoed). Refusals print every
problem the coordinator listed, with its field, and exit 1.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from exchange.coordinator.client import ApiClient, CoordinatorError

app = typer.Typer(help="Submit studies, follow them, download their models.", no_args_is_help=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="EXCHANGE_URL", help="Coordinator URL.")]
KeyOption = Annotated[str, typer.Option("--api-key", envvar="EXCHANGE_API_KEY",
                                        help="Your API key (or EXCHANGE_API_KEY).", show_default=False)]
DEFAULT_URL = "http://127.0.0.1:8080"


def _refused(exc: CoordinatorError) -> typer.Exit:
    """Print every problem the coordinator listed, with its field; the exit to raise."""
    typer.echo(f"refused ({exc.status}): {exc.problem.get('detail', '')}", err=True)
    for error in exc.problem.get("errors", []):
        typer.echo(f"  {error.get('field')}: {error.get('reason')}", err=True)
    return typer.Exit(1)


def _call(url: str, api_key: str, action: Any) -> Any:
    try:
        with ApiClient(url, api_key) as client:
            return action(client)
    except CoordinatorError as exc:
        raise _refused(exc) from exc
    except (OSError, httpx.TransportError) as exc:  # httpx's connection errors are not OSErrors
        typer.echo(f"cannot reach the coordinator at {url}: {exc} (is it running, and is --url or "
                   "EXCHANGE_URL right?)", err=True)
        raise typer.Exit(3) from exc


def _print(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


@app.command("submit")
def submit(file: Annotated[Path, typer.Argument(help="The study request (JSON).")],
           api_key: KeyOption, url: UrlOption = DEFAULT_URL) -> None:
    """Submit a study; its token budget moves into escrow."""
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        typer.echo(f"{file}: cannot read a JSON study request: {exc}", err=True)
        raise typer.Exit(2) from exc
    _print(_call(url, api_key, lambda c: c.post("/v1/studies", body)))


@app.command("status")
def status(study_id: Annotated[str, typer.Argument()], api_key: KeyOption, url: UrlOption = DEFAULT_URL,
           results: Annotated[bool, typer.Option(help="Also show rounds, contributions and the privacy "
                                                      "report.")] = False,
           ) -> None:
    """A study's state, decisions and progress; with --results ONE JSON document
    `{"study", "results", "report"}`, so it can be piped to a JSON tool."""
    def fetch(client: ApiClient) -> Any:
        study = client.get(f"/v1/studies/{study_id}")
        if not results:
            return study
        return {"study": study, "results": client.get(f"/v1/studies/{study_id}/results"),
                "report": client.get(f"/v1/studies/{study_id}/report")}

    _print(_call(url, api_key, fetch))


@app.command("report")
def report(study_id: Annotated[str, typer.Argument()], api_key: KeyOption, url: UrlOption = DEFAULT_URL,
           as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
           ) -> None:
    """The privacy report: per hospital epsilon and delta spent, steps, the accountant, count-free
    exclusions, metrics per round (docs/coordinator-api.md, "Privacy report")."""
    body = _call(url, api_key, lambda c: c.get(f"/v1/studies/{study_id}/report"))
    if as_json:
        _print(body)
        return
    from exchange.commands.study_view import print_report

    print_report(body)


@app.command("list")
def list_studies(api_key: KeyOption, url: UrlOption = DEFAULT_URL,
                 state: Annotated[str | None, typer.Option("--status", help="Only studies in this "
                                                           "state (submitted, running, ...).")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Your organisation's studies (operators and auditors: every study), oldest first."""
    def fetch(client: ApiClient) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            params: dict[str, Any] = {"offset": offset, "limit": 200}
            if state:
                params["status"] = state
            page = client.get("/v1/studies", **params)
            items.extend(page["items"])
            offset = page.get("next_offset")
        return items

    items = _call(url, api_key, fetch)
    if as_json:
        _print(items)
        return
    from exchange.commands.study_view import print_list

    print_list(items)


@app.command("watch")
def watch(study_id: Annotated[str, typer.Argument()], api_key: KeyOption, url: UrlOption = DEFAULT_URL,
          interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
          timeout: Annotated[float | None, typer.Option(min=0, help="Give up after this many "
                                                        "seconds (default: never).")] = None) -> None:
    """Follow a study live: its state, each hospital's decision, rounds done with a progress bar.
    Ends when the study ends: exit 0 if it completed, 1 if it failed, was cancelled or expired,
    4 on --timeout."""
    from exchange.commands.study_view import watch_study

    try:
        with ApiClient(url, api_key) as client:
            final = watch_study(lambda: client.get(f"/v1/studies/{study_id}"), interval=interval,
                                timeout=timeout)
    except CoordinatorError as exc:
        raise _refused(exc) from exc
    except OSError as exc:
        typer.echo(f"cannot reach the coordinator at {url}: {exc}", err=True)
        raise typer.Exit(3) from exc
    if final is None:
        raise typer.Exit(4)
    if final.get("status") != "completed":
        raise typer.Exit(1)


@app.command("cancel")
def cancel(study_id: Annotated[str, typer.Argument()], api_key: KeyOption, url: UrlOption = DEFAULT_URL,
           reason: Annotated[str, typer.Option()] = "cancelled by the researcher") -> None:
    """Cancel a study; what was not paid out is refunded."""
    _print(_call(url, api_key, lambda c: c.post(f"/v1/studies/{study_id}/cancel", {"reason": reason})))


@app.command("download")
def download(study_id: Annotated[str, typer.Argument()], api_key: KeyOption,
             out: Annotated[Path | None, typer.Option(help="Where to write the model.")] = None,
             url: UrlOption = DEFAULT_URL) -> None:
    """Download the trained model (safetensors) and check its SHA-256 against the study's."""
    study = _call(url, api_key, lambda c: c.get(f"/v1/studies/{study_id}"))
    data = _call(url, api_key, lambda c: c.download(f"/v1/studies/{study_id}/model"))
    digest = hashlib.sha256(data).hexdigest()
    if digest != study.get("model_sha256"):
        typer.echo(f"model hash {digest} does not match the study's {study.get('model_sha256')}", err=True)
        raise typer.Exit(1)
    target = out or Path(f"{study_id}.safetensors")
    target.write_bytes(data)
    typer.echo(f"{target} sha256 {digest}")
