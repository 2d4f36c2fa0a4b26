"""What a pod holds: credential sets whose repr never shows a secret."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional


def mask(api_key: str) -> str:
    """The API key with all but its last four characters masked (the
    broker's ``api_key_hint``)."""
    return "****" + api_key[-4:] if len(api_key) >= 12 else "****"


@dataclasses.dataclass(frozen=True)
class KeySet:
    """One exchange key: what signs requests. ``repr`` masks the key and
    hides the secret and the passphrase."""

    api_key: str
    api_secret: str
    passphrase: Optional[str] = None

    def __repr__(self) -> str:
        return (
            f"KeySet(api_key={mask(self.api_key)!r}, api_secret=<redacted>, "
            f"passphrase={'<redacted>' if self.passphrase else None})"
        )

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class Credentials:
    """The set a pod signs with for one exchange, as the broker served it.

    ``current`` signs new requests. ``previous`` is the set the last
    rotation replaced, present only while its overlap is open (until
    ``previous_valid_until``). ``stale`` is True when the broker answered
    from its cache because Vault was unreachable.
    """

    exchange: str
    version: int
    current: KeySet
    previous: Optional[KeySet] = None
    previous_version: Optional[int] = None
    previous_valid_until: Optional[datetime.datetime] = None
    stale: bool = False

    def without_previous(self) -> Credentials:
        """This set once its overlap has ended."""
        return dataclasses.replace(
            self, previous=None, previous_version=None, previous_valid_until=None
        )
