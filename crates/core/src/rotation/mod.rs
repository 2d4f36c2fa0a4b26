//! What moves credential changes in the core: the subscription hub, the
//! watch stream's state machine and the overlap retire job (the PostgreSQL
//! event listener is an adapter, in the broker binary's crate).

pub mod hub;
pub mod mint;
pub mod opens;
pub mod retire;
pub mod watch;

// ---- configuration: the [rotation] section, owned here (the broker's `config` re-exports it).

/// Rotation settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Overlap when a Rotate names none.
    pub default_overlap_secs: u64,
    /// Longest overlap a Rotate may ask for.
    pub max_overlap_secs: u64,
    /// How often the retire job looks for ended overlaps.
    pub retire_interval_secs: u64,
    /// How often Vault is swept for versions no credential references.
    pub orphan_sweep_interval_secs: u64,
    /// An unreferenced version younger than this is left alone (a Rotate
    /// may have written it and not committed yet).
    pub orphan_grace_secs: u64,
    /// How long events are kept for resuming streams.
    pub event_retention_secs: u64,
    /// Backstop poll of the events table when no notification arrives.
    pub event_poll_secs: u64,
    /// A rotation at the exchange ends the overlap and deletes the old key
    /// as soon as every subscriber that acknowledged a version of the
    /// credential in the last day has acknowledged the new one, instead of
    /// waiting for the overlap's end. Only for fleets whose every pod
    /// acknowledges (the Rust handle, the agent and the Python package do):
    /// a pod that never acknowledges is not counted.
    pub delete_on_adoption: bool,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            default_overlap_secs: 3600,
            max_overlap_secs: 7 * 24 * 3600,
            retire_interval_secs: 15,
            orphan_sweep_interval_secs: 3600,
            orphan_grace_secs: 900,
            event_retention_secs: 7 * 24 * 3600,
            event_poll_secs: 5,
            delete_on_adoption: false,
        }
    }
}
