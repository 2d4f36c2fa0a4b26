"""hummingbot's connector files (``conf/connectors/<connector>.yml``): each
secure field holds the hex of an Ethereum v3 keyfile JSON (AES-128-CTR,
PBKDF2-SHA256 or scrypt, Keccak MAC) encrypted with the operator's
password; ``conf/.password_verification`` holds the word ``HummingBot``
encrypted the same way, so a wrong password is reported before any file is
read. Needs the ``hummingbot`` extra (eth-keyfile)."""

from __future__ import annotations

import binascii
import json
import os
from typing import Any, Dict, List, Optional

from credbroker.credentials import KeySet
from credbroker.importers import Found, ImportError_

PASSWORD_VERIFICATION_WORD = "HummingBot"

#: hummingbot connector names → the broker's exchanges.
CONNECTORS = {
    "binance": "binance",
    "binance_perpetual": "binance",
    "bybit": "bybit",
    "bybit_perpetual": "bybit",
    "okx": "okx",
    "okx_perpetual": "okx",
    "kucoin": "kucoin",
    "kucoin_perpetual": "kucoin",
    "kraken": "kraken",
    "coinbase_advanced_trade": "coinbase",
}


def decrypt(value: str, password: str, what: str) -> str:
    """One encrypted field's plain text."""
    try:
        from eth_keyfile.keyfile import decode_keyfile_json
    except ImportError:
        raise ImportError_(
            "hummingbot files need eth-keyfile: pip install 'credbroker[hummingbot]'"
        ) from None
    try:
        keyfile = json.loads(binascii.unhexlify(value.strip()).decode())
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError, ValueError):
        raise ImportError_(f"{what}: not a hummingbot-encrypted value (hex of a keyfile)") from None
    try:
        plain: bytes = decode_keyfile_json(keyfile, password.encode())
    except ValueError as e:
        if "MAC mismatch" in str(e):
            raise ImportError_(f"{what}: wrong password") from None
        raise ImportError_(f"{what}: cannot decrypt ({e})") from None
    except (KeyError, TypeError):
        raise ImportError_(f"{what}: malformed keyfile") from None
    return plain.decode()


def check_password(conf_dir: str, password: str) -> None:
    """Checks ``password`` against ``conf/.password_verification``."""
    path = os.path.join(conf_dir, ".password_verification")
    try:
        with open(path, encoding="utf-8") as f:
            blob = f.read()
    except OSError as e:
        raise ImportError_(f"{path}: cannot read ({e.strerror})") from None
    if decrypt(blob, password, path) != PASSWORD_VERIFICATION_WORD:
        raise ImportError_(f"{path}: wrong password")


def _yaml(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ImportError_(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ImportError_(f"{path}: not valid YAML ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ImportError_(f"{path}: not a hummingbot connector file")
    return data


def read_connector(path: str, password: str) -> Optional[Found]:
    """The key in one connector file (None for a connector the broker does
    not serve)."""
    data = _yaml(path)
    connector = str(data.get("connector") or os.path.splitext(os.path.basename(path))[0])
    exchange = CONNECTORS.get(connector)
    if exchange is None:
        return None
    fields: Dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(value, str) or not name.startswith(connector + "_"):
            continue
        role = name[len(connector) + 1 :]
        if role in ("api_key",):
            fields["key"] = decrypt(value, password, f"{path}: {name}")
        elif role in ("api_secret", "secret_key"):
            fields["secret"] = decrypt(value, password, f"{path}: {name}")
        elif role == "passphrase":
            fields["passphrase"] = decrypt(value, password, f"{path}: {name}")
    if "key" not in fields or "secret" not in fields:
        raise ImportError_(f"{path}: no {connector}_api_key and secret fields")
    return Found(
        source=path,
        exchange=exchange,
        keys=KeySet(fields["key"], fields["secret"], fields.get("passphrase")),
    )


def read(conf_dir: str, password: str) -> List[Found]:
    """Every key in ``conf_dir/connectors`` (``conf_dir`` is hummingbot's
    ``conf`` folder), after checking the password."""
    check_password(conf_dir, password)
    connectors = os.path.join(conf_dir, "connectors")
    try:
        names = sorted(n for n in os.listdir(connectors) if n.endswith((".yml", ".yaml")))
    except OSError as e:
        raise ImportError_(f"{connectors}: cannot list ({e.strerror})") from None
    found = [read_connector(os.path.join(connectors, n), password) for n in names]
    return [f for f in found if f is not None]
