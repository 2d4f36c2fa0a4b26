#!/usr/bin/env python3
"""A Python trading pod: ccxt signs with the key credbroker holds for it, and
the key changes in place on every rotation (no restart, no request refused).

    pip install './clients/python[ccxt]'
    python3 examples/python/credbroker_example.py --target localhost:50051 \\
        --ca .credbroker-dev/ca.pem --cert .credbroker-dev/client.pem \\
        --key .credbroker-dev/client.key \\
        --tenant 00000000-0000-0000-0000-000000000001 --exchange binance

With ``--exchange-url`` (e.g. a simulator from ``credbroker dev``'s
simulators.json) it also places a signed request every ``--every`` seconds.
Secrets are never printed: only versions and masked keys.
"""

import argparse
import re
import sys
import threading

import ccxt

from credbroker import BrokerConfig, CredentialHandle, mask
from credbroker.ccxt import bind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for flag in ("--target", "--ca", "--cert", "--key", "--tenant", "--exchange"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--token-file", help="bearer token (JWT) file, re-read when it changes")
    ap.add_argument("--exchange-url", help="send signed requests here (a simulator)")
    ap.add_argument("--every", type=float, default=1.0)
    ap.add_argument("--max-changes", type=int, default=0, help="exit after N swaps (0: never)")
    a = ap.parse_args()

    config = BrokerConfig(targets=a.target.split(","), tenant=a.tenant, ca=a.ca, cert=a.cert,
                          key=a.key, server_name=a.server_name, token_file=a.token_file)
    handle = CredentialHandle(config, [a.exchange])
    done = threading.Event()
    changes = 0

    def swapped(exchange, old, new):
        nonlocal changes
        if new is None:
            print(f"deleted {exchange}", flush=True)
            return
        changes += 1
        print(f"swapped {exchange} to version {new.version} key {mask(new.current.api_key)}", flush=True)
        if a.max_changes and changes >= a.max_changes:
            done.set()

    handle.on_swap(swapped)  # before start: the first set is a swap too
    handle.start().wait_ready(60)

    # The 15 lines a trading pod needs: a ccxt exchange bound to the handle.
    exchange = getattr(ccxt, "binance" if a.exchange == "binance" else a.exchange)()
    if a.exchange_url:
        exchange.urls["api"] = {k: re.sub(r"^https?://[^/]+", a.exchange_url, v)
                                for k, v in exchange.urls["api"].items() if isinstance(v, str)}
    bind(exchange, handle)
    while not done.wait(a.every):
        if a.exchange_url and a.exchange == "binance":
            account = exchange.private_get_account()  # signed with the current key
            print(f"account answered (can trade: {account.get('canTrade')})", flush=True)
    handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
