-- Adoption tracking: which subscriber (SPIFFE ID, optionally #instance)
-- acknowledged which version of a credential. Operators see who still signs
-- with the previous version before its overlap ends. Rows go with their
-- credential.
CREATE TABLE rotation_acks (
    tenant_id   UUID NOT NULL,
    exchange    VARCHAR(50) NOT NULL,
    subscriber  VARCHAR(512) NOT NULL,
    version     BIGINT NOT NULL CHECK (version > 0),
    acked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, exchange, subscriber),
    FOREIGN KEY (tenant_id, exchange) REFERENCES tenant_credentials (tenant_id, exchange) ON DELETE CASCADE
);

ALTER TABLE rotation_acks ENABLE ROW LEVEL SECURITY;
ALTER TABLE rotation_acks FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rotation_acks TO credbroker_tenant
    USING (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid)
    WITH CHECK (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid);
CREATE POLICY system_all ON rotation_acks TO credbroker_system USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON rotation_acks TO credbroker_tenant, credbroker_system;
