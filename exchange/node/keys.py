"""The node's two keys.

- The Ed25519 signing key (`audit.signing.Signer`): signs the node's requests to the
  coordinator (RFC 9421), its study decisions and its contribution receipts. Its key id is
  what the operator registers in the log.
- The witness key (Ed25519, C2SP cosignature/v1): cosigns the log's checkpoints
  (exchange/node/witnessing.py); registered in the log with the signing key.
- The Flower node key: ECDSA P-256 in OpenSSH format, because Flower's SuperNode
  authentication (`--auth-supernode-private-key`, `flwr supernode register KEY.pub`)
  accepts only NIST-curve ECDSA keys in that format.

Private key files are created with 0600 permissions and never overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from audit.cosignature import CosignatureV1Signer
from audit.signing import Signer


@dataclass(frozen=True)
class NodeIdentity:
    """What the steward sends to the operator to register the node."""

    hospital_id: str
    public_key_b64: str
    key_id: str
    flower_public_key: str
    witness_vkey: str | None = None

    def to_json(self) -> dict[str, str]:
        out = {"hospital_id": self.hospital_id, "public_key": self.public_key_b64,
               "key_id": self.key_id, "flower_public_key": self.flower_public_key}
        if self.witness_vkey is not None:
            out["witness_vkey"] = self.witness_vkey
        return out


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def create_flower_key(path: Path) -> str:
    """Write a new ECDSA P-256 private key (OpenSSH format, 0600) to `path` and its public
    key to `path.pub`; return the public key line."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
    _write_private(path, pem)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(public + b"\n")
    return public.decode("ascii")


def load_flower_public_key(path: Path) -> str:
    """The public key line of the Flower node key at `path` (checks the private key loads
    and is P-256, the only curve Flower accepts)."""
    private = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError(f"{path}: not an ECDSA P-256 key")
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
    return public.decode("ascii")


def create_keys(signing_key_path: Path, flower_key_path: Path) -> None:
    """Create both keys; refuse (FileExistsError) if either exists, before writing any."""
    for path in (signing_key_path, flower_key_path):
        if path.exists():
            raise FileExistsError(f"{path}: key already exists; refusing to overwrite it")
    Signer.generate().save(signing_key_path)
    create_flower_key(flower_key_path)


def witness_name(hospital_id: str) -> str:
    """The node's witness key name (a C2SP key name: no spaces, no '+')."""
    return f"{hospital_id}.witness"


def witness_signer(hospital_id: str, path: Path) -> CosignatureV1Signer:
    """The node's witness key (a third Ed25519 key, used only to cosign checkpoints), created
    0600 on first use: a witness key is separate so that a cosignature can never be mistaken
    for a request or entry signature."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        Signer.generate().save(path)
    return CosignatureV1Signer(witness_name(hospital_id), Signer.load(path))


def identity(hospital_id: str, signing_key_path: Path, flower_key_path: Path,
             witness_key_path: Path | None = None) -> NodeIdentity:
    signer = Signer.load(signing_key_path)
    witness = None if witness_key_path is None else str(witness_signer(hospital_id, witness_key_path).vkey)
    return NodeIdentity(hospital_id=hospital_id, public_key_b64=signer.public_key_b64,
                        key_id=signer.key_id, flower_public_key=load_flower_public_key(flower_key_path),
                        witness_vkey=witness)
