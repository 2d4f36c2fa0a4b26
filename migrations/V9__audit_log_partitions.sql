-- credbroker schema v9: the audit sink, cheap and bounded.
--
-- 1. Pages, not rows. A record as its own row costs PostgreSQL a heap
--    tuple, two index entries and their WAL: about 20 µs of CPU per record
--    at 20,000 records/s. The shipper now writes each batch as one *page*
--    per tenant (the records of one chain, one tenant, one batch: about 50
--    on a busy replica), each page one row whose `lines` hold its records,
--    one per line:
--        <seq> <hash> <body>
--    (`body` is the exact canonical JSON the chain hash covers, which holds
--    the record's id and time; a record's `prev_hash` is the hash of the
--    record before it in its chain, so it is not stored twice). The page's
--    columns (its chain, its first and last seq, its time span, its tenant)
--    are what the indexes and the partitions need; `verify` checks each
--    against the records it holds. Batches go in by binary COPY.
-- 2. `audit_log` stays, as a view with one row per record (v5's columns
--    but `prev_hash`), for auditors and tools reading the trail with SQL.
-- 3. Partitioned by UTC day of each page's newest record, so retention
--    drops whole days (`DROP TABLE` of a partition, no row-by-row DELETE).
--    The broker creates each day's partition ahead of time. A partitioned
--    table's key must hold the partition column: (chain_id, last_seq,
--    at_max) names a page.
-- 4. Tenant isolation: PostgreSQL refuses COPY FROM into a table with
--    row-level security, so the audit pages have none; the tenant role has
--    no privilege on them at all and reads only `tenant_audit_pages`, a
--    security-barrier view showing the pages of the tenant set in
--    `credbroker.tenant_id` (the setting the other tables' policies read).
--    The system role may only INSERT and SELECT, as before.
-- 5. `audit_retention` keeps, per chain, the last record a retention cut
--    removed (its seq and hash): `verify` checks the chain from the oldest
--    retained record on, which must link to it.

CREATE TABLE audit_pages (
    chain_id    UUID NOT NULL,
    first_seq   BIGINT NOT NULL CHECK (first_seq > 0),
    last_seq    BIGINT NOT NULL CHECK (last_seq >= first_seq),
    records     INT NOT NULL CHECK (records > 0),
    at_min      TIMESTAMPTZ NOT NULL,
    at_max      TIMESTAMPTZ NOT NULL,
    tenant_id   UUID,
    lines       TEXT NOT NULL,
    PRIMARY KEY (chain_id, last_seq, at_max)
) PARTITION BY RANGE (at_max);
CREATE INDEX idx_audit_pages_tenant_at ON audit_pages (tenant_id, at_max DESC);
-- A page is tens of kilobytes: PostgreSQL compresses it. pglz, the
-- default, costs about four times the CPU of lz4 here (measured: 19.8
-- against 4.7 µs per record for the whole COPY); partitions take the
-- parent's setting. A server built without lz4 keeps pglz.
-- Nothing plans on the text of `lines`: ANALYZE skips it (it would read
-- and decompress every page it samples). Partitions do not take this from
-- the parent: each is set as it is created.
ALTER TABLE audit_pages ALTER COLUMN lines SET STATISTICS 0;
DO $$
BEGIN
    ALTER TABLE audit_pages ALTER COLUMN lines SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available: audit pages are compressed with pglz';
END
$$;

-- One partition per UTC day that holds records (and today).
DO $$
DECLARE
    d date;
BEGIN
    FOR d IN SELECT DISTINCT (at AT TIME ZONE 'UTC')::date FROM audit_log
             UNION SELECT (now() AT TIME ZONE 'UTC')::date LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_pages FOR VALUES FROM (%L) TO (%L)',
            'audit_pages_p' || to_char(d, 'YYYYMMDD'),
            d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00');
        EXECUTE format('ALTER TABLE %I ALTER COLUMN lines SET STATISTICS 0',
            'audit_pages_p' || to_char(d, 'YYYYMMDD'));
    END LOOP;
END
$$;
-- The records shipped before: one page each.
INSERT INTO audit_pages (chain_id, first_seq, last_seq, records, at_min, at_max, tenant_id, lines)
    SELECT chain_id, seq, seq, 1, at, at, tenant_id,
           concat_ws(' ', seq::text, hash, body)
    FROM audit_log;
DROP TABLE audit_log;

GRANT SELECT, INSERT ON audit_pages TO credbroker_system;

-- One row per record, as v5's table had them.
CREATE VIEW audit_log AS
    SELECT r.chain_id,
           (r.body::json ->> 'id')::uuid AS id,
           r.seq,
           r.hash,
           (r.body::json ->> 'timestamp')::timestamptz AS at,
           r.tenant_id,
           r.body
    FROM (SELECT p.chain_id,
                 split_part(l, ' ', 1)::bigint AS seq,
                 split_part(l, ' ', 2) AS hash,
                 p.tenant_id,
                 substring(l FROM '^(?:[^ ]+ ){2}(.*)$') AS body
          FROM audit_pages p, unnest(string_to_array(p.lines, E'\n')) AS l) r;
GRANT SELECT ON audit_log TO credbroker_system;

CREATE VIEW tenant_audit_pages WITH (security_barrier) AS
    SELECT chain_id, first_seq, last_seq, records, at_min, at_max, tenant_id, lines
    FROM audit_pages
    WHERE tenant_id = nullif(current_setting('credbroker.tenant_id', true), '')::uuid;
GRANT SELECT ON tenant_audit_pages TO credbroker_tenant;

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
