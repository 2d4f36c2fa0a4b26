-- credbroker schema v3: what the read path needs to be race-free and cheap.
--
-- * event_seq: the seq of the newest event that describes this row. The
--   cache keeps it with each entry and refuses to insert a loaded row older
--   than an event it has already applied for that credential (a load that
--   raced a rotation can never put the replaced set back). Every transaction
--   that appends an event sets it in the same transaction.
-- * rotation_acks.subscriber holds a SPIFFE ID (at most 2,048 bytes, the
--   spec's limit) plus '#' and an instance name of at most 128 characters.
-- * credbroker_read_credential(): the GetCredentials miss in one round trip.
--   It switches to the tenant role and tenant for the rest of its (implicit,
--   single-statement) transaction and reads the row under row-level
--   security, exactly as the explicit transaction did in six round trips.
--   It is SECURITY INVOKER (the default): it can only narrow what the
--   caller may see, never widen it.

ALTER TABLE tenant_credentials ADD COLUMN event_seq BIGINT NOT NULL DEFAULT 0;

-- Rows written before this migration take their newest surviving event.
UPDATE tenant_credentials c SET event_seq = coalesce(
    (SELECT max(e.seq) FROM credential_events e
      WHERE e.tenant_id = c.tenant_id AND e.exchange = c.exchange), 0);

CREATE FUNCTION credbroker_read_credential(p_tenant uuid, p_exchange text)
RETURNS SETOF tenant_credentials
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('role', 'credbroker_tenant', true);
    PERFORM set_config('credbroker.tenant_id', p_tenant::text, true);
    RETURN QUERY SELECT * FROM tenant_credentials
        WHERE tenant_id = p_tenant AND exchange = p_exchange;
END
$$;

ALTER TABLE rotation_acks ALTER COLUMN subscriber TYPE VARCHAR(2200);
