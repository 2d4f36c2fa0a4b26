-- credbroker schema v6: job leases (health checks) and webhooks.
--
-- A job that must run on one replica at a time (the credential health
-- checks) holds a lease here: the holder renews it while it works; when it
-- dies, the lease expires and another replica takes it over. The lease
-- only decides who works: what is done is recorded in the rows themselves
-- (`health_checked_at`), so a replica that takes over mid-round continues
-- with the credentials not yet checked and checks none twice.
CREATE TABLE job_leases (
    name        TEXT PRIMARY KEY,
    holder      UUID NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);
ALTER TABLE job_leases ENABLE ROW LEVEL SECURITY;
ALTER TABLE job_leases FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON job_leases TO credbroker_system USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON job_leases TO credbroker_system;

-- The health-check job scans active credentials by last check.
CREATE INDEX idx_tenant_credentials_health_due ON tenant_credentials (health_checked_at NULLS FIRST)
    WHERE status = 'active';

-- Webhooks: each tenant's endpoint (its signing secret lives in Vault, at
-- `{prefix}/{tenant}/webhook`, version `secret_version`; never here), and
-- the durable outbox. A message is queued in the same transaction as the
-- change it reports, so no change is committed without its message, and
-- delivered at least once with a stable id (`webhook-id`): a receiver that
-- was down, or a broker that restarted, gets it later.
CREATE TABLE tenant_webhooks (
    tenant_id       UUID PRIMARY KEY,
    url             TEXT NOT NULL,
    secret_version  BIGINT NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE webhook_outbox (
    id               UUID PRIMARY KEY,
    tenant_id        UUID NOT NULL,
    event_type       TEXT NOT NULL,
    payload          TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    next_attempt_at  TIMESTAMPTZ NOT NULL,
    attempts         INT NOT NULL DEFAULT 0,
    last_result      TEXT,
    delivered_at     TIMESTAMPTZ
);
CREATE INDEX idx_webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL;

ALTER TABLE tenant_webhooks ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenant_webhooks FORCE ROW LEVEL SECURITY;
ALTER TABLE webhook_outbox ENABLE ROW LEVEL SECURITY;
ALTER TABLE webhook_outbox FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_webhooks TO credbroker_tenant
    USING (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid);
CREATE POLICY tenant_isolation ON webhook_outbox TO credbroker_tenant
    USING (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid);
CREATE POLICY system_all ON tenant_webhooks TO credbroker_system USING (true) WITH CHECK (true);
CREATE POLICY system_all ON webhook_outbox TO credbroker_system USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_webhooks TO credbroker_tenant, credbroker_system;
GRANT SELECT, INSERT ON webhook_outbox TO credbroker_tenant;
GRANT SELECT, UPDATE, DELETE ON webhook_outbox TO credbroker_system;
