-- credbroker schema v1: credential metadata, the event log, tenant isolation.
--
-- Changes from the seed's `tenant_credentials` (EPIC-003), and why:
-- * One row per (tenant, exchange), not per credential *type*. The seed's
--   UNIQUE(tenant_id, exchange, credential_type) splits one key set over
--   three rows (api_key / api_secret / passphrase) that must always change
--   together; a rotation would have to update three rows and readers could
--   see a new key with an old secret. The set is one Vault KV v2 secret with
--   three fields, so it is one row here, pointing at a KV version.
-- * current_version / previous_version / previous_valid_until: the row says
--   which Vault versions are served; the overlap deadline lives here (not in
--   a timer) so any replica, after any restart, retires the old version.
-- * No FOREIGN KEY to tenants(id): tenants are owned by the platform's
--   tenant service (EPIC-001) in another database; the broker trusts the
--   authenticated caller's tenant instead.
-- * TIMESTAMPTZ instead of TIMESTAMP: replicas and operators in different
--   zones must agree on overlap deadlines.
-- * CHECK constraints on status and health so a typo cannot invent a state.
-- * id is BIGINT identity (SERIAL is the legacy spelling of the same).

DO $$
BEGIN
    -- Roles are cluster-wide; the application switches to them per
    -- transaction (SET LOCAL ROLE), so RLS applies even when the login role
    -- is the table owner or a superuser. Several databases may migrate at
    -- once on one cluster, so a concurrent creation is not an error.
    BEGIN
        CREATE ROLE credbroker_tenant NOLOGIN NOSUPERUSER NOBYPASSRLS;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    BEGIN
        CREATE ROLE credbroker_system NOLOGIN NOSUPERUSER NOBYPASSRLS;
    EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
    END;
    IF NOT pg_has_role(current_user, 'credbroker_tenant', 'MEMBER')
       OR NOT pg_has_role(current_user, 'credbroker_system', 'MEMBER') THEN
        EXECUTE format('GRANT credbroker_tenant, credbroker_system TO %I', current_user);
    END IF;
END
$$;

CREATE TABLE tenant_credentials (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id             UUID NOT NULL,
    exchange              VARCHAR(50) NOT NULL,
    vault_path            VARCHAR(255) NOT NULL,
    current_version       BIGINT NOT NULL CHECK (current_version > 0),
    previous_version      BIGINT,
    previous_valid_until  TIMESTAMPTZ,
    status                VARCHAR(20) NOT NULL DEFAULT 'active'
                          CHECK (status IN ('active', 'expired', 'invalid', 'revoked')),
    permissions           JSONB,
    api_key_hint          VARCHAR(32) NOT NULL DEFAULT '',
    last_validated_at     TIMESTAMPTZ,
    health_check_status   VARCHAR(20) NOT NULL DEFAULT 'unknown'
                          CHECK (health_check_status IN ('unknown', 'healthy', 'unhealthy')),
    health_check_detail   TEXT,
    health_checked_at     TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, exchange),
    CHECK ((previous_version IS NULL) = (previous_valid_until IS NULL))
);

-- The seed's indexes; (tenant_id, exchange) is covered by the UNIQUE index.
CREATE INDEX idx_tenant_credentials_tenant_id ON tenant_credentials (tenant_id);
CREATE INDEX idx_tenant_credentials_status ON tenant_credentials (status);
-- The retire job scans open overlaps by deadline.
CREATE INDEX idx_tenant_credentials_overlap ON tenant_credentials (previous_valid_until)
    WHERE previous_valid_until IS NOT NULL;

-- Every committed change, in one global order. `seq` is the only ordering
-- clients see; it grows across restarts and replicas.
CREATE TABLE credential_events (
    seq                   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id             UUID NOT NULL,
    exchange              VARCHAR(50) NOT NULL,
    kind                  VARCHAR(20) NOT NULL
                          CHECK (kind IN ('stored', 'rotated', 'previous_expired', 'invalidated', 'deleted')),
    version               BIGINT NOT NULL,
    previous_version      BIGINT,
    previous_valid_until  TIMESTAMPTZ,
    occurred_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_credential_events_tenant_seq ON credential_events (tenant_id, seq);
CREATE INDEX idx_credential_events_occurred_at ON credential_events (occurred_at);

-- Events are kept for a retention window; a client resuming from a seq at or
-- below `pruned_through` may have missed pruned events and is told to resync.
CREATE TABLE credential_event_retention (
    singleton       BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through  BIGINT NOT NULL DEFAULT 0
);
INSERT INTO credential_event_retention DEFAULT VALUES;

-- Tenant isolation. credbroker_tenant sees only the rows of the tenant set
-- in `credbroker.tenant_id` for the transaction; an unset tenant sees
-- nothing. credbroker_system (retire job, event listener) sees all rows.
ALTER TABLE tenant_credentials ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_credentials FORCE ROW LEVEL SECURITY;
ALTER TABLE credential_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE credential_events FORCE ROW LEVEL SECURITY;

CREATE POLICY tenant_isolation ON tenant_credentials TO credbroker_tenant
    USING (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON credential_events TO credbroker_tenant
    USING (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid);
CREATE POLICY system_all ON tenant_credentials TO credbroker_system USING (true) WITH CHECK (true);
CREATE POLICY system_all ON credential_events TO credbroker_system USING (true) WITH CHECK (true);

GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_credentials, credential_events TO credbroker_tenant, credbroker_system;
GRANT SELECT ON credential_event_retention TO credbroker_tenant, credbroker_system;
GRANT UPDATE ON credential_event_retention TO credbroker_system;

-- Wake-up for other replicas' listeners; the payload is only the seq, the
-- table stays the source of truth.
CREATE FUNCTION credential_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('credbroker_events', NEW.seq::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER credential_events_notify AFTER INSERT ON credential_events
    FOR EACH ROW EXECUTE FUNCTION credential_events_notify();
