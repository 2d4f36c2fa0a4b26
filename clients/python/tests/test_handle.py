"""The handle against a real `credbroker dev`: first set, swap on rotation,
callbacks, acknowledgements, resume, failover between targets, outage."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import List, Optional, Tuple

import pytest

from credbroker import AsyncCredentialHandle, Credentials, CredentialHandle, KeySet, NoCredentials
from conftest import Dev, fresh_keys


def store(dev: Dev, tenant: str, exchange: str, keys: KeySet) -> None:
    dev.sim_key(exchange, keys)
    b = dev.operator(tenant)
    try:
        b.validate_and_store(exchange, keys)
    finally:
        b.close()


def rotate(
    dev: Dev, tenant: str, exchange: str, keys: KeySet, overlap: Optional[int] = None
) -> int:
    dev.sim_key(exchange, keys)
    b = dev.operator(tenant)
    try:
        return int(b.rotate(exchange, keys, overlap).credential.version)
    finally:
        b.close()


def test_holds_the_set_and_swaps_on_rotation(
    dev: Dev, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    k1, k2 = fresh_keys("bybit"), fresh_keys("bybit")
    store(dev, tenant, "bybit", k1)
    swaps: List[Tuple[str, Optional[int], Optional[int]]] = []
    with CredentialHandle(dev.config(tenant, instance="pod-a"), ["bybit"], ack_jitter=0.5) as h:
        h.on_swap(lambda ex, old, new: swaps.append((ex, old and old.version, new and new.version)))
        h.wait_ready(20)
        first = h.get()
        assert (first.version, first.current) == (1, k1)
        assert first.previous is None
        assert rotate(dev, tenant, "bybit", k2) == 2
        second = h.wait_for_version(2, timeout=20)
        assert second.current == k2
        assert second.previous == k1, "the overlap's previous set is held too"
        assert second.previous_valid_until is not None
        # Callbacks run on the handle's thread right after the swap.
        for _ in range(100):
            if len(swaps) == 2:
                break
            threading.Event().wait(0.05)
        assert swaps == [("bybit", None, 1), ("bybit", 1, 2)]
        # Operators see that this pod adopted version 2.
        b = dev.operator(tenant)
        try:
            for _ in range(100):
                meta = b.describe("bybit")
                if any(a.version == 2 and a.subscriber.endswith("#pod-a") for a in meta.adoption):
                    break
                threading.Event().wait(0.1)
            else:
                pytest.fail(f"no acknowledgement of version 2: {list(meta.adoption)}")
        finally:
            b.close()
        text = repr(h) + repr(second) + str(second) + caplog.text
        for secret in (k1.api_secret, k2.api_secret, k1.api_key, k2.api_key):
            assert secret not in text


def test_a_pod_certificate_reads_its_own_tenant(dev: Dev) -> None:
    keys = fresh_keys("binance")
    store(dev, dev.pod_tenant, "binance", keys)
    with CredentialHandle(dev.config(dev.pod_tenant, pod=True), ["binance"]) as h:
        h.wait_ready(20)
        assert h.get("binance").current == keys


def test_deleted_credentials_are_dropped(dev: Dev, tenant: str) -> None:
    store(dev, tenant, "okx", fresh_keys("okx", "pass-1"))
    with CredentialHandle(dev.config(tenant), ["okx"]) as h:
        h.wait_ready(20)
        assert h.get().current.passphrase == "pass-1"
        b = dev.operator(tenant)
        from credbroker.v1 import credbroker_pb2 as pb

        b._unary(  # no wrapper: pods never delete
            "DeleteCredentials",
            pb.DeleteCredentialsRequest(tenant_id=tenant, exchange="okx"),
            pb.DeleteCredentialsResponse.FromString,
        )
        b.close()
        assert h.wait_for(lambda: h.version("okx") == 0, 20)
        with pytest.raises(NoCredentials):
            h.get()


def test_resumes_after_seq_when_the_stream_drops(dev: Dev, tenant: str) -> None:
    k = [fresh_keys("kucoin", "pp") for _ in range(3)]
    store(dev, tenant, "kucoin", k[0])
    with CredentialHandle(dev.config(tenant), ["kucoin"]) as h:
        h.wait_ready(20)
        rotate(dev, tenant, "kucoin", k[1])
        h.wait_for_version(2, timeout=20)
        assert h.wait_for(lambda: h.last_seq > 0, 10)
        seq = h.last_seq
        # Drop the stream; rotate while it is down; the handle must resume
        # after its seq and swap.
        stream = h._stream
        assert stream is not None
        stream.cancel()
        rotate(dev, tenant, "kucoin", k[2])
        got = h.wait_for_version(3, timeout=30)
        assert got.current == k[2]
        assert h.wait_for(lambda: h.last_seq > seq, 10), "the rotation's event was replayed"


def test_starts_at_any_target_and_skips_a_dead_one(dev: Dev, tenant: str) -> None:
    keys = fresh_keys("binance")
    store(dev, tenant, "binance", keys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nobody listens once closed
    cfg = dev.config(tenant)
    import dataclasses

    cfg = dataclasses.replace(cfg, targets=[dead, cfg.targets[0]], connect_timeout=2.0)
    for _ in range(3):  # whichever target it starts at
        with CredentialHandle(cfg, ["binance"]) as h:
            h.wait_ready(30)
            assert h.get().current == keys
            assert h.connected_to == cfg.targets[1]


def test_asyncio_handle_delivers_swaps_on_the_loop(dev: Dev, tenant: str) -> None:
    k1, k2 = fresh_keys("binance"), fresh_keys("binance")
    store(dev, tenant, "binance", k1)

    async def main() -> Tuple[Credentials, List[int]]:
        seen: List[int] = []
        async with AsyncCredentialHandle(dev.config(tenant), ["binance"]) as h:
            assert h.get().current == k1
            loop = asyncio.get_running_loop()

            async def on_swap(
                ex: str, old: Optional[Credentials], new: Optional[Credentials]
            ) -> None:
                assert asyncio.get_running_loop() is loop
                seen.append(new.version if new else 0)

            h.on_swap(on_swap)
            swaps = h.swaps()
            await asyncio.to_thread(rotate, dev, tenant, "binance", k2)
            name, old, new = await asyncio.wait_for(swaps.__anext__(), 20)
            assert name == "binance" and old is not None and old.version == 1
            assert new is not None
            await asyncio.sleep(0.05)
            return new, seen

    new, seen = asyncio.run(main())
    assert new.current == k2 and new.version == 2
    assert seen == [2]


def test_keeps_the_last_good_set_while_the_broker_is_down(tmp_path: object) -> None:
    from conftest import start_dev, stop

    d = start_dev(str(tmp_path))
    try:
        tenant = d.pod_tenant
        keys = fresh_keys("bybit")
        store(d, tenant, "bybit", keys)
        h = CredentialHandle(d.config(tenant), ["bybit"], stream_idle_timeout=4).start()
        h.wait_ready(20)
        stop(d.proc)
        assert h.wait_for(lambda: h.connected_to is None, 20)
        assert h.get().current == keys, "the last good set stays in use"
        assert h.last_error
        for secret in (keys.api_secret, keys.api_key):
            assert secret not in h.last_error
        h.close()
    finally:
        stop(d.proc)


def test_a_rotation_minted_at_the_exchange_reaches_the_pod(dev: Dev, tenant: str) -> None:
    """dev mode's Bybit demo: the demo key belongs to a sub-account the demo
    management key manages; the broker mints the next key and the handle
    swaps to it."""
    demo = KeySet("demoBybitKey0001", "demoBybitSecret0001")
    b = dev.operator(tenant)
    try:
        b.validate_and_store("bybit", demo)
        with pytest.raises(ValueError):
            b.rotate("bybit", demo, mint=True)
        with CredentialHandle(dev.config(tenant), ["bybit"]) as h:
            h.wait_ready(20)
            stored = b.set_management_key(
                "bybit", KeySet("demoBybitMaster0001", "demoBybitMasterSecret0001"), "100200300"
            )
            assert stored.api_key_hint == "****0001"
            r = b.rotate("bybit", mint=True, overlap_seconds=3600)
            assert r.key_rotation.step == "waiting", r.key_rotation
            got = h.wait_for_version(2, timeout=20)
            assert got.current.api_key != demo.api_key
            assert got.previous == demo, "the old key is served until the overlap ends"
            assert got.current.api_secret not in repr(got)
    finally:
        b.close()


@pytest.mark.parametrize("include_credentials", [True, False])
def test_takes_sets_from_the_stream_without_a_fetch(
    dev: Dev, tenant: str, monkeypatch: pytest.MonkeyPatch, include_credentials: bool
) -> None:
    import credbroker.connection as connection

    fetched: List[Tuple[str, int]] = []
    real = connection.Broker.get_credentials

    def counting(self: connection.Broker, exchange: str, min_version: int = 0) -> Credentials:
        fetched.append((exchange, min_version))
        return real(self, exchange, min_version)

    monkeypatch.setattr(connection.Broker, "get_credentials", counting)
    k1, k2 = fresh_keys("bybit"), fresh_keys("bybit")
    store(dev, tenant, "bybit", k1)
    with CredentialHandle(
        dev.config(tenant), ["bybit"], include_credentials=include_credentials
    ) as h:
        h.wait_ready(20)
        assert h.get().current == k1
        assert rotate(dev, tenant, "bybit", k2) == 2
        second = h.wait_for_version(2, timeout=20)
        assert (second.current, second.previous) == (k2, k1)
    if include_credentials:
        assert fetched == [], "both sets came on the stream"
    else:
        assert fetched == [("bybit", 1), ("bybit", 2)]
