import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CredentialStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CREDENTIAL_STATUS_UNSPECIFIED: _ClassVar[CredentialStatus]
    CREDENTIAL_STATUS_ACTIVE: _ClassVar[CredentialStatus]
    CREDENTIAL_STATUS_EXPIRED: _ClassVar[CredentialStatus]
    CREDENTIAL_STATUS_INVALID: _ClassVar[CredentialStatus]
    CREDENTIAL_STATUS_REVOKED: _ClassVar[CredentialStatus]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_STORED: _ClassVar[EventKind]
    EVENT_KIND_ROTATED: _ClassVar[EventKind]
    EVENT_KIND_PREVIOUS_EXPIRED: _ClassVar[EventKind]
    EVENT_KIND_INVALIDATED: _ClassVar[EventKind]
    EVENT_KIND_DELETED: _ClassVar[EventKind]
CREDENTIAL_STATUS_UNSPECIFIED: CredentialStatus
CREDENTIAL_STATUS_ACTIVE: CredentialStatus
CREDENTIAL_STATUS_EXPIRED: CredentialStatus
CREDENTIAL_STATUS_INVALID: CredentialStatus
CREDENTIAL_STATUS_REVOKED: CredentialStatus
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_STORED: EventKind
EVENT_KIND_ROTATED: EventKind
EVENT_KIND_PREVIOUS_EXPIRED: EventKind
EVENT_KIND_INVALIDATED: EventKind
EVENT_KIND_DELETED: EventKind

class CredentialSet(_message.Message):
    __slots__ = ("api_key", "api_secret", "passphrase")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    API_SECRET_FIELD_NUMBER: _ClassVar[int]
    PASSPHRASE_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    api_secret: str
    passphrase: str
    def __init__(self, api_key: _Optional[str] = ..., api_secret: _Optional[str] = ..., passphrase: _Optional[str] = ...) -> None: ...

class Permissions(_message.Message):
    __slots__ = ("read", "trade", "withdraw", "transfer", "ip_restricted", "expires_at")
    READ_FIELD_NUMBER: _ClassVar[int]
    TRADE_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    IP_RESTRICTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    read: bool
    trade: bool
    withdraw: bool
    transfer: bool
    ip_restricted: bool
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, read: bool = ..., trade: bool = ..., withdraw: bool = ..., transfer: bool = ..., ip_restricted: bool = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetCredentialsRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange", "min_version")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    min_version: int
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., min_version: _Optional[int] = ...) -> None: ...

class GetCredentialsResponse(_message.Message):
    __slots__ = ("current", "version", "status", "previous", "previous_version", "previous_valid_until", "stale")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    current: CredentialSet
    version: int
    status: CredentialStatus
    previous: CredentialSet
    previous_version: int
    previous_valid_until: _timestamp_pb2.Timestamp
    stale: bool
    def __init__(self, current: _Optional[_Union[CredentialSet, _Mapping]] = ..., version: _Optional[int] = ..., status: _Optional[_Union[CredentialStatus, str]] = ..., previous: _Optional[_Union[CredentialSet, _Mapping]] = ..., previous_version: _Optional[int] = ..., previous_valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stale: bool = ...) -> None: ...

class ValidateAndStoreRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange", "credentials")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    credentials: CredentialSet
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., credentials: _Optional[_Union[CredentialSet, _Mapping]] = ...) -> None: ...

class ValidateAndStoreResponse(_message.Message):
    __slots__ = ("credential",)
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    credential: CredentialMetadata
    def __init__(self, credential: _Optional[_Union[CredentialMetadata, _Mapping]] = ...) -> None: ...

class RotateRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange", "credentials", "overlap_seconds", "mint")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MINT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    credentials: CredentialSet
    overlap_seconds: int
    mint: bool
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., credentials: _Optional[_Union[CredentialSet, _Mapping]] = ..., overlap_seconds: _Optional[int] = ..., mint: bool = ...) -> None: ...

class RotateResponse(_message.Message):
    __slots__ = ("credential", "rotated", "key_rotation")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    ROTATED_FIELD_NUMBER: _ClassVar[int]
    KEY_ROTATION_FIELD_NUMBER: _ClassVar[int]
    credential: CredentialMetadata
    rotated: bool
    key_rotation: KeyRotationStatus
    def __init__(self, credential: _Optional[_Union[CredentialMetadata, _Mapping]] = ..., rotated: bool = ..., key_rotation: _Optional[_Union[KeyRotationStatus, _Mapping]] = ...) -> None: ...

