"""Bind a ccxt exchange to a credential handle: its ``apiKey``, ``secret``
and ``password`` follow every rotation, in place, without a restart.

Where the swap happens: ccxt reads the credentials in ``sign()``, which
builds one request's headers and signature in one synchronous call (in the
async and pro classes too: ``sign`` is never a coroutine). The binding wraps
``sign`` so that, under a lock, it first installs the handle's current set
(when its version changed) and then signs. So

- no request is ever signed half with the old key and half with the new
  one (the key, secret and passphrase are replaced together, between two
  signings);
- the first request signed after the handle swapped uses the new key;
- a request already signed keeps the key it was signed with (the old key
  stays valid at the exchange until the overlap ends, so it is accepted).

ccxt pro's WebSocket logins read the attributes directly: for an async
exchange the binding also installs each new set on the exchange's event loop
(between two steps of any coroutine, so a login never sees half a set).
Streams already authenticated stay on the key they logged in with until
they reconnect; the overlap covers them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Dict, Optional

from credbroker.credentials import Credentials
from credbroker.handle import CredentialHandle

#: ccxt exchange ids → the broker's exchange names.
EXCHANGES: Dict[str, str] = {
    "binance": "binance",
    "binanceusdm": "binance",
    "binancecoinm": "binance",
    "bybit": "bybit",
    "okx": "okx",
    "kucoin": "kucoin",
    "kucoinfutures": "kucoin",
    "kraken": "kraken",
    "krakenfutures": "kraken",
    "coinbase": "coinbase",
    "coinbaseadvanced": "coinbase",
    "coinbaseinternational": "coinbase",
}


class Binding:
    """The link between one ccxt exchange object and a handle; ``unbind()``
    restores the exchange's own ``sign``."""

    def __init__(
        self,
        exchange: Any,
        handle: CredentialHandle,
        name: str,
        loop: Optional[asyncio.AbstractEventLoop],
    ) -> None:
        self.exchange, self.handle, self.name, self._loop = exchange, handle, name, loop
        self._lock = threading.RLock()
        self._applied: Optional[Credentials] = None
        self._original: Callable[..., Any] = exchange.sign
        self._bound = True

        def sign(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if self._bound:
                    self._install(self.handle.get(self.name))
                return self._original(*args, **kwargs)

        exchange.sign = sign
        self._install(handle.get(name))
        handle.on_swap(self._on_swap)

    @property
    def applied_version(self) -> int:
        """The version the exchange object holds now."""
        return self._applied.version if self._applied else 0

    def __repr__(self) -> str:
        return f"Binding({self.exchange.id!r} → {self.name}, version {self.applied_version})"

    def _install(self, creds: Credentials) -> None:
        if self._applied is creds:
            return
        with self._lock:
            ex, cur = self.exchange, creds.current
            ex.apiKey = cur.api_key
            ex.secret = cur.api_secret
            ex.password = cur.passphrase or ""
            self._applied = creds

    def _on_swap(self, name: str, _old: Optional[Credentials], new: Optional[Credentials]) -> None:
        if name != self.name or new is None or not self._bound:
            return
        if self._loop is not None:
            # Async exchanges (and pro's logins) run on their loop: install
            # there, between two coroutine steps.
            self._loop.call_soon_threadsafe(self._install, new)
        else:
            self._install(new)

    def unbind(self) -> None:
        with self._lock:
            self._bound = False
            self.exchange.sign = self._original


def bind(
    exchange: Any,
    handle: Any,
    exchange_name: Optional[str] = None,
    loop: Optional[asyncio.AbstractEventLoop] = None,
) -> Binding:
    """Makes ``exchange`` (a ccxt, ccxt.async_support or ccxt.pro object)
    sign with ``handle``'s current set for its exchange. ``handle`` is a
    ``CredentialHandle`` or an ``AsyncCredentialHandle``; it must already
    hold a set. For an async exchange, call this from its event loop (or
    pass ``loop``)."""
    inner: CredentialHandle = getattr(handle, "handle", handle)
    name = exchange_name or EXCHANGES.get(exchange.id)
    if name is None:
        raise ValueError(
            f"ccxt exchange {exchange.id!r} has no credbroker exchange; pass exchange_name="
        )
    if loop is None and asyncio.iscoroutinefunction(getattr(exchange, "fetch", None)):
        loop = asyncio.get_running_loop()
    return Binding(exchange, inner, name, loop)
