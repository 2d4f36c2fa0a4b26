"""How a pod reaches the broker: mutual TLS to one of several addresses, a
bearer token re-read from its file, and the contract's calls."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import random
import threading
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import grpc
from google.protobuf.message import Message

from credbroker.credentials import Credentials, KeySet
from credbroker.v1 import credbroker_pb2 as pb

log = logging.getLogger("credbroker")

SERVICE = "/credbroker.v1.CredentialBroker/"
Metadata = Tuple[Tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and who this pod is.

    ``targets`` are ``host:port`` addresses of broker replicas (any of them
    serves any call); the handle starts at a random one and moves on when it
    fails. ``ca``, ``cert`` and ``key`` are PEM files (the pod's workload
    certificate, e.g. from SPIRE); they are re-read at each new connection,
    so a rotated certificate is picked up. ``server_name`` overrides the
    name the broker's certificate is checked against. ``token_file`` holds a
    bearer token (JWT), re-read whenever the file changes. ``instance`` names
    this pod in acknowledgements (pods sharing an identity are told apart).
    """

    targets: Sequence[str]
    tenant: str
    ca: str
    cert: str
    key: str
    server_name: Optional[str] = None
    token_file: Optional[str] = None
    instance: str = ""
    connect_timeout: float = 20.0
    call_timeout: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        if not self.targets:
            raise ValueError("BrokerConfig needs at least one target (host:port)")
        if not self.tenant:
            raise ValueError("BrokerConfig needs the tenant id")


class TokenFile:
    """A bearer token kept in a file (a projected service-account token, a
    JWT an agent refreshes): re-read when the file changes, the last good
    token kept when the file is briefly missing or empty."""

    def __init__(self, path: Optional[str]) -> None:
        self._path = path
        self._stamp: Optional[Tuple[float, int]] = None
        self._value: Optional[str] = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenFile(path={self._path!r}, token=<redacted>)"

    def metadata(self) -> Metadata:
        if not self._path:
            return ()
        with self._lock:
            try:
                st = os.stat(self._path)
                stamp = (st.st_mtime, st.st_size)
                if stamp != self._stamp:
                    with open(self._path, encoding="utf-8") as f:
                        token = f.read().strip()
                    if token:
                        self._value, self._stamp = token, stamp
            except OSError as e:
                if self._value is None:
                    log.warning("cannot read the token file %s: %s", self._path, e.strerror)
            return (("authorization", f"Bearer {self._value}"),) if self._value else ()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


def keyset(s: pb.CredentialSet) -> KeySet:
    return KeySet(
        api_key=s.api_key,
        api_secret=s.api_secret,
        passphrase=s.passphrase if s.HasField("passphrase") else None,
    )


def credentials(exchange: str, r: pb.GetCredentialsResponse) -> Credentials:
    previous = keyset(r.previous) if r.HasField("previous") else None
    return Credentials(
        exchange=exchange,
        version=r.version,
        current=keyset(r.current),
        previous=previous,
        previous_version=r.previous_version if r.HasField("previous_version") else None,
        previous_valid_until=(
            r.previous_valid_until.ToDatetime(tzinfo=datetime.timezone.utc)
            if r.HasField("previous_valid_until")
            else None
        ),
        stale=r.stale,
    )


