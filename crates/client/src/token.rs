//! A bearer token read from a file and re-read when the file changes (a
//! projected service-account token, a Vault agent sink, a sidecar that
//! refreshes it), sent as `authorization: Bearer <token>` on every call.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use tonic::{
    Request, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use credbroker_proto::pb::credential_broker_client::CredentialBrokerClient;

/// A broker client that sends the token (if any) on every call.
pub type BrokerClient = CredentialBrokerClient<InterceptedService<Channel, Bearer>>;

/// Wraps a channel into a [`BrokerClient`].
pub fn broker_client(ch: Channel, bearer: Bearer) -> BrokerClient {
    CredentialBrokerClient::with_interceptor(ch, bearer)
}

struct State {
    mtime: Option<SystemTime>,
    checked: Option<Instant>,
    value: Option<AsciiMetadataValue>,
}

/// The token file; cheap to clone.
#[derive(Clone)]
pub struct TokenFile {
    path: Arc<PathBuf>,
    state: Arc<Mutex<State>>,
}

impl TokenFile {
    /// Reads `path` now.
    ///
    /// # Errors
    /// When the file cannot be read or holds no usable token.
    pub fn open(path: PathBuf) -> Result<Self, String> {
        let f = Self {
            path: Arc::new(path),
            state: Arc::new(Mutex::new(State {
                mtime: None,
                checked: None,
                value: None,
            })),
        };
        f.current().ok_or_else(|| {
            format!(
                "token file {}: missing, empty or not a token",
                f.path.display()
            )
        })?;
        Ok(f)
    }

    /// The `authorization` value, re-reading the file at most once a second
    /// when its modification time changed. A file that cannot be read keeps
    /// the last good token.
    fn current(&self) -> Option<AsciiMetadataValue> {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if st
            .checked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            st.checked = Some(Instant::now());
            let mtime = std::fs::metadata(&*self.path)
                .and_then(|m| m.modified())
                .ok();
            if mtime != st.mtime || st.value.is_none() {
                let read = std::fs::read_to_string(&*self.path)
                    .ok()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .and_then(|t| MetadataValue::try_from(format!("Bearer {t}")).ok());
                match read {
                    Some(v) => {
                        st.value = Some(v);
                        st.mtime = mtime;
                    }
                    None => {
                        tracing::warn!(path = %self.path.display(), "cannot read the token file; keeping the last token")
                    }
                }
            }
        }
        st.value.clone()
    }
}

/// Adds the token to each call (nothing without a token file).
#[derive(Clone, Default)]
pub struct Bearer(pub Option<TokenFile>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = self.0.as_ref().and_then(TokenFile::current) {
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_reread_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "first\n").unwrap();
        let f = TokenFile::open(p.clone()).unwrap();
        assert_eq!(f.current().unwrap(), "Bearer first");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, "second").unwrap();
        // Force the next check.
        f.state.lock().unwrap().checked = None;
        assert_eq!(f.current().unwrap(), "Bearer second");
        std::fs::remove_file(&p).unwrap();
        f.state.lock().unwrap().checked = None;
        assert_eq!(
            f.current().unwrap(),
            "Bearer second",
            "last good token kept"
        );
        assert!(TokenFile::open(dir.path().join("missing")).is_err());
    }
}
