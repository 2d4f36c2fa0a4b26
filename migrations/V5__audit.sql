-- credbroker schema v5: the audit trail.
--
-- Each replica appends every call (and every background action) to a local
-- append-only spool before it answers, chaining each record to the previous
-- one of its chain (one chain per replica) with SHA-256, and ships the spool
-- here in batches. `id` makes shipping idempotent: a batch re-sent after a
-- crash inserts nothing twice. `body` is the exact canonical JSON the hash
-- covers, kept as text (jsonb would reorder it).
--
-- The application roles may only INSERT and SELECT: the table is
-- append-only for the broker. A record edited, deleted or reordered by
-- anyone else breaks its chain, which `credbroker audit verify` reports.
CREATE TABLE audit_log (
    id          UUID PRIMARY KEY,
    chain_id    UUID NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq > 0),
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    tenant_id   UUID,
    body        TEXT NOT NULL,
    UNIQUE (chain_id, seq)
);
CREATE INDEX idx_audit_log_tenant_at ON audit_log (tenant_id, at DESC, id DESC);

-- Periodic anchors: the newest shipped (seq, hash) of each chain, so a
-- rewrite of a whole chain tail is caught too.
CREATE TABLE audit_anchors (
    chain_id     UUID NOT NULL,
    seq          BIGINT NOT NULL,
    hash         TEXT NOT NULL,
    anchored_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, seq)
);

ALTER TABLE audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_log FORCE ROW LEVEL SECURITY;
ALTER TABLE audit_anchors ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_anchors FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_log FOR SELECT TO credbroker_tenant
    USING (tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid);
CREATE POLICY system_all ON audit_log TO credbroker_system USING (true) WITH CHECK (true);
CREATE POLICY system_all ON audit_anchors TO credbroker_system USING (true) WITH CHECK (true);
GRANT SELECT ON audit_log TO credbroker_tenant;
GRANT SELECT, INSERT ON audit_log, audit_anchors TO credbroker_system;

-- Who made each change (`subject (role)`), as the request context names it.
ALTER TABLE credential_events ADD COLUMN actor TEXT;
