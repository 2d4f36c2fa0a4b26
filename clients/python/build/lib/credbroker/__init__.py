"""credbroker for Python trading pods: the credential handle (sync and
asyncio), ccxt binding, and importers for freqtrade and hummingbot keys.

    from credbroker import BrokerConfig, CredentialHandle
    handle = CredentialHandle(BrokerConfig(targets=["broker:50051"], tenant=T,
                              ca="ca.pem", cert="pod.pem", key="pod.key"),
                              ["binance"]).start()
    handle.wait_ready(10)
    keys = handle.get("binance").current
"""

from credbroker.aio import AsyncCredentialHandle
from credbroker.connection import Broker, BrokerConfig, TokenFile, connect
from credbroker.credentials import Credentials, KeySet, mask
from credbroker.handle import CredentialHandle, NoCredentials

__all__ = [
    "AsyncCredentialHandle",
    "Broker",
    "BrokerConfig",
    "CredentialHandle",
    "Credentials",
    "KeySet",
    "NoCredentials",
    "TokenFile",
    "connect",
    "mask",
]
__version__ = "0.1.0"