class Broker:
    """One connection to one broker replica and the contract's calls on it.

    Calls raise ``grpc.RpcError``; its ``details()`` is the broker's message
    (never a secret)."""

    def __init__(self, config: BrokerConfig, target: str, token: TokenFile) -> None:
        self.config, self.target, self._token = config, target, token
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(config.ca),
            private_key=_read(config.key),
            certificate_chain=_read(config.cert),
        )
        options: List[Tuple[str, Any]] = [
            # Notice a dead peer on an idle stream within about 30 s.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            # The handle does its own jittered reconnect across targets.
            ("grpc.enable_retries", 0),
            ("grpc.initial_reconnect_backoff_ms", 1_000),
            # The stream is read by the handle's own thread: no hand-off
            # through grpcio's channel thread per message (fewer wake-ups
            # per swap, which is what a pod's swap latency is made of).
            ("SingleThreadedUnaryStream", 1),  # grpc.experimental.ChannelOptions
        ]
        if config.server_name:
            options.append(("grpc.ssl_target_name_override", config.server_name))
        self.channel = grpc.secure_channel(target, creds, options)

    def __repr__(self) -> str:
        return f"Broker(target={self.target!r})"

    def close(self) -> None:
        self.channel.close()

    def wait_connected(self) -> None:
        """Waits for the TLS handshake (at most ``connect_timeout``)."""
        grpc.channel_ready_future(self.channel).result(timeout=self.config.connect_timeout)

    def _unary(self, method: str, req: Req, resp: Callable[[bytes], Resp]) -> Resp:
        call = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp,
        )
        out: Resp = call(req, timeout=self.config.call_timeout, metadata=self._token.metadata())
        return out

    def get_credentials(self, exchange: str, min_version: int = 0) -> Credentials:
        r = self._unary(
            "GetCredentials",
            pb.GetCredentialsRequest(
                tenant_id=self.config.tenant, exchange=exchange, min_version=min_version
            ),
            pb.GetCredentialsResponse.FromString,
        )
        return credentials(exchange, r)

    def acknowledge(self, exchange: str, version: int) -> None:
        self._unary(
            "AcknowledgeVersion",
            pb.AcknowledgeVersionRequest(
                tenant_id=self.config.tenant,
                exchange=exchange,
                version=version,
                instance=self.config.instance,
            ),
            pb.AcknowledgeVersionResponse.FromString,
        )

    def watch(
        self, exchanges: Sequence[str], after_seq: int, include_credentials: bool = False
    ) -> "Stream":
        call = self.channel.unary_stream(
            SERVICE + "WatchRotations",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.WatchRotationsResponse.FromString,
        )
        it = call(
            pb.WatchRotationsRequest(
                tenant_id=self.config.tenant,
                exchanges=list(exchanges),
                after_seq=after_seq,
                include_credentials=include_credentials,
            ),
            metadata=self._token.metadata(),
        )
        return Stream(it)

    def validate_and_store(self, exchange: str, keys: KeySet) -> pb.CredentialMetadata:
        r = self._unary(
            "ValidateAndStore",
            pb.ValidateAndStoreRequest(
                tenant_id=self.config.tenant, exchange=exchange, credentials=_pb_set(keys)
            ),
            pb.ValidateAndStoreResponse.FromString,
        )
        return r.credential

    def rotate(
        self,
        exchange: str,
        keys: Optional[KeySet] = None,
        overlap_seconds: Optional[int] = None,
        mint: bool = False,
    ) -> pb.RotateResponse:
        """Rotates to ``keys``, or with ``mint=True`` (and no keys) lets the
        broker mint the next key at the exchange with the tenant's
        management key and delete the old one after the overlap."""
        if (keys is None) != mint:
            raise ValueError("pass the new keys, or mint=True without keys")
        req = pb.RotateRequest(tenant_id=self.config.tenant, exchange=exchange, mint=mint)
        if keys is not None:
            req.credentials.CopyFrom(_pb_set(keys))
        if overlap_seconds is not None:
            req.overlap_seconds = overlap_seconds
        return self._unary("Rotate", req, pb.RotateResponse.FromString)

    def set_management_key(
        self,
        exchange: str,
        keys: KeySet,
        sub_account: str,
        rotate_every_days: int = 0,
        overlap_seconds: Optional[int] = None,
    ) -> pb.SetManagementKeyResponse:
        """Stores the master account's key that manages ``sub_account``'s
        keys (admin); with ``rotate_every_days`` the broker rotates at the
        exchange by itself."""
        req = pb.SetManagementKeyRequest(
            tenant_id=self.config.tenant,
            exchange=exchange,
            credentials=_pb_set(keys),
            sub_account=sub_account,
            rotate_every_days=rotate_every_days,
        )
        if overlap_seconds is not None:
            req.overlap_seconds = overlap_seconds
        return self._unary("SetManagementKey", req, pb.SetManagementKeyResponse.FromString)

    def describe(self, exchange: str) -> pb.CredentialMetadata:
        return self._unary(
            "DescribeCredential",
            pb.DescribeCredentialRequest(tenant_id=self.config.tenant, exchange=exchange),
            pb.CredentialMetadata.FromString,
        )


def _pb_set(keys: KeySet) -> pb.CredentialSet:
    s = pb.CredentialSet(api_key=keys.api_key, api_secret=keys.api_secret)
    if keys.passphrase is not None:
        s.passphrase = keys.passphrase
    return s


class Stream:
    """A WatchRotations call: iterate it for messages; ``cancel`` ends it from
    any thread."""

    def __init__(self, call: Iterable[pb.WatchRotationsResponse]) -> None:
        self._call = call

    def __iter__(self) -> Iterator[pb.WatchRotationsResponse]:
        return iter(self._call)

    def cancel(self) -> None:
        cancel = getattr(self._call, "cancel", None)
        if cancel is not None:
            cancel()


def connect(
    config: BrokerConfig, token: Optional[TokenFile] = None, target: Optional[str] = None
) -> Broker:
    """A connection to ``target`` (default: a random one of the config's)."""
    return Broker(
        config, target or random.choice(list(config.targets)), token or TokenFile(config.token_file)
    )
