"""HTTP Message Signatures (RFC 9421) with Ed25519 for hospital <-> coordinator requests.

Hospitals authenticate every request to the coordinator's `/v1/hospital/...` endpoints by
signing it with their registered Ed25519 key (the same key whose id the audit log knows).
The signing itself is done by the `http-message-signatures` library; this module fixes the
profile both sides must agree on:

- covered components: `@method`, `@path`, `@query`, and `content-digest` (RFC 9530
  SHA-256 of the body, added for every request, also for an empty body), so the signature
  binds the verb, the resource, its query and the exact body bytes. `@authority` is not
  covered so that a TLS-terminating proxy in front of the coordinator does not break
  signatures; the nonce (below) makes a captured request useless elsewhere anyway.
- parameters: `created` (UNIX seconds), `keyid` (the audit key id, hex), `alg="ed25519"`,
  `nonce` (128 random bits, URL-safe base64), `tag="health-exchange"` (so the verifier can
  ignore signatures made for other applications), label `hx`.
- replay protection is the verifier's job: it refuses a `created` outside a window
  (default 300 s) and a (keyid, nonce) pair it has seen before (the coordinator keeps them in
  the `request_nonces` table for at least the window).

Client use (a hospital node):

    from audit.signing import Signer
    from exchange.http_signing import HospitalAuth
    auth = HospitalAuth(Signer.load(Path("node.key")))
    with httpx.Client(base_url="https://coordinator.example", auth=auth) as client:
        client.get("/v1/hospital/studies", params={"status": "pending"})

`exchange.coordinator.client.HospitalClient` wraps the hospital endpoints on top of this.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import (
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureKeyResolver,
    InvalidSignature,
    algorithms,
)
from http_message_signatures.exceptions import HTTPMessageSignaturesException

from audit.signing import Signer

SIGNATURE_LABEL = "hx"
SIGNATURE_TAG = "health-exchange"
COVERED_COMPONENTS: tuple[str, ...] = ("@method", "@path", "@query", "content-digest")
DEFAULT_WINDOW = dt.timedelta(seconds=300)
CLOCK_SKEW = dt.timedelta(seconds=30)


class RequestSignatureError(Exception):
    """A request's signature is missing, malformed, stale, by an unknown key, or wrong."""


@dataclass(frozen=True)
class VerifiedRequest:
    """What a valid signature proves: which key signed, when, and with which nonce."""

    key_id: str
    nonce: str
    created: dt.datetime


class _PrivateKeyResolver(HTTPSignatureKeyResolver):
    def __init__(self, signer: Signer) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(signer.seed)
        self._key_id = signer.key_id

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        if key_id != self._key_id:
            raise KeyError(key_id)
        return self._key

    def resolve_public_key(self, key_id: str) -> None:  # pragma: no cover - signing only
        return None


class _PublicKeyResolver(HTTPSignatureKeyResolver):
    def __init__(self, lookup: Callable[[str], bytes | None]) -> None:
        self._lookup = lookup

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
        raw = self._lookup(key_id)
        if raw is None:
            # said plainly: this is what a node sees before the operator has registered it
            raise RequestSignatureError(
                f"key id {key_id} is not registered at this coordinator (a hospital not registered yet, "
                "or a key rotated away): the hospital's steward sends the operator the output of "
                "`exchange node show-registration`")
        return Ed25519PublicKey.from_public_bytes(raw)

    def resolve_private_key(self, key_id: str) -> None:  # pragma: no cover - verify only
        raise KeyError(key_id)


class _Message:
    """The minimal request shape the library reads: method, absolute URL, header lines."""

    def __init__(self, method: str, url: str, headers: Iterable[tuple[str, str]]) -> None:
        self.method = method.upper()
        self.url = url
        self.headers = _HeaderLines(list(headers))


class _HeaderLines:
    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self._lines = lines

    def items(self) -> list[tuple[str, str]]:
        return list(self._lines)


def new_nonce() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


def sign_request(request: httpx.Request, signer: Signer, *, nonce: str | None = None,
                 created: dt.datetime | None = None) -> None:
    """Add `Content-Digest`, `Signature-Input` and `Signature` headers to `request` in place."""
    body = request.read()
    HTTPMessageSigner(signature_algorithm=algorithms.ED25519,
                      key_resolver=_PrivateKeyResolver(signer)).sign(
        request, key_id=signer.key_id, created=created or dt.datetime.now(dt.UTC),
        nonce=nonce or new_nonce(), label=SIGNATURE_LABEL, tag=SIGNATURE_TAG,
        covered_component_ids=COVERED_COMPONENTS[:-1], body=body)


class HospitalAuth(httpx.Auth):
    """httpx authentication that signs every request with the hospital's key (fresh nonce each)."""

    requires_request_body = True

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        sign_request(request, self.signer)
        yield request


def verify_request(method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes,
                   public_key_for: Callable[[str], bytes | None], *,
                   window: dt.timedelta = DEFAULT_WINDOW) -> VerifiedRequest:
    """Check a request's RFC 9421 signature under this module's profile.

    `public_key_for(key_id)` returns the raw Ed25519 public key of a registered, current key,
    or None. Raises RequestSignatureError with a reason a client can act on. Replay of the
    nonce is NOT checked here (that needs the caller's store).
    """
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519,
                                   key_resolver=_PublicKeyResolver(public_key_for))
    verifier.max_clock_skew = CLOCK_SKEW
    message = _Message(method, url, headers)
    try:
        results = verifier.verify(message, max_age=window, expect_tag=SIGNATURE_TAG,
                                  require_components=COVERED_COMPONENTS, body=body)
    except InvalidSignature as exc:
        raise RequestSignatureError(f"signature rejected: {exc}") from exc
    except HTTPMessageSignaturesException as exc:
        raise RequestSignatureError(f"signature headers malformed: {exc}") from exc
    if len(results) != 1:
        raise RequestSignatureError("exactly one signature with tag health-exchange is required")
    params = results[0].parameters
    nonce = params.get("nonce")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
        raise RequestSignatureError("signature must carry a nonce of 16-128 characters")
    created = dt.datetime.fromtimestamp(int(params["created"]), tz=dt.UTC)
    return VerifiedRequest(key_id=str(params["keyid"]), nonce=nonce, created=created)
