"""The credential handle: a pod's current keys, kept current by a thread
that watches WatchRotations.

Guarantees (the same as the Rust handle's):

- ``get()`` returns the set to sign with now, from memory; it never blocks
  on the network.
- A set is only ever replaced by a newer version: after an event announces
  version N, the handle fetches with ``min_version=N`` and retries with
  backoff until a replica serves N or newer; an older answer is dropped.
- While the broker is unreachable the last good set stays in use; the
  stream resumes with ``after_seq`` on any of the configured replicas
  (jittered backoff), so no event is missed.
- Each adopted version is acknowledged (AcknowledgeVersion) so operators see
  who still signs with the previous key.
- Callbacks run on the handle's thread after each swap, in order.
- No secret reaches a log line, an exception or a ``repr``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

import grpc

from credbroker.connection import (
    Broker,
    BrokerConfig,
    Stream,
    TokenFile,
    connect,
    credentials as credentials_of,
)
from credbroker.credentials import Credentials
from credbroker.v1 import credbroker_pb2 as pb

log = logging.getLogger("credbroker")

#: ``callback(exchange, old, new)``: ``old`` is None on the first set,
#: ``new`` is None when the credential was deleted.
SwapCallback = Callable[[str, Optional[Credentials], Optional[Credentials]], None]


class NoCredentials(LookupError):
    """The handle holds no set for this exchange (not fetched yet, or
    deleted at the broker)."""


class Backoff:
    """Exponential backoff with full jitter."""

    def __init__(self, base: float, cap: float) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(delay / 4, delay)

    def reset(self) -> None:
        self.attempt = 0


class _Resync(Exception):
    """The stream must be reopened from full state (after_seq = 0)."""


class CredentialHandle:
    """Holds a tenant's credentials for ``exchanges`` (empty: all of the
    tenant's) and swaps them on every rotation.

    >>> handle = CredentialHandle(config, ["binance"]).start()
    >>> handle.wait_ready(10)
    >>> creds = handle.get("binance")   # sign with creds.current
    """

    def __init__(
        self,
        config: BrokerConfig,
        exchanges: Sequence[str] = (),
        *,
        acknowledge: bool = True,
        ack_jitter: float = 5.0,
        stream_idle_timeout: float = 20.0,
        reconnect_cap: float = 30.0,
        include_credentials: bool = True,
    ) -> None:
        self.config = config
        # Sets arrive on the stream itself (as Envoy SDS pushes secrets):
        # a rotation costs no GetCredentials round trip. A message without
        # its set (or a broker older than the field) means a fetch.
        self._include_credentials = include_credentials
        self.exchanges = [e.lower() for e in exchanges]
        self._acknowledge = acknowledge
        self._ack_jitter = ack_jitter
        self._idle_timeout = stream_idle_timeout
        self._token = TokenFile(config.token_file)
        self._held: Dict[str, Credentials] = {}
        self._lock = threading.Condition()
        self._callbacks: List[SwapCallback] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stream: Optional[Stream] = None
        self._broker: Optional[Broker] = None
        self._last_message = time.monotonic()
        self._reconnect = Backoff(0.2, reconnect_cap)
        self._targets = list(config.targets)
        self._next_target = random.randrange(len(self._targets))
        self.last_seq = 0
        #: The replica whose stream is live (None while reconnecting).
        self.connected_to: Optional[str] = None
        #: The last failure, as a safe message (never a secret).
        self.last_error: Optional[str] = None
        self._ready_exchanges: set[str] = set()
        self._state_seen = False

    def __repr__(self) -> str:
        with self._lock:
            versions = {e: c.version for e, c in self._held.items()}
        return f"CredentialHandle(tenant={self.config.tenant!r}, versions={versions!r})"

    def __enter__(self) -> CredentialHandle:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- what a pod calls ---------------------------------------------------

    def start(self) -> CredentialHandle:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="credbroker-handle", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def on_swap(self, callback: SwapCallback) -> None:
        """Calls ``callback(exchange, old, new)`` after every swap, on the
        handle's thread (keep it short; hand work to your own thread)."""
        with self._lock:
            self._callbacks.append(callback)

    def get(self, exchange: Optional[str] = None) -> Credentials:
        """The set to sign with now. ``exchange`` may be omitted when the
        handle watches exactly one."""
        name = self._name(exchange)
        with self._lock:
            held = self._held.get(name)
        if held is None:
            raise NoCredentials(
                f"no credentials held for {name} of tenant {self.config.tenant} "
                f"(last error: {self.last_error or 'none'})"
            )
        return held

    def version(self, exchange: Optional[str] = None) -> int:
        """The held version (0: none)."""
        with self._lock:
            held = self._held.get(self._name(exchange))
        return held.version if held else 0

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Blocks until the handle holds a set for each watched exchange (or,
        watching all, until the broker's initial state is applied)."""
        if not self.wait_for(lambda: self._ready(), timeout):
            raise TimeoutError(
                f"no credentials within {timeout} s (last error: {self.last_error or 'none'})"
            )

    def wait_for_version(
        self, version: int, exchange: Optional[str] = None, timeout: Optional[float] = None
    ) -> Credentials:
        """Blocks until the held set is at least ``version``."""
        name = self._name(exchange)
        if not self.wait_for(lambda: self._version_of(name) >= version, timeout):
            raise TimeoutError(f"{name} did not reach version {version} within {timeout} s")
        return self.get(name)

    def wait_for(self, predicate: Callable[[], bool], timeout: Optional[float]) -> bool:
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    # -- the thread ---------------------------------------------------------

    def _name(self, exchange: Optional[str]) -> str:
        if exchange is not None:
            return exchange.lower()
        if len(self.exchanges) == 1:
            return self.exchanges[0]
        raise ValueError("name the exchange: this handle watches several")

    def _version_of(self, name: str) -> int:
        held = self._held.get(name)
        return held.version if held else 0

    def _ready(self) -> bool:
        if self.exchanges:
            return all(e in self._held or e in self._ready_exchanges for e in self.exchanges)
        return self._state_seen

    def _run(self) -> None:
        watchdog = threading.Thread(target=self._watch_idle, name="credbroker-idle", daemon=True)
        watchdog.start()
        while not self._stop.is_set():
            target = self._targets[self._next_target % len(self._targets)]
            broker: Optional[Broker] = None
            try:
                broker = connect(self.config, self._token, target)
                self._broker = broker
                self._follow(broker)
            except _Resync:
                self.last_seq = 0
                continue
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else None
                self.last_error = f"{target}: {code.name if code else 'error'}: {_details(e)}"
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    self.last_seq = 0
            except (OSError, ValueError) as e:  # certificate files, etc.
                self.last_error = f"{target}: {type(e).__name__}: {e}"
            finally:
                self.connected_to = None
                self._stream = None
                self._broker = None
                if broker is not None:
                    broker.close()
            if self._stop.is_set():
                break
            log.warning(
                "credbroker stream ended (%s); keeping the last good keys, resuming after seq %d",
                self.last_error,
                self.last_seq,
            )
            self._next_target += 1
            self._stop.wait(self._reconnect.next())

    def _watch_idle(self) -> None:
        """Cancels a stream that has been silent longer than the idle
        timeout (the broker sends heartbeats), so a dead replica is left."""
        while not self._stop.wait(min(5.0, self._idle_timeout / 4)):
            stream = self._stream
            if stream is not None and time.monotonic() - self._last_message > self._idle_timeout:
                self.last_error = f"no message for {self._idle_timeout:.0f} s"
                stream.cancel()

    def _follow(self, broker: Broker) -> None:
        after = self.last_seq
        stream = broker.watch(self.exchanges, after, self._include_credentials)
        self._last_message = time.monotonic()
        self._stream = stream
        if self._stop.is_set():
            stream.cancel()
        for msg in stream:
            self._last_message = time.monotonic()
            if self.connected_to is None:
                self.connected_to = broker.target
                self._reconnect.reset()
            kind = msg.WhichOneof("message")
            pushed = (
                credentials_of(msg.state.exchange or msg.event.exchange, msg.credentials)
                if msg.HasField("credentials")
                else None
            )
            if kind == "state":
                self._on_state(broker, msg.state, pushed)
            elif kind == "event":
                self._on_event(broker, msg.event, pushed)
            elif kind == "heartbeat":
                if after > msg.heartbeat.head_seq:
                    # We resumed from a number the log never reached (a
                    # restored database): start again from full state.
                    stream.cancel()
                    raise _Resync()
                self.last_seq = max(self.last_seq, msg.heartbeat.seq)
                with self._lock:
                    self._state_seen = True
                    self._lock.notify_all()

    def _on_state(
        self, broker: Broker, state: pb.CredentialMetadata, pushed: Optional[Credentials]
    ) -> None:
        name = state.exchange
        with self._lock:
            held = self._held.get(name)
        if held is None or held.version < state.version:
            self._fetch(broker, name, state.version, pushed)
        elif held.previous is not None and not state.HasField("previous_version"):
            self._adopt(name, held.without_previous())
        with self._lock:
            self._ready_exchanges.add(name)
            self._lock.notify_all()

    def _on_event(
        self, broker: Broker, event: pb.RotationEvent, pushed: Optional[Credentials]
    ) -> None:
        name = event.exchange
        if event.kind == pb.EVENT_KIND_DELETED:
            self._adopt(name, None)
        elif event.kind == pb.EVENT_KIND_PREVIOUS_EXPIRED:
            # Nothing new to fetch: the previous set stops being served.
            with self._lock:
                held = self._held.get(name)
            if held is not None and held.version >= event.version and held.previous is not None:
                self._adopt(name, held.without_previous())
            elif held is None or held.version < event.version:
                self._fetch(broker, name, event.version)
        else:
            self._fetch(broker, name, event.version, pushed)
        with self._lock:
            self.last_seq = max(self.last_seq, event.seq)
            self._lock.notify_all()

    def _fetch(
        self, broker: Broker, name: str, announced: int, pushed: Optional[Credentials] = None
    ) -> None:
        """Fetches until the broker serves ``announced`` or newer; a set the
        stream carried (``pushed``) is taken instead when it is new enough."""
        backoff = Backoff(0.05, 5.0)
        started = time.monotonic()
        warned = False
        while not self._stop.is_set():
            try:
                creds = pushed or broker.get_credentials(name, min_version=announced)
                pushed = None
            except grpc.RpcError as e:
                if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.NOT_FOUND:
                    self._adopt(name, None)
                    return
                raise
            if creds.version >= announced:
                with self._lock:
                    held = self._held.get(name)
                if (
                    held is None
                    or creds.version > held.version
                    or (creds.version == held.version and creds != held)
                ):
                    self._adopt(name, creds)
                return
            waited = time.monotonic() - started
            if waited > 5 and not warned:
                warned = True
                log.warning(
                    "still served version %d of %s %.0f s after version %d was announced; "
                    "keeping the last good set and retrying",
                    creds.version,
                    name,
                    waited,
                    announced,
                )
            self._stop.wait(backoff.next())

    def _adopt(self, name: str, creds: Optional[Credentials]) -> None:
        with self._lock:
            old = self._held.get(name)
            if creds is None:
                if old is None:
                    return
                del self._held[name]
            else:
                self._held[name] = creds
            callbacks = list(self._callbacks)
            self._lock.notify_all()
        if creds is not None and (old is None or old.version != creds.version):
            log.info("credbroker: %s now version %d", name, creds.version)
        for cb in callbacks:
            try:
                cb(name, old, creds)
            except Exception:  # a pod's callback must not stop the handle
                log.exception("credbroker: a swap callback failed")
        if (
            self._acknowledge
            and creds is not None
            and (old is None or old.version != creds.version)
        ):
            if self._ack_jitter > 0:
                # A fleet swaps within milliseconds; spreading its
                # acknowledgements keeps them off the swap's path (and the
                # broker's) without making operators wait noticeably.
                t = threading.Timer(
                    random.uniform(0, self._ack_jitter), self._ack, (name, creds.version)
                )
                t.daemon = True
                t.start()
            else:
                self._ack(name, creds.version)

    def _ack(self, name: str, version: int) -> None:
        """Best effort: a lost acknowledgement only delays what operators see."""
        broker = self._broker
        if broker is None or self._stop.is_set() or self.version(name) != version:
            return  # a newer version is acknowledged on its own
        try:
            broker.acknowledge(name, version)
        except grpc.RpcError as e:
            log.debug(
                "credbroker: acknowledging %s version %d failed: %s", name, version, _details(e)
            )


def _details(e: grpc.RpcError) -> str:
    if isinstance(e, grpc.Call):
        return str(e.details() or "")
    return type(e).__name__