class KeyRotationStatus(_message.Message):
    __slots__ = ("id", "step", "attempts", "last_error", "delete_after", "minted_api_key_hint", "new_version", "overdue")
    ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DELETE_AFTER_FIELD_NUMBER: _ClassVar[int]
    MINTED_API_KEY_HINT_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    OVERDUE_FIELD_NUMBER: _ClassVar[int]
    id: str
    step: str
    attempts: int
    last_error: str
    delete_after: _timestamp_pb2.Timestamp
    minted_api_key_hint: str
    new_version: int
    overdue: bool
    def __init__(self, id: _Optional[str] = ..., step: _Optional[str] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., delete_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., minted_api_key_hint: _Optional[str] = ..., new_version: _Optional[int] = ..., overdue: bool = ...) -> None: ...

class SetManagementKeyRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange", "credentials", "sub_account", "rotate_every_days", "overlap_seconds")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    SUB_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ROTATE_EVERY_DAYS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    credentials: CredentialSet
    sub_account: str
    rotate_every_days: int
    overlap_seconds: int
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., credentials: _Optional[_Union[CredentialSet, _Mapping]] = ..., sub_account: _Optional[str] = ..., rotate_every_days: _Optional[int] = ..., overlap_seconds: _Optional[int] = ...) -> None: ...

class SetManagementKeyResponse(_message.Message):
    __slots__ = ("api_key_hint", "sub_account", "rotate_every_days")
    API_KEY_HINT_FIELD_NUMBER: _ClassVar[int]
    SUB_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ROTATE_EVERY_DAYS_FIELD_NUMBER: _ClassVar[int]
    api_key_hint: str
    sub_account: str
    rotate_every_days: int
    def __init__(self, api_key_hint: _Optional[str] = ..., sub_account: _Optional[str] = ..., rotate_every_days: _Optional[int] = ...) -> None: ...

class WatchRotationsRequest(_message.Message):
    __slots__ = ("tenant_id", "exchanges", "after_seq", "include_credentials")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGES_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchanges: _containers.RepeatedScalarFieldContainer[str]
    after_seq: int
    include_credentials: bool
    def __init__(self, tenant_id: _Optional[str] = ..., exchanges: _Optional[_Iterable[str]] = ..., after_seq: _Optional[int] = ..., include_credentials: bool = ...) -> None: ...

class WatchRotationsResponse(_message.Message):
    __slots__ = ("state", "event", "heartbeat", "credentials")
    STATE_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    state: CredentialMetadata
    event: RotationEvent
    heartbeat: Heartbeat
    credentials: GetCredentialsResponse
    def __init__(self, state: _Optional[_Union[CredentialMetadata, _Mapping]] = ..., event: _Optional[_Union[RotationEvent, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., credentials: _Optional[_Union[GetCredentialsResponse, _Mapping]] = ...) -> None: ...

class RotationEvent(_message.Message):
    __slots__ = ("seq", "tenant_id", "exchange", "kind", "version", "previous_version", "previous_valid_until", "occurred_at")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    seq: int
    tenant_id: str
    exchange: str
    kind: EventKind
    version: int
    previous_version: int
    previous_valid_until: _timestamp_pb2.Timestamp
    occurred_at: _timestamp_pb2.Timestamp
    def __init__(self, seq: _Optional[int] = ..., tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., version: _Optional[int] = ..., previous_version: _Optional[int] = ..., previous_valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "sent_at", "head_seq")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    sent_at: _timestamp_pb2.Timestamp
    head_seq: int
    def __init__(self, seq: _Optional[int] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., head_seq: _Optional[int] = ...) -> None: ...

class ListCredentialsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListCredentialsResponse(_message.Message):
    __slots__ = ("credentials",)
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.RepeatedCompositeFieldContainer[CredentialMetadata]
    def __init__(self, credentials: _Optional[_Iterable[_Union[CredentialMetadata, _Mapping]]] = ...) -> None: ...

class DescribeCredentialRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ...) -> None: ...

class CredentialMetadata(_message.Message):
    __slots__ = ("tenant_id", "exchange", "status", "version", "previous_version", "previous_valid_until", "permissions", "vault_path", "last_validated_at", "health_check_status", "created_at", "updated_at", "api_key_hint", "adoption")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VALID_UNTIL_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    VAULT_PATH_FIELD_NUMBER: _ClassVar[int]
    LAST_VALIDATED_AT_FIELD_NUMBER: _ClassVar[int]
    HEALTH_CHECK_STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_HINT_FIELD_NUMBER: _ClassVar[int]
    ADOPTION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    status: CredentialStatus
    version: int
    previous_version: int
    previous_valid_until: _timestamp_pb2.Timestamp
    permissions: Permissions
    vault_path: str
    last_validated_at: _timestamp_pb2.Timestamp
    health_check_status: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    api_key_hint: str
    adoption: _containers.RepeatedCompositeFieldContainer[Adoption]
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., status: _Optional[_Union[CredentialStatus, str]] = ..., version: _Optional[int] = ..., previous_version: _Optional[int] = ..., previous_valid_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., permissions: _Optional[_Union[Permissions, _Mapping]] = ..., vault_path: _Optional[str] = ..., last_validated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., health_check_status: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., api_key_hint: _Optional[str] = ..., adoption: _Optional[_Iterable[_Union[Adoption, _Mapping]]] = ...) -> None: ...

