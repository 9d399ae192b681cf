#!/usr/bin/env python3
"""Register a hospital's Flower node public key with the SuperLink (operator side).

    python deploy/register_supernode.py --superlink superlink.example.org:9093 \
        --ca certs/ca.pem --name hospital-a flower-node.key.pub

The SuperLink runs with --enable-supernode-auth, so a SuperNode whose key was not registered
exits with code 305 (the node daemon keeps retrying with backoff until it is). The public key
is the `flower node key` line `exchange node init` printed (the file keys/flower-node.key.pub
in the hospital's node directory). Uses Flower's Control API over TLS (federated.runtime.tls).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("public_key", type=Path, help="the hospital's Flower node public key file (.pub)")
    parser.add_argument("--superlink", required=True, help="SuperLink host:port")
    parser.add_argument("--ca", type=Path, help="CA certificate (omit only for a loopback test SuperLink)")
    parser.add_argument("--name", help="a name for the node (e.g. the hospital id)")
    args = parser.parse_args(argv)

    from federated.runtime.flwr_internals import ControlApi
    from federated.runtime.settings import disable_phone_home
    from federated.runtime.tls import register_supernode

    disable_phone_home()
    with ControlApi(args.superlink, insecure=args.ca is None,
                    root_certificates=args.ca.read_bytes() if args.ca else None) as client:
        node_id = register_supernode(client, args.public_key, name=args.name)
    print(f"registered {args.public_key} as node {node_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
