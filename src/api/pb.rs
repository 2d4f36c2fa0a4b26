//! Generated protobuf types and gRPC stubs of `credbroker.v1`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("credbroker.v1");

/// The encoded descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/credbroker_descriptor.bin"));

impl std::fmt::Debug for SetWebhookRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetWebhookRequest")
            .field("tenant_id", &self.tenant_id)
            // A receiver's URL may carry its secret: the host only.
            .field(
                "url",
                &url::Url::parse(&self.url)
                    .map(|u| crate::webhook::target::masked(&u))
                    .unwrap_or_else(|_| "[REDACTED]".into()),
            )
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

impl std::fmt::Debug for SetWebhookResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetWebhookResponse")
            .field("url", &self.url)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

impl std::fmt::Debug for CredentialSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSet")
            .field("api_key", &crate::broker::types::key_hint(&self.api_key))
            .field("api_secret", &"[REDACTED]")
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "[REDACTED]"),
            )
            .finish()
    }
}
