-- credbroker schema v10: each event names the call that made it.
--
-- The request id is the one the call's audit records carry (and the
-- caller's `x-request-id`): an auditor joins the event log to the audit
-- trail with it, and a replica that restarts writes the outcome record of
-- a call whose change committed but whose outcome record was lost (a crash
-- while its spool could not be written) from the event.
ALTER TABLE credential_events ADD COLUMN request_id UUID;
