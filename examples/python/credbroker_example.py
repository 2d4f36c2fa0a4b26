#!/usr/bin/env python3
"""A trading pod in Python that hot-swaps exchange keys from credbroker.

It fetches its tenant's credentials over mutual TLS, then watches
WatchRotations and refetches a set whenever its version changes, keeping the
last good set if the broker is unreachable and resuming from the last
sequence number after a reconnect. It never accepts a set older than the
version an event announced: it passes that version as min_version and
fetches again, with backoff, until the broker serves it. The gRPC stubs are generated from the
repository's proto/ with grpcio-tools on first run (into ./gen).

    pip install -r requirements.txt
    python3 credbroker_example.py --target localhost:50051 \\
        --ca .credbroker-dev/ca.pem --cert .credbroker-dev/client.pem \\
        --key .credbroker-dev/client.key \\
        --tenant 00000000-0000-0000-0000-000000000001 --exchange binance

Secrets are never printed: only versions and masked keys.
"""

import argparse
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")
GEN = os.path.join(HERE, "gen")


def load_stubs():
    """Generates (once) and imports the credbroker.v1 stubs."""
    target = os.path.join(GEN, "credbroker", "v1", "credbroker_pb2_grpc.py")
    proto = os.path.join(PROTO_ROOT, "credbroker", "v1", "credbroker.proto")
    if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(proto):
        from grpc_tools import protoc
        import grpc_tools

        os.makedirs(GEN, exist_ok=True)
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main([
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={GEN}",
            f"--grpc_python_out={GEN}",
            proto,
        ])
        if rc != 0:
            sys.exit(f"protoc failed with {rc}")
        for d in (os.path.join(GEN, "credbroker"), os.path.join(GEN, "credbroker", "v1")):
            open(os.path.join(d, "__init__.py"), "a").close()
    sys.path.insert(0, GEN)
    from credbroker.v1 import credbroker_pb2, credbroker_pb2_grpc

    return credbroker_pb2, credbroker_pb2_grpc


class TokenFile:
    """A bearer token re-read from its file when the file changes."""

    def __init__(self, path):
        self.path, self.mtime, self.value = path, None, None

    def metadata(self):
        if not self.path:
            return ()
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime != self.mtime:
                token = open(self.path).read().strip()
                if token:
                    self.value, self.mtime = token, mtime
        except OSError:
            pass  # keep the last good token
        return (("authorization", f"Bearer {self.value}"),) if self.value else ()


def mask(key):
    return "****" + key[-4:] if len(key) >= 12 else "****"


class Keys:
    """The set this pod signs with; replaced whole, never half-updated."""

    def __init__(self):
        self.by_exchange = {}

    def swap(self, exchange, resp):
        held = self.by_exchange.get(exchange)
        if held is not None and held.version == resp.version:
            return False  # deduplicate by version
        self.by_exchange[exchange] = resp
        return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--exchange", action="append", default=[])
    ap.add_argument("--server-name", default="localhost")
    ap.add_argument("--token-file", default=None,
                    help="file holding a bearer token (JWT), re-read when it changes")
    ap.add_argument("--max-changes", type=int, default=0,
                    help="exit after this many key swaps (0: run forever)")
    args = ap.parse_args()

    import grpc

    pb, pb_grpc = load_stubs()
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(args.ca, "rb").read(),
        private_key=open(args.key, "rb").read(),
        certificate_chain=open(args.cert, "rb").read(),
    )
    options = (("grpc.ssl_target_name_override", args.server_name),)
    keys = Keys()
    token = TokenFile(args.token_file)
    last_seq = 0
    changes = 0
    backoff = 0.1
    while True:
        try:
            with grpc.secure_channel(args.target, creds, options) as channel:
                stub = pb_grpc.CredentialBrokerStub(channel)

                def refresh(exchange, announced):
                    nonlocal changes
                    delay, started, warned = 0.05, time.monotonic(), False
                    while True:
                        resp = stub.GetCredentials(pb.GetCredentialsRequest(
                            tenant_id=args.tenant, exchange=exchange,
                            min_version=announced), metadata=token.metadata())
                        if resp.version >= announced:
                            break
                        # A replica that has not seen the event yet.
                        waited = time.monotonic() - started
                        if waited > 5 and not warned:
                            warned = True
                            print(f"still served version {resp.version} of {exchange} "
                                  f"{waited:.0f} s after version {announced} was announced; "
                                  "keeping the last good set and retrying",
                                  file=sys.stderr, flush=True)
                        time.sleep(random.uniform(delay / 2, delay))
                        delay = min(delay * 2, 5.0)
                    if keys.swap(exchange, resp):
                        changes += 1
                        print(f"swapped {exchange} to version {resp.version} "
                              f"key {mask(resp.current.api_key)}", flush=True)

                stream = stub.WatchRotations(pb.WatchRotationsRequest(
                    tenant_id=args.tenant, exchanges=args.exchange, after_seq=last_seq),
                    metadata=token.metadata())
                for msg in stream:
                    backoff = 0.1
                    kind = msg.WhichOneof("message")
                    if kind == "state":
                        refresh(msg.state.exchange, msg.state.version)
                    elif kind == "event":
                        last_seq = msg.event.seq
                        if msg.event.kind == pb.EVENT_KIND_DELETED:
                            keys.by_exchange.pop(msg.event.exchange, None)
                            print(f"deleted {msg.event.exchange}", flush=True)
                        else:
                            refresh(msg.event.exchange, msg.event.version)
                    elif kind == "heartbeat":
                        last_seq = max(last_seq, msg.heartbeat.seq)
                    if args.max_changes and changes >= args.max_changes:
                        return 0
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                last_seq = 0  # resync from full state
            print(f"stream ended ({e.code().name}); keeping the last good keys, "
                  f"resuming after seq {last_seq}", file=sys.stderr, flush=True)
        time.sleep(random.uniform(backoff / 2, backoff))
        backoff = min(backoff * 2, 30.0)


if __name__ == "__main__":
    sys.exit(main())
