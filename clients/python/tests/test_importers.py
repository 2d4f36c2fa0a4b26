"""freqtrade and hummingbot files → keys, and the CLI storing them through
ValidateAndStore against a real broker."""

from __future__ import annotations

import binascii
import json
import os
import subprocess
import sys
from typing import Any, Dict

import grpc
import pytest
from eth_keyfile.keyfile import (  # the primitives hummingbot itself uses
    DKLEN,
    _pbkdf2_hash,
    big_endian_to_int,
    encode_hex_no_prefix,
    encrypt_aes_ctr,
    keccak,
)

from credbroker.importers import ImportError_, freqtrade, hummingbot
from conftest import Dev, fresh_keys


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_freqtrade_config_with_comments_and_an_add_config_files_chain(tmp_path: Any) -> None:
    d = str(tmp_path)
    write(
        os.path.join(d, "secrets", "exchange.json"),
        '{\n // the keys live here\n "exchange": {"key": "okxKeyFromChain0001", '
        '"secret": "okxSecretFromChain", "password": "chain-pass",},\n}\n',
    )
    main = write(
        os.path.join(d, "config.json"),
        '{"add_config_files": ["secrets/exchange.json"],\n /* the strategy */\n'
        ' "exchange": {"name": "okx", "pair_whitelist": ["BTC/USDT"]}, "stake_currency": "USDT"}',
    )
    found = freqtrade.read(main)
    assert found.exchange == "okx"
    assert found.keys.api_key == "okxKeyFromChain0001"
    assert found.keys.api_secret == "okxSecretFromChain"
    assert found.keys.passphrase == "chain-pass"
    assert "okxSecretFromChain" not in str(found) and "chain-pass" not in str(found)


def test_freqtrade_the_naming_file_overrides_its_includes(tmp_path: Any) -> None:
    d = str(tmp_path)
    write(
        os.path.join(d, "base.json"),
        '{"exchange": {"name": "binance", "key": "old", "secret": "old"}}',
    )
    main = write(
        os.path.join(d, "config.json"),
        '{"add_config_files": ["base.json"], "exchange": {"key": "binanceKeyOverride01", "secret": "s"}}',
    )
    found = freqtrade.read(main)
    assert (found.exchange, found.keys.api_key, found.keys.api_secret) == (
        "binance",
        "binanceKeyOverride01",
        "s",
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"exchange": {"name": "binance", "key": "k"', "not valid JSON at line 1"),
        (
            '{"exchange": {"name": "ftx", "key": "k", "secret": "s"}}',
            "'ftx' is not one the broker serves",
        ),
        ('{"exchange": {"name": "binance", "key": "", "secret": ""}}', "must both be set"),
        ('{"dry_run": true}', 'no "exchange" section'),
        ('{"add_config_files": ["config.json"]}', "loops back"),
    ],
)
def test_freqtrade_errors_name_the_file_and_the_problem(
    tmp_path: Any, text: str, message: str
) -> None:
    path = write(os.path.join(str(tmp_path), "config.json"), text)
    with pytest.raises(ImportError_, match=message) as e:
        freqtrade.read(path)
    assert path in str(e.value)


def encrypt(value: str, password: str) -> str:
    """Encrypts as hummingbot's ETHKeyFileSecretManger does (v3 keyfile,
    PBKDF2-SHA256, AES-128-CTR, Keccak MAC, hex of the JSON); a small work
    factor keeps the test fast."""
    salt = os.urandom(16)
    derived = _pbkdf2_hash(
        password.encode(), hash_name="sha256", salt=salt, iterations=1000, dklen=DKLEN
    )
    iv = big_endian_to_int(os.urandom(16))
    ciphertext = encrypt_aes_ctr(value.encode(), derived[:16], iv)
    keyfile: Dict[str, Any] = {
        "crypto": {
            "cipher": "aes-128-ctr",
            "cipherparams": {"iv": encode_hex_no_prefix(iv.to_bytes(16, "big"))},
            "ciphertext": encode_hex_no_prefix(ciphertext),
            "kdf": "pbkdf2",
            "kdfparams": {
                "c": 1000,
                "dklen": DKLEN,
                "prf": "hmac-sha256",
                "salt": encode_hex_no_prefix(salt),
            },
            "mac": encode_hex_no_prefix(keccak(derived[16:32] + ciphertext)),
        },
        "version": 3,
    }
    return binascii.hexlify(json.dumps(keyfile).encode()).decode()


