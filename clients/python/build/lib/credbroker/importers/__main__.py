"""credbroker-import: moves freqtrade and hummingbot keys into the broker.

    credbroker-import freqtrade user_data/config.json --tenant T --target H:P \\
        --ca ca.pem --cert client.pem --key client.key            # dry run
    credbroker-import hummingbot conf/ --password-file pw ... --apply

A dry run (the default) lists what it found, keys masked, and stores
nothing. ``--apply`` stores each key with ValidateAndStore, so the exchange
checks it like any new key; a key the tenant already has is reported
(``--rotate`` replaces it with Rotate instead). Secrets are never printed.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import List, Optional, Sequence

import grpc

from credbroker.connection import BrokerConfig, connect
from credbroker.importers import Found, ImportError_, freqtrade, hummingbot


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="credbroker-import", description=__doc__.split("\n")[0])
    ap.add_argument("source", choices=("freqtrade", "hummingbot"))
    ap.add_argument("path", nargs="+", help="freqtrade config files, or hummingbot's conf folder")
    ap.add_argument("--password-file", help="hummingbot: file holding the password (else asked)")
    ap.add_argument("--apply", action="store_true", help="store the keys (default: dry run)")
    ap.add_argument("--rotate", action="store_true", help="rotate keys the tenant already has")
    ap.add_argument("--overlap-seconds", type=int, default=None)
    ap.add_argument("--tenant")
    ap.add_argument("--target", action="append", default=[])
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--server-name")
    ap.add_argument("--token-file")
    return ap


def find(args: argparse.Namespace) -> List[Found]:
    if args.source == "freqtrade":
        return [freqtrade.read(p) for p in args.path]
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            password = f.read().rstrip("\n")
    else:
        password = getpass.getpass("hummingbot password: ")
    found: List[Found] = []
    for conf in args.path:
        found.extend(hummingbot.read(conf, password))
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        found = find(args)
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not found:
        print("no keys found")
        return 1
    for f in found:
        print(f"found {f}")
    if not args.apply:
        print(f"dry run: {len(found)} key(s) would be stored; pass --apply to store them")
        return 0
    missing = [n for n in ("tenant", "ca", "cert", "key") if not getattr(args, n)] + (
        [] if args.target else ["target"]
    )
    if missing:
        print(f"error: --apply needs --{', --'.join(missing)}", file=sys.stderr)
        return 2
    config = BrokerConfig(
        targets=args.target,
        tenant=args.tenant,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        server_name=args.server_name,
        token_file=args.token_file,
    )
    broker = connect(config)
    failed = 0
    try:
        for f in found:
            try:
                try:
                    meta = broker.validate_and_store(f.exchange, f.keys)
                    print(f"stored {f.exchange} version {meta.version} ({f.source})")
                except grpc.RpcError as e:
                    if (
                        args.rotate
                        and isinstance(e, grpc.Call)
                        and e.code() == grpc.StatusCode.ALREADY_EXISTS
                    ):
                        r = broker.rotate(f.exchange, f.keys, args.overlap_seconds)
                        print(
                            f"rotated {f.exchange} to version {r.credential.version} ({f.source})"
                        )
                    else:
                        raise
            except grpc.RpcError as e:
                failed += 1
                code = e.code().name if isinstance(e, grpc.Call) else "ERROR"
                details = e.details() if isinstance(e, grpc.Call) else ""
                print(f"refused {f.exchange} ({f.source}): {code}: {details}", file=sys.stderr)
    finally:
        broker.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
