"""The asyncio face of the handle: the same engine (one thread per handle
doing the gRPC work), with awaitable readiness, coroutine callbacks on the
event loop, and an async iterator of swaps. ``get()`` stays a plain call: it
reads memory and never blocks the loop."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence, Tuple, Union

from credbroker.connection import BrokerConfig
from credbroker.credentials import Credentials
from credbroker.handle import CredentialHandle

Swap = Tuple[str, Optional[Credentials], Optional[Credentials]]
AsyncSwapCallback = Callable[
    [str, Optional[Credentials], Optional[Credentials]], Union[Awaitable[None], None]
]


class AsyncCredentialHandle:
    """``async with AsyncCredentialHandle(config, ["okx"]) as h:`` waits for
    the first set; ``h.get("okx")`` is the set to sign with now."""

    def __init__(
        self, config: BrokerConfig, exchanges: Sequence[str] = (), **options: float
    ) -> None:
        self.handle = CredentialHandle(config, exchanges, **options)  # type: ignore[arg-type]
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def __repr__(self) -> str:
        return f"Async{self.handle!r}"

    async def start(self, ready_timeout: Optional[float] = 30.0) -> AsyncCredentialHandle:
        self._loop = asyncio.get_running_loop()
        self.handle.start()
        if ready_timeout is not None:
            await asyncio.to_thread(self.handle.wait_ready, ready_timeout)
        return self

    async def close(self) -> None:
        await asyncio.to_thread(self.handle.close)

    async def __aenter__(self) -> AsyncCredentialHandle:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def get(self, exchange: Optional[str] = None) -> Credentials:
        return self.handle.get(exchange)

    def version(self, exchange: Optional[str] = None) -> int:
        return self.handle.version(exchange)

    async def wait_for_version(
        self, version: int, exchange: Optional[str] = None, timeout: Optional[float] = None
    ) -> Credentials:
        return await asyncio.to_thread(self.handle.wait_for_version, version, exchange, timeout)

    def on_swap(self, callback: AsyncSwapCallback) -> None:
        """Runs ``callback(exchange, old, new)`` on this event loop after
        every swap; a coroutine function is scheduled as a task."""
        loop = self._loop or asyncio.get_running_loop()

        def deliver(name: str, old: Optional[Credentials], new: Optional[Credentials]) -> None:
            def run() -> None:
                out = callback(name, old, new)
                if asyncio.iscoroutine(out):
                    loop.create_task(out)

            loop.call_soon_threadsafe(run)

        self.handle.on_swap(deliver)

    def swaps(self) -> AsyncIterator[Swap]:
        """Every swap from this call on, in order (``async for``)."""
        return _Swaps(self)


class _Swaps:
    """Registered when created, so no swap between the call and the first
    ``__anext__`` is missed."""

    def __init__(self, handle: AsyncCredentialHandle) -> None:
        self._queue: asyncio.Queue[Swap] = asyncio.Queue()
        handle.on_swap(lambda name, old, new: self._queue.put_nowait((name, old, new)))

    def __aiter__(self) -> _Swaps:
        return self

    async def __anext__(self) -> Swap:
        return await self._queue.get()
