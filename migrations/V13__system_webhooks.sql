-- credbroker schema v13: the key-rotation job (the system role) queues the
-- tenant's webhooks about its rotations at the exchange
-- (credential.rotation_failed, credential.rotation_stuck) in the same
-- transaction as the rotation's step.
GRANT INSERT ON webhook_outbox TO credbroker_system;