def hummingbot_conf(d: str, password: str, keys: Dict[str, Any]) -> str:
    conf = os.path.join(d, "conf")
    write(os.path.join(conf, ".password_verification"), encrypt("HummingBot", password))
    for connector, fields in keys.items():
        lines = [f"connector: {connector}"]
        lines += [f"{k}: {encrypt(v, password)}" for k, v in fields.items()]
        write(os.path.join(conf, "connectors", f"{connector}.yml"), "\n".join(lines) + "\n")
    write(os.path.join(conf, "connectors", "uniswap.yml"), "connector: uniswap\n")
    return conf


def test_hummingbot_connector_files_decrypt(tmp_path: Any) -> None:
    conf = hummingbot_conf(
        str(tmp_path),
        "hb-password",
        {
            "binance": {
                "binance_api_key": "binanceKeyHb000001",
                "binance_api_secret": "binanceSecretHb",
            },
            "kucoin": {
                "kucoin_api_key": "kucoinKeyHb000001",
                "kucoin_secret_key": "kucoinSecretHb",
                "kucoin_passphrase": "kc-pass",
            },
        },
    )
    found = {f.exchange: f for f in hummingbot.read(conf, "hb-password")}
    assert set(found) == {"binance", "kucoin"}, "uniswap is not the broker's"
    assert found["binance"].keys.api_secret == "binanceSecretHb"
    assert found["kucoin"].keys.passphrase == "kc-pass"


def test_hummingbot_wrong_password_and_malformed_files(tmp_path: Any) -> None:
    conf = hummingbot_conf(
        str(tmp_path), "right", {"bybit": {"bybit_api_key": "k" * 16, "bybit_api_secret": "s"}}
    )
    with pytest.raises(ImportError_, match="wrong password"):
        hummingbot.read(conf, "wrong")
    write(os.path.join(conf, "connectors", "okx.yml"), "connector: okx\nokx_api_key: not-hex\n")
    with pytest.raises(
        ImportError_, match="okx.yml: okx_api_key: not a hummingbot-encrypted value"
    ):
        hummingbot.read(conf, "right")


def cli(dev: Dev, tenant: str, *args: str) -> "subprocess.CompletedProcess[str]":
    broker = [
        "--tenant",
        tenant,
        "--target",
        f"127.0.0.1:{dev.port}",
        "--server-name",
        "localhost",
        "--ca",
        dev.file("ca.pem"),
        "--cert",
        dev.file("client.pem"),
        "--key",
        dev.file("client.key"),
    ]
    return subprocess.run(
        [sys.executable, "-m", "credbroker.importers", *args, *broker],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_dry_run_then_apply_stores_through_validate_and_store(
    dev: Dev, tenant: str, tmp_path: Any
) -> None:
    good, unknown = fresh_keys("binance"), fresh_keys("binance")
    dev.sim_key("binance", good)
    path = write(
        os.path.join(str(tmp_path), "config.json"),
        json.dumps(
            {"exchange": {"name": "binance", "key": good.api_key, "secret": good.api_secret}}
        ),
    )
    dry = cli(dev, tenant, "freqtrade", path)
    assert dry.returncode == 0, dry.stderr
    assert "dry run: 1 key(s) would be stored" in dry.stdout
    b = dev.operator(tenant)
    try:
        with pytest.raises(grpc.RpcError) as nothing:
            b.describe("binance")
        assert nothing.value.code() == grpc.StatusCode.NOT_FOUND, "a dry run stores nothing"

        applied = cli(dev, tenant, "freqtrade", path, "--apply")
        assert applied.returncode == 0, applied.stderr
        assert "stored binance version 1" in applied.stdout
        assert b.get_credentials("binance").current == good

        # A key the exchange does not know is refused by validation, with
        # the broker's reason and no secret in the output.
        other = str(tmp_path) + "/other.json"
        write(
            other,
            json.dumps(
                {
                    "exchange": {
                        "name": "binance",
                        "key": unknown.api_key,
                        "secret": unknown.api_secret,
                    }
                }
            ),
        )
        refused = cli(dev, tenant, "freqtrade", other, "--apply", "--rotate")
        assert refused.returncode == 1
        assert "refused binance" in refused.stderr
        for text in (refused.stdout, refused.stderr, applied.stdout, dry.stdout):
            assert good.api_secret not in text and unknown.api_secret not in text
        assert b.get_credentials("binance").version == 1, "nothing was stored"
    finally:
        b.close()
