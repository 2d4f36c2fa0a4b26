-- A webhook URL can carry the receiver's secret in its path or query (Slack
-- and Discord put one there). From this version on the URL is kept with the
-- signing secret in Vault, and PostgreSQL keeps only its host, for display.
-- URLs stored before are cut down to their host here: such an endpoint must
-- be set again (SetWebhook) before its messages are delivered; until then
-- each attempt fails with "set the webhook again" and is retried.
ALTER TABLE tenant_webhooks RENAME COLUMN url TO host;
UPDATE tenant_webhooks
   SET host = coalesce(
       substring(host from '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?(\[[^]]*\]|[^/?#:]*)'),
       '');
