-- credbroker schema v9: the audit sink, cheap and bounded.
--
-- 1. Shipped with binary COPY. PostgreSQL refuses COPY FROM into a table
--    with row-level security, so tenant isolation of the audit log moves
--    from a policy on the table to a security-barrier view: the tenant role
--    has no privilege on `audit_log` at all and reads only
--    `tenant_audit_log`, which shows the rows of the tenant set in
--    `credbroker.tenant_id` (the same setting the policies of the other
--    tables read). The system role may only INSERT and SELECT, as before.
-- 2. Partitioned by day (UTC) on `at`, so a retention setting drops whole
--    days (`DROP TABLE` of a partition, no row-by-row DELETE) and what a
--    day's inserts touch stays small. The broker creates each day's
--    partition ahead of time. A partitioned table's key must hold the
--    partition column, so the key is (chain_id, seq, at): a record's place
--    in its chain, and its time, which a re-sent batch repeats exactly.
-- 3. `audit_retention` keeps, per chain, the last record a retention cut
--    removed (its seq and hash): `credbroker audit verify` then checks the
--    chain from the oldest retained record on, which must link to it.

ALTER TABLE audit_log RENAME TO audit_log_v8;
ALTER INDEX idx_audit_log_tenant_at RENAME TO idx_audit_log_v8_tenant_at;

CREATE TABLE audit_log (
    id          UUID NOT NULL,
    chain_id    UUID NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq > 0),
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    at          TIMESTAMPTZ NOT NULL,
    tenant_id   UUID,
    body        TEXT NOT NULL,
    PRIMARY KEY (chain_id, seq, at)
) PARTITION BY RANGE (at);
CREATE INDEX idx_audit_log_tenant_at ON audit_log (tenant_id, at DESC, id DESC);

-- One partition per UTC day that holds records, then the records.
DO $$
DECLARE
    d date;
BEGIN
    FOR d IN SELECT DISTINCT (at AT TIME ZONE 'UTC')::date FROM audit_log_v8
             UNION SELECT (now() AT TIME ZONE 'UTC')::date LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)',
            'audit_log_p' || to_char(d, 'YYYYMMDD'),
            d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00');
    END LOOP;
END
$$;
INSERT INTO audit_log (id, chain_id, seq, prev_hash, hash, at, tenant_id, body)
    SELECT id, chain_id, seq, prev_hash, hash, at, tenant_id, body FROM audit_log_v8;
DROP TABLE audit_log_v8;

GRANT SELECT, INSERT ON audit_log TO credbroker_system;

CREATE VIEW tenant_audit_log WITH (security_barrier) AS
    SELECT id, chain_id, seq, prev_hash, hash, at, tenant_id, body
    FROM audit_log
    WHERE tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid;
GRANT SELECT ON tenant_audit_log TO credbroker_tenant;

CREATE TABLE audit_retention (
    chain_id    UUID NOT NULL,
    seq         BIGINT NOT NULL CHECK (seq > 0),
    hash        TEXT NOT NULL,
    cut_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, seq)
);
-- Written by the retention job (as the schema's owner, which drops the
-- partitions); read by `verify`.
GRANT SELECT ON audit_retention TO credbroker_system;
