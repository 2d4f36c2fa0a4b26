"""freqtrade's configuration: ``exchange.name``, ``exchange.key``,
``exchange.secret`` and ``exchange.password``, read the way freqtrade reads
it: JSON with comments and trailing commas allowed, ``add_config_files``
loaded first (paths relative to the file naming them), the naming file
overriding what they set (a deep merge), loops refused."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Set

from credbroker.credentials import KeySet
from credbroker.importers import EXCHANGES, Found, ImportError_

#: freqtrade exchange names (ccxt ids) → the broker's.
NAMES = {
    "binance": "binance",
    "binanceusdm": "binance",
    "bybit": "bybit",
    "okx": "okx",
    "kucoin": "kucoin",
    "kraken": "kraken",
    "coinbase": "coinbase",
    "coinbaseadvanced": "coinbase",
}


def strip_json5ish(text: str) -> str:
    """Removes ``//`` and ``/* */`` comments and trailing commas outside
    strings (what freqtrade's rapidjson parse mode allows)."""
    out: List[str] = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
        elif c == '"':
            in_str = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == ",":
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j < n and text[j] in "]}":
                i += 1  # a trailing comma
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _deep_merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load(path: str, _seen: Optional[Set[str]] = None) -> Dict[str, Any]:
    """The configuration ``path`` resolves to, its add_config_files merged."""
    real = os.path.realpath(path)
    seen = set() if _seen is None else _seen
    if real in seen:
        raise ImportError_(f"{path}: add_config_files loops back to this file")
    seen.add(real)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ImportError_(f"{path}: cannot read ({e.strerror})") from None
    try:
        config = json.loads(strip_json5ish(text))
    except json.JSONDecodeError as e:
        raise ImportError_(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(config, dict):
        raise ImportError_(f"{path}: the configuration must be a JSON object")
    base: Dict[str, Any] = {}
    files = config.get("add_config_files", [])
    if not isinstance(files, list):
        raise ImportError_(f"{path}: add_config_files must be a list of paths")
    for extra in files:
        full = extra if os.path.isabs(extra) else os.path.join(os.path.dirname(path), extra)
        base = _deep_merge(base, load(full, seen))
    return _deep_merge(base, {k: v for k, v in config.items() if k != "add_config_files"})


def read(path: str) -> Found:
    """The exchange key a freqtrade configuration holds."""
    config = load(path)
    ex = config.get("exchange")
    if not isinstance(ex, dict):
        raise ImportError_(f'{path}: no "exchange" section')
    name = str(ex.get("name", "")).lower()
    exchange = NAMES.get(name)
    if exchange is None or exchange not in EXCHANGES:
        raise ImportError_(
            f"{path}: exchange {name or '(missing)'!r} is not one the broker serves "
            f"({', '.join(EXCHANGES)})"
        )
    key, secret = ex.get("key") or "", ex.get("secret") or ""
    if not isinstance(key, str) or not isinstance(secret, str) or not key or not secret:
        raise ImportError_(
            f"{path}: exchange.key and exchange.secret must both be set "
            "(freqtrade may also read them from FREQTRADE__EXCHANGE__KEY/SECRET: "
            "put them in the file for the import)"
        )
    password = ex.get("password") or None
    if password is not None and not isinstance(password, str):
        raise ImportError_(f"{path}: exchange.password must be a string")
    return Found(source=path, exchange=exchange, keys=KeySet(key, secret, password))
