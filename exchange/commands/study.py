"""`exchange study ...`: a researcher's commands, over the coordinator's HTTP API.

The API key comes from `--api-key` or `EXCHANGE_API_KEY` (never echoed). Refusals print every
problem the coordinator listed, with its field, and exit 1.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from exchange.coordinator.client import ApiClient, CoordinatorError

app = typer.Typer(help="Submit studies, follow them, download their models.", no_args_is_help=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="EXCHANGE_URL", help="Coordinator URL.")]
KeyOption = Annotated[str, typer.Option("--api-key", envvar="EXCHANGE_API_KEY",
                                        help="Your API key (or EXCHANGE_API_KEY).", show_default=False)]
DEFAULT_URL = "http://127.0.0.1:8080"


def _call(url: str, api_key: str, action: Any) -> Any:
    try:
        with ApiClient(url, api_key) as client:
            return action(client)
    except CoordinatorError as exc:
        typer.echo(f"refused ({exc.status}): {exc.problem.get('detail', '')}", err=True)
        for error in exc.problem.get("errors", []):
            typer.echo(f"  {error.get('field')}: {error.get('reason')}", err=True)
        raise typer.Exit(1) from exc
    except OSError as exc:
        typer.echo(f"cannot reach the coordinator at {url}: {exc}", err=True)
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
           results: Annotated[bool, typer.Option(help="Also show rounds and contributions.")] = False,
           ) -> None:
    """A study's state, decisions and progress."""
    _print(_call(url, api_key, lambda c: c.get(f"/v1/studies/{study_id}")))
    if results:
        _print(_call(url, api_key, lambda c: c.get(f"/v1/studies/{study_id}/results")))


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
