"""Real ccxt (sync and async_support) signing against the broker's exchange
simulators, bound to a handle: accepted before and after a rotation, the
first request after the swap signed with the new key, and nothing refused
once the exchange deletes the old key."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from typing import Any, Dict, List, Tuple

import ccxt
import ccxt.async_support as ccxt_async
import pytest

from credbroker import CredentialHandle, KeySet
from credbroker.ccxt import bind
from conftest import Dev, fresh_keys
from test_handle import rotate, store

PASSPHRASE = {"okx": True, "kucoin": True}


def point_at(ex: Any, base: str) -> None:
    """Every REST URL of a ccxt exchange → the simulator."""

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, str):
            return re.sub(r"^https?://[^/]+", base, v)
        return v

    ex.urls["api"] = walk(ex.urls["api"])


# Private calls each exchange documents, through ccxt's own request
# builder and signer (the implicit API; unified methods would first load
# the markets, which the simulators do not serve).
def balance(ex: Any) -> Any:
    name = ex.id
    if name == "binance":
        return ex.private_get_account()
    if name == "bybit":
        return ex.private_get_v5_account_wallet_balance({"accountType": "UNIFIED"})
    if name == "okx":
        return ex.private_get_account_balance()
    return ex.private_get_accounts()


# Each exchange's documented order request: (ccxt implicit method, params,
# the client order id's field).
ORDERS: Dict[str, Tuple[str, Dict[str, str], str]] = {
    "binance": (
        "private_post_order",
        {"symbol": "BTCUSDT", "side": "BUY", "type": "LIMIT", "timeInForce": "GTC"}
        | {"quantity": "0.001", "price": "10000"},
        "newClientOrderId",
    ),
    "bybit": (
        "private_post_v5_order_create",
        {"category": "spot", "symbol": "BTCUSDT", "side": "Buy", "orderType": "Limit"}
        | {"qty": "0.001", "price": "10000"},
        "orderLinkId",
    ),
    "okx": (
        "private_post_trade_order",
        {"instId": "BTC-USDT", "tdMode": "cash", "side": "buy", "ordType": "limit"}
        | {"sz": "0.001", "px": "10000"},
        "clOrdId",
    ),
    "kucoin": (
        "private_post_orders",
        {"side": "buy", "symbol": "BTC-USDT", "type": "limit", "price": "10000", "size": "0.001"},
        "clientOid",
    ),
}


def order(ex: Any) -> Any:
    method, params, id_field = ORDERS[ex.id]
    return getattr(ex, method)({**params, id_field: uuid.uuid4().hex[:16]})


def accepted(name: str, answer: Any) -> bool:
    """The exchange's own success marker (Bybit answers errors with 200)."""
    if name == "bybit":
        return bool(answer.get("retCode") == 0)
    if name == "okx":
        return bool(answer.get("code") == "0")
    if name == "kucoin":
        return bool(answer.get("code") == "200000")
    return "orderId" in answer or "balances" in answer


def keys_for(name: str) -> KeySet:
    return fresh_keys(name, "pass-" + uuid.uuid4().hex[:6] if name in PASSPHRASE else None)


@pytest.mark.parametrize("name", ["binance", "bybit", "okx", "kucoin"])
def test_sync_ccxt_signs_with_the_current_key_across_a_rotation(
    dev: Dev, tenant: str, name: str
) -> None:
    k1, k2 = keys_for(name), keys_for(name)
    store(dev, tenant, name, k1)
    with CredentialHandle(dev.config(tenant), [name]) as h:
        h.wait_ready(20)
        ex = getattr(ccxt, name)({"enableRateLimit": False})
        point_at(ex, dev.sims[name])
        binding = bind(ex, h)
        assert accepted(name, balance(ex)) and accepted(name, order(ex))
        assert ex.apiKey == k1.api_key

        rotate(dev, tenant, name, k2, overlap=3600)
        h.wait_for_version(2, timeout=20)
        # The exchange deletes the old key now: the first request after the
        # swap must already be signed with the new one.
        dev.sim_delete(name, k1.api_key)
        assert accepted(name, order(ex)) and accepted(name, balance(ex))
        assert ex.apiKey == k2.api_key and binding.applied_version == 2

        # Without the binding ccxt would still hold k2 (now unbound) but a
        # refused key is refused: prove the simulator really checks.
        binding.unbind()
        ex.apiKey, ex.secret = k1.api_key, k1.api_secret
        # (ccxt reports Binance's -2015 after an earlier success as
        # DDoSProtection, the others as AuthenticationError.)
        with pytest.raises((ccxt.AuthenticationError, ccxt.DDoSProtection)):
            balance(ex)


@pytest.mark.parametrize("name", ["binance", "okx"])
def test_async_ccxt_follows_rotations_on_its_loop(dev: Dev, tenant: str, name: str) -> None:
    from credbroker import AsyncCredentialHandle

    k1, k2 = keys_for(name), keys_for(name)
    store(dev, tenant, name, k1)

    async def main() -> None:
        async with AsyncCredentialHandle(dev.config(tenant), [name]) as h:
            ex = getattr(ccxt_async, name)({"enableRateLimit": False})
            try:
                point_at(ex, dev.sims[name])
                bind(ex, h)
                assert accepted(name, await balance(ex))
                await asyncio.to_thread(rotate, dev, tenant, name, k2, 3600)
                await h.wait_for_version(2, timeout=20)
                await asyncio.to_thread(dev.sim_delete, name, k1.api_key)
                assert accepted(name, await order(ex))
                assert ex.apiKey == k2.api_key
            finally:
                await ex.close()

    asyncio.run(main())


def test_a_trading_loop_is_never_refused_through_a_rotation(dev: Dev, tenant: str) -> None:
    """Requests run back to back in a thread while the key rotates and the
    exchange then deletes the old key: every one is accepted."""
    name = "bybit"
    k1, k2 = keys_for(name), keys_for(name)
    store(dev, tenant, name, k1)
    with CredentialHandle(dev.config(tenant), [name]) as h:
        h.wait_ready(20)
        ex = ccxt.bybit({"enableRateLimit": False})
        point_at(ex, dev.sims[name])
        bind(ex, h)
        stop = threading.Event()
        results: List[bool] = []
        errors: List[str] = []
        signed_with: List[str] = []

        def loop() -> None:
            while not stop.is_set():
                try:
                    results.append(accepted(name, order(ex)))
                    signed_with.append(ex.apiKey)
                except Exception as e:  # noqa: BLE001 - counted, reported
                    errors.append(type(e).__name__)

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(0.5)
        rotate(dev, tenant, name, k2, overlap=3600)
        h.wait_for_version(2, timeout=20)
        # The overlap ends at the exchange: in-flight requests signed just
        # before the swap have had far more than their round trip.
        time.sleep(0.3)
        dev.sim_delete(name, k1.api_key)
        time.sleep(0.7)
        stop.set()
        t.join(10)
        assert not errors, errors
        assert results and all(results)
        assert signed_with[0] == k1.api_key and signed_with[-1] == k2.api_key