class Adoption(_message.Message):
    __slots__ = ("subscriber", "version", "acked_at", "on_previous")
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    ON_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    subscriber: str
    version: int
    acked_at: _timestamp_pb2.Timestamp
    on_previous: bool
    def __init__(self, subscriber: _Optional[str] = ..., version: _Optional[int] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., on_previous: bool = ...) -> None: ...

class AcknowledgeVersionRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange", "version", "instance")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    version: int
    instance: str
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., version: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class AcknowledgeVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteCredentialsRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ...) -> None: ...

class DeleteCredentialsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: bool = ...) -> None: ...

class ValidateCredentialsRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ...) -> None: ...

class ValidateCredentialsResponse(_message.Message):
    __slots__ = ("health",)
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    health: CredentialHealth
    def __init__(self, health: _Optional[_Union[CredentialHealth, _Mapping]] = ...) -> None: ...

class GetCredentialHealthRequest(_message.Message):
    __slots__ = ("tenant_id", "exchange")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ...) -> None: ...

class CredentialHealth(_message.Message):
    __slots__ = ("tenant_id", "exchange", "status", "credential_status", "checked_at", "detail", "permissions", "key_rotation")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_STATUS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PERMISSIONS_FIELD_NUMBER: _ClassVar[int]
    KEY_ROTATION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    exchange: str
    status: str
    credential_status: CredentialStatus
    checked_at: _timestamp_pb2.Timestamp
    detail: str
    permissions: Permissions
    key_rotation: KeyRotationStatus
    def __init__(self, tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., status: _Optional[str] = ..., credential_status: _Optional[_Union[CredentialStatus, str]] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., detail: _Optional[str] = ..., permissions: _Optional[_Union[Permissions, _Mapping]] = ..., key_rotation: _Optional[_Union[KeyRotationStatus, _Mapping]] = ...) -> None: ...

class SetWebhookRequest(_message.Message):
    __slots__ = ("tenant_id", "url", "secret")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    url: str
    secret: str
    def __init__(self, tenant_id: _Optional[str] = ..., url: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class SetWebhookResponse(_message.Message):
    __slots__ = ("url", "secret")
    URL_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    url: str
    secret: str
    def __init__(self, url: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token", "since")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    since: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("id", "timestamp", "event_type", "user", "resource", "action", "result", "ip_address", "user_agent", "tenant_id", "exchange", "versions", "request_id", "trace_id", "grpc_code", "duration_ms", "role", "chain_id", "seq")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    IP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_CODE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    id: str
    timestamp: _timestamp_pb2.Timestamp
    event_type: str
    user: str
    resource: str
    action: str
    result: str
    ip_address: str
    user_agent: str
    tenant_id: str
    exchange: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    request_id: str
    trace_id: str
    grpc_code: str
    duration_ms: float
    role: str
    chain_id: str
    seq: int
    def __init__(self, id: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., event_type: _Optional[str] = ..., user: _Optional[str] = ..., resource: _Optional[str] = ..., action: _Optional[str] = ..., result: _Optional[str] = ..., ip_address: _Optional[str] = ..., user_agent: _Optional[str] = ..., tenant_id: _Optional[str] = ..., exchange: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., grpc_code: _Optional[str] = ..., duration_ms: _Optional[float] = ..., role: _Optional[str] = ..., chain_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...
