-- credbroker schema v11: rotations at the exchange (zero-touch rotation).
--
-- A tenant's management key (a master account's key that may create and
-- delete its sub-account's API keys) lives in Vault at
-- `{prefix}/{tenant}/exchanges/{exchange}/management`; here only which
-- sub-account it manages. Each rotation at the exchange is one row whose
-- `step` moves minting → rotating → waiting → deleting → done (or failed
-- while minting); every step is idempotent and saved after it succeeded, so
-- a replica that dies mid-rotation leaves a row another finishes (it works
-- on a rotation under the lease `key-rotation:{id}` in job_leases). At most
-- one unfinished rotation per credential.
CREATE TABLE management_keys (
    tenant_id     UUID NOT NULL,
    exchange      TEXT NOT NULL,
    sub_account   TEXT NOT NULL,
    api_key_hint  TEXT NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, exchange)
);
CREATE TABLE key_rotations (
    id               UUID PRIMARY KEY,
    tenant_id        UUID NOT NULL,
    exchange         TEXT NOT NULL,
    sub_account      TEXT NOT NULL,
    step             TEXT NOT NULL CHECK (step IN ('minting', 'rotating', 'waiting', 'deleting', 'done', 'failed')),
    old_api_key      TEXT NOT NULL,
    minted_api_key   TEXT,
    new_version      BIGINT,
    overlap_secs     INT NOT NULL,
    delete_after     TIMESTAMPTZ,
    attempts         INT NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX idx_key_rotations_one_active ON key_rotations (tenant_id, exchange)
    WHERE step NOT IN ('done', 'failed');
CREATE INDEX idx_key_rotations_due ON key_rotations (next_attempt_at)
    WHERE step NOT IN ('done', 'failed');

ALTER TABLE management_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE management_keys FORCE ROW LEVEL SECURITY;
ALTER TABLE key_rotations ENABLE ROW LEVEL SECURITY;
ALTER TABLE key_rotations FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON management_keys TO credbroker_system USING (true) WITH CHECK (true);
CREATE POLICY system_all ON key_rotations TO credbroker_system USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON management_keys TO credbroker_system;
GRANT SELECT, INSERT, UPDATE, DELETE ON key_rotations TO credbroker_system;
