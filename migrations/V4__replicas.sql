-- credbroker schema v4: live replicas, so per-tenant rate limits hold for
-- the whole deployment (each replica enforces limit / live replicas).
-- A replica refreshes its row every few seconds; rows not refreshed for a
-- minute no longer count and are removed by the next replica that looks.
CREATE TABLE broker_replicas (
    replica_id    UUID PRIMARY KEY,
    heartbeat_at  TIMESTAMPTZ NOT NULL
);
ALTER TABLE broker_replicas ENABLE ROW LEVEL SECURITY;
ALTER TABLE broker_replicas FORCE ROW LEVEL SECURITY;
CREATE POLICY system_all ON broker_replicas TO credbroker_system USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE, DELETE ON broker_replicas TO credbroker_system;
