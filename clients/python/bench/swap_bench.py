#!/usr/bin/env python3
"""How fast Python pods swap after a rotation.

Starts `credbroker dev` (the broker binary, format validation), stores a
key, starts ``--pods`` handles spread over ``--procs`` worker processes
(each handle its own mTLS connection and WatchRotations stream, as separate
pods would have), then rotates ``--rotations`` times, one second apart, and
reports per swap the time from the Rotate call to the pod's swap callback
(the new set is already what ``get()`` returns). Prints a table and, with
``--json``, writes the figures.

    python3 clients/python/bench/swap_bench.py --pods 100 --procs 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Dict, List, Tuple


def worker(args: argparse.Namespace) -> int:
    from credbroker import BrokerConfig, CredentialHandle

    cfg = json.loads(args.worker)
    config = BrokerConfig(**cfg)
    swaps: List[Tuple[int, float]] = []
    lock = threading.Lock()

    def record(_ex: str, _old: object, new: object) -> None:
        t = time.time()
        with lock:
            swaps.append((getattr(new, "version", 0), t))

    handles = []
    for _ in range(args.threads):
        h = CredentialHandle(
            config, ["binance"], acknowledge=True, include_credentials=not args.fetch
        )
        h.on_swap(record)
        handles.append(h.start())
    for h in handles:
        h.wait_ready(120)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says when the rotations are over
    for h in handles:
        h.close()
    print(json.dumps([s for s in swaps if s[0] > 1]), flush=True)
    return 0


def pct(xs: List[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rotations", type=int, default=10)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument(
        "--fetch",
        action="store_true",
        help="fetch each set with GetCredentials instead of taking it from the stream",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from credbroker import KeySet
    from credbroker.testing import start_dev, stop

    with tempfile.TemporaryDirectory() as tmp:
        dev = start_dev(tmp, ["--validation", "format"])
        try:
            tenant = str(uuid.uuid4())
            op = dev.operator(tenant)
            op.validate_and_store("binance", KeySet("binanceKeyBench00000", "binanceSecretBench0"))
            cfg = dev.config(tenant)
            spec = json.dumps(
                {
                    f: getattr(cfg, f)
                    for f in ("targets", "tenant", "ca", "cert", "key", "server_name")
                }
            )
            per = [
                args.pods // args.procs + (1 if i < args.pods % args.procs else 0)
                for i in range(args.procs)
            ]
            workers = [
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", spec, "--threads", str(n)]
                    + (["--fetch"] if args.fetch else []),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for n in per
                if n
            ]
            for w in workers:
                assert w.stdout is not None
                if w.stdout.readline().strip() != "ready":
                    raise RuntimeError("a worker did not get ready")
            started: Dict[int, float] = {}
            for r in range(args.rotations):
                version = r + 2
                time.sleep(1.0)
                started[version] = time.time()
                op.rotate(
                    "binance",
                    KeySet(f"binanceKeyBench{version:05d}", f"binanceSecretBench{version}"),
                    3600,
                )
            time.sleep(2.0)
            latencies: List[float] = []
            for w in workers:
                assert w.stdin is not None and w.stdout is not None
                w.stdin.write("done\n")
                w.stdin.flush()
                for v, t in json.loads(w.stdout.readline()):
                    latencies.append((t - started[v]) * 1000)
                w.wait(30)
            op.close()
        finally:
            stop(dev.proc)
    expected = args.pods * args.rotations
    figures = {
        "pods": args.pods,
        "processes": len(workers),
        "rotations": args.rotations,
        "swaps": len(latencies),
        "missed": expected - len(latencies),
        "p50_ms": round(pct(latencies, 50), 1),
        "p99_ms": round(pct(latencies, 99), 1),
        "max_ms": round(max(latencies), 1) if latencies else None,
    }
    print(
        f"{'pods':>5} {'procs':>5} {'swaps':>6} {'missed':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    )
    print(
        f"{figures['pods']:>5} {figures['processes']:>5} {figures['swaps']:>6} {figures['missed']:>6} "
        f"{figures['p50_ms']:>7} {figures['p99_ms']:>7} {figures['max_ms']:>7}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if figures["missed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
