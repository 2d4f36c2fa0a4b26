# The least-privilege Vault/OpenBao policy credbroker needs (KV v2 mounted at
# `secret/`, vault.prefix = "tenants"). Tested: tests/it/vault_policy.rs runs
# every broker flow with a token that has exactly this policy and no other.

# Credential sets and webhook signing secrets: write new versions (check-and-
# set), read any version.
path "secret/data/tenants/*" {
  capabilities = ["create", "read", "update"]
}

# Rotation at the exchange: each tenant's management key (a master
# account's key that creates and deletes its sub-account's API keys), the
# key a rotation minted, until it is stored as a credential version, and
# the replaced key's set where deleting it takes its passphrase (KuCoin),
# until it is deleted at the exchange.
# Listed on their own so a deployment can grant them to the broker alone
# (the broad stanza above already covers them for this token).
path "secret/data/tenants/+/exchanges/+/management" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/tenants/+/exchanges/+/minted" {
  capabilities = ["create", "read", "update"]
}
path "secret/data/tenants/+/exchanges/+/retiring" {
  capabilities = ["create", "read", "update"]
}

# A replaced key's set, kept from the end of its overlap while the health
# checks ask the exchange whether it still works there ([checks]
# watch_replaced_keys); destroyed once the exchange refuses it.
path "secret/data/tenants/+/exchanges/+/replaced" {
  capabilities = ["create", "read", "update"]
}

# Versions of a path (latest version for check-and-set, the orphan sweep's
# view), and DeleteCredentials' purge of a whole path.
path "secret/metadata/tenants/*" {
  capabilities = ["read", "list", "delete"]
}

# The orphan sweep lists the tenants.
path "secret/metadata/tenants" {
  capabilities = ["list"]
}

# Retiring a previous version destroys it for good.
path "secret/destroy/tenants/*" {
  capabilities = ["update"]
}

# The health probe looks up its own token; a periodic token renews itself.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
