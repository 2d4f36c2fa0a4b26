//! credbroker's gRPC contract: the generated protobuf types and gRPC stubs
//! of `credbroker.v1` ([`pb`]), with a hand-written Debug that redacts the
//! secrets of the messages that carry them, and the descriptor set server
//! reflection serves. Shared by the server (`credbroker`) and the client
//! (`credbroker-client`), so a pod's handle does not build the server.

#![forbid(unsafe_code)]

pub mod codec;

/// Generated protobuf types and gRPC stubs of `credbroker.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
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
                        .map(|u| super::masked(&u))
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
                .field(
                    "api_key",
                    &credbroker_core::broker::types::key_hint(&self.api_key),
                )
                .field("api_secret", &"[REDACTED]")
                .field(
                    "passphrase",
                    &self.passphrase.as_ref().map(|_| "[REDACTED]"),
                )
                .finish()
        }
    }
}

/// `scheme://host[:port]/…`: what may be shown or logged of a URL that may
/// carry a secret (a webhook receiver's).
pub fn masked(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(p) => format!("{}://{host}:{p}/…", url.scheme()),
        None => format!("{}://{host}/…", url.scheme()),
    }
}
