#!/usr/bin/env python3
"""Make the TLS material of an exchange deployment (Python `cryptography`, no openssl needed).

    python deploy/make_certs.py --out certs --superlink-host superlink.example.org \
        --coordinator-host exchange.example.org [--ip 10.0.0.5 ...]

Writes into --out (private keys 0600, never overwritten unless --force):
  ca.pem, ca.key                 the deployment's own CA (keep ca.key offline after this)
  superlink.pem, superlink.key   the SuperLink's server certificate (SANs: --superlink-host, --ip)
  coordinator.pem, coordinator.key  the coordinator's HTTPS certificate (for the reverse proxy or
                                 ingress; a public CA certificate works as well)
  postgres_password              a random password for the compose file's PostgreSQL

Hospitals receive only ca.pem (to verify the SuperLink). Each hospital makes its own keys with
`exchange node init`; no hospital key is made or seen here. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS_CA = 3650
VALID_DAYS_LEAF = 825  # the CA/Browser Forum maximum for server certificates


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    if path.exists() and not force:
        raise SystemExit(f"{path} exists; refusing to overwrite it (use --force)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Health Data Exchange"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("Health Data Exchange CA"))
            .issuer_name(_name("Health Data Exchange CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS_CA))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str],
              ips: list[str], now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=VALID_DAYS_LEAF))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--superlink-host", action="append", required=True,
                        help="DNS name(s) hospitals use to reach the SuperLink (repeatable)")
    parser.add_argument("--coordinator-host", action="append", required=True,
                        help="DNS name(s) of the coordinator API (repeatable)")
    parser.add_argument("--ip", action="append", default=[], help="IP SANs for both servers")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew
    ca_key, ca_cert = make_ca(now)
    pem = serialization.Encoding.PEM
    _write(args.out / "ca.key", _key_pem(ca_key), private=True, force=args.force)
    _write(args.out / "ca.pem", ca_cert.public_bytes(pem), private=False, force=args.force)
    for name, hosts in (("superlink", args.superlink_host), ("coordinator", args.coordinator_host)):
        key, cert = make_leaf(ca_key, ca_cert, hosts, ["127.0.0.1", *args.ip], now)
        _write(args.out / f"{name}.key", _key_pem(key), private=True, force=args.force)
        _write(args.out / f"{name}.pem", cert.public_bytes(pem), private=False, force=args.force)
    _write(args.out / "postgres_password", secrets.token_urlsafe(32).encode(), private=True, force=args.force)
    print(f"wrote CA, SuperLink and coordinator certificates to {args.out}; send hospitals ca.pem only",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
