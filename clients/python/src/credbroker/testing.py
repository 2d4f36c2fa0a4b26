"""Run a real `credbroker dev` (the broker binary, in memory, with its
exchange simulators) for a pod's own tests and benchmarks:

    dev = start_dev(tmpdir)            # needs the credbroker binary
    dev.sim_key("binance", KeySet(key, secret))   # create the key at the exchange
    dev.operator(tenant).validate_and_store("binance", KeySet(key, secret))
    handle = CredentialHandle(dev.config(tenant), ["binance"]).start()
    ...
    stop(dev.proc)

The binary is ``$CREDBROKER_BIN``, else ``$CARGO_TARGET_DIR/debug/credbroker``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from typing import Any, Dict, List, Optional

from credbroker.connection import Broker, BrokerConfig, connect
from credbroker.credentials import KeySet


def broker_binary() -> str:
    path = os.environ.get("CREDBROKER_BIN")
    if not path:
        target = os.environ.get("CARGO_TARGET_DIR") or "target"
        path = os.path.join(target, "debug", "credbroker")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"no credbroker binary at {path}: cargo build --bin credbroker (or set CREDBROKER_BIN)"
        )
    return path


@dataclasses.dataclass
class Dev:
    proc: "subprocess.Popen[str]"
    dir: str
    port: int
    sims: Dict[str, str]
    pod_tenant: str
    output: List[str]

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def config(self, tenant: str, *, pod: bool = False, **kw: Any) -> BrokerConfig:
        cert, key = ("pod.pem", "pod.key") if pod else ("client.pem", "client.key")
        return BrokerConfig(
            targets=[f"127.0.0.1:{self.port}"],
            tenant=tenant,
            ca=self.file("ca.pem"),
            cert=self.file(cert),
            key=self.file(key),
            server_name="localhost",
            **kw,
        )

    def operator(self, tenant: str) -> Broker:
        return connect(self.config(tenant))

    def sim_key(self, exchange: str, keys: KeySet) -> None:
        """Creates the key at the simulated exchange (its web UI)."""
        body = json.dumps({"secret": keys.api_secret, "passphrase": keys.passphrase}).encode()
        req = urllib.request.Request(
            f"{self.sims[exchange]}/__sim/keys/{keys.api_key}", data=body, method="PUT"
        )
        urllib.request.urlopen(req, timeout=5).read()

    def sim_delete(self, exchange: str, api_key: str) -> None:
        """Deletes the key at the simulated exchange."""
        req = urllib.request.Request(f"{self.sims[exchange]}/__sim/keys/{api_key}", method="DELETE")
        urllib.request.urlopen(req, timeout=5).read()


def start_dev(tmp: str, extra: Optional[List[str]] = None) -> Dev:
    pod_tenant = str(uuid.uuid4())
    proc = subprocess.Popen(
        [
            broker_binary(),
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            tmp,
            "--pod-tenant",
            pod_tenant,
        ]
        + (extra or []),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, CREDBROKER_LOG="warn"),
    )
    assert proc.stdout is not None
    output: List[str] = []
    port = 0
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        output.append(line)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
        if "Watch changes" in line or time.monotonic() > deadline:
            break
    if not port:
        proc.kill()
        raise RuntimeError("credbroker dev did not start:\n" + "".join(output))
    stdout = proc.stdout

    def drain() -> None:
        for line in stdout:
            output.append(line)

    threading.Thread(target=drain, daemon=True).start()
    sims: Dict[str, str] = {}
    try:
        with open(os.path.join(tmp, "simulators.json"), encoding="utf-8") as f:
            sims = json.load(f)
    except FileNotFoundError:
        pass  # --validation format or live: no simulators
    return Dev(proc, tmp, port, sims, pod_tenant, output)


def stop(proc: "subprocess.Popen[str]") -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
