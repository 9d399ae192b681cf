"""TLS certificates and SuperNode authentication keys, generated with `cryptography`.

Flower's SuperLink serves its Fleet, Control and Runtime APIs over one HTTPS port
(`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`); SuperNodes verify it with
`--root-certificates CA`. With `--enable-supernode-auth` a SuperNode must sign its requests with
an ECDSA key on a NIST curve, in OpenSSH format, whose public half was registered beforehand
(`flwr supernode register KEY.pub`, here `register_supernode`). An unregistered key makes the
SuperNode exit with code 305. Private keys are written with 0600 permissions.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federated.runtime import flwr_internals


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA certificate and the SuperLink's certificate and key are."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def root_certificates(self) -> bytes:
        return self.ca_cert.read_bytes()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def generate_tls(directory: Path, hostnames: tuple[str, ...] = ("localhost",),
                 ips: tuple[str, ...] = ("127.0.0.1",), days: int = 365) -> TlsFiles:
    """A fresh CA and a SuperLink server certificate for `hostnames` and `ips` (SANs)."""
    if not hostnames and not ips:
        raise ValueError("hostnames/ips: at least one subject alternative name is needed")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("health-exchange flower CA"))
        .issuer_name(_name("health-exchange flower CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostnames[0] if hostnames else ips[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return files


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's ECDSA authentication key pair (OpenSSH format)."""

    private_key: Path
    public_key: Path


def generate_node_keys(directory: Path, name: str = "supernode") -> NodeKeys:
    """An ECDSA P-384 key pair in OpenSSH format, as `flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` expect."""
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(directory / name, directory / f"{name}.pub")
    _write_private(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    keys.public_key.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return keys


def node_public_key_bytes(public_key_path: Path) -> bytes:
    """The bytes the Control API's RegisterNode expects (what `flwr supernode register` sends)."""
    key = serialization.load_ssh_public_key(public_key_path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{public_key_path}: not an ECDSA public key ({type(key).__name__})")
    return flwr_internals.node_public_key_bytes(key)


def register_supernode(control: flwr_internals.ControlApi, public_key_path: Path,
                       name: str | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink (before the node connects); returns
    the node id the SuperLink assigned."""
    node_id = control.register_node(node_public_key_bytes(public_key_path), name=name)
    if not node_id:
        raise RuntimeError(f"SuperLink refused to register {public_key_path}")
    return node_id
