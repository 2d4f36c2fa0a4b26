"""Importers for the keys traders already have: freqtrade's config.json
(with its ``add_config_files`` chain) and hummingbot's encrypted connector
files. Each yields ``Found`` records; ``credbroker-import`` (``python -m
credbroker.importers``) shows them (dry run, secrets masked) or stores them
through ValidateAndStore, so every key is validated like a new one."""

from __future__ import annotations

import dataclasses

from credbroker.credentials import KeySet, mask

#: The broker's exchanges.
EXCHANGES = ("binance", "bybit", "okx", "coinbase", "kraken", "kucoin")


class ImportError_(ValueError):
    """A file that cannot be imported; the message names the file and the
    problem, never a secret."""


@dataclasses.dataclass(frozen=True)
class Found:
    """One key found in a file."""

    source: str
    exchange: str
    keys: KeySet

    def __str__(self) -> str:
        extra = " + passphrase" if self.keys.passphrase else ""
        return f"{self.source}: {self.exchange} key {mask(self.keys.api_key)}{extra}"
