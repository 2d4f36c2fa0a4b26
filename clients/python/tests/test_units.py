"""Pieces without a broker: redaction, the token file, never-older."""

from __future__ import annotations

import os
import time
from typing import List

import pytest

from credbroker import BrokerConfig, Credentials, CredentialHandle, KeySet, TokenFile
from credbroker.connection import Broker


def test_repr_never_shows_a_secret() -> None:
    k = KeySet("abcdefghijklmnop1234", "s3cr3t-value-xyz", "pass-phrase")
    c = Credentials("okx", 3, k, previous=k, previous_version=2)
    for text in (repr(k), str(k), repr(c), str(c), f"{c}"):
        assert "s3cr3t" not in text and "pass-phrase" not in text
        assert "abcdefghijklmnop" not in text
    assert "****1234" in repr(k)


def test_token_file_is_reread_when_it_changes(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "token")
    with open(path, "w") as f:
        f.write("one\n")
    t = TokenFile(path)
    assert t.metadata() == (("authorization", "Bearer one"),)
    time.sleep(0.01)
    with open(path, "w") as f:
        f.write("two-longer\n")
    assert t.metadata() == (("authorization", "Bearer two-longer"),)
    os.remove(path)
    assert t.metadata() == (("authorization", "Bearer two-longer"),), "last good token kept"
    assert "two" not in repr(t)


class ReplicaBehind(Broker):
    """A replica that has not seen the event yet serves the older version
    twice, then the announced one."""

    def __init__(self) -> None:
        self.answers: List[int] = [1, 1, 2]
        self.asked: List[int] = []
        self.target = "test"

    def get_credentials(self, exchange: str, min_version: int = 0) -> Credentials:
        self.asked.append(min_version)
        v = self.answers.pop(0)
        return Credentials(exchange, v, KeySet(f"key-version-{v}-xxxx", f"secret{v}"))

    def acknowledge(self, exchange: str, version: int) -> None:
        pass


def test_never_accepts_an_older_version_than_announced() -> None:
    cfg = BrokerConfig(targets=["x:1"], tenant="t", ca="-", cert="-", key="-")
    h = CredentialHandle(cfg, ["binance"])
    seen: List[int] = []
    h.on_swap(lambda ex, old, new: seen.append(new.version if new else 0))
    replica = ReplicaBehind()
    h._fetch(replica, "binance", 2)
    assert replica.asked == [2, 2, 2], "every fetch names the announced version"
    assert seen == [2], "the older answers were dropped, not adopted"
    assert h.get("binance").version == 2


def test_config_needs_targets_and_tenant() -> None:
    with pytest.raises(ValueError, match="target"):
        BrokerConfig(targets=[], tenant="t", ca="a", cert="b", key="c")
    with pytest.raises(ValueError, match="tenant"):
        BrokerConfig(targets=["a:1"], tenant="", ca="a", cert="b", key="c")
