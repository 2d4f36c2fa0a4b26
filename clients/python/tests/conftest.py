"""A real `credbroker dev` (the binary, simulated exchanges) for the tests."""

from __future__ import annotations

import uuid
from typing import Iterator, Optional

import pytest

from credbroker import KeySet
from credbroker.testing import Dev, start_dev, stop

__all__ = ["Dev", "start_dev", "stop", "fresh_keys"]


@pytest.fixture(scope="session")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    d = start_dev(str(tmp_path_factory.mktemp("dev")))
    yield d
    stop(d.proc)


@pytest.fixture
def tenant() -> str:
    return str(uuid.uuid4())


_seq = [0]


def fresh_keys(exchange: str, passphrase: Optional[str] = None) -> KeySet:
    """A made-up key pair, unique per call (long enough for every format)."""
    _seq[0] += 1
    tag = f"{uuid.uuid4().hex[:12]}{_seq[0]:04d}"
    return KeySet(f"{exchange}Key{tag}", f"{exchange}Secret{tag}", passphrase)
