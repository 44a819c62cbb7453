//! The TOML configuration: serde structs with defaults, and `validate()`, which names the
//! offending key. Nothing is touched on disk before a config has validated.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::{FolderId, PeerName};
use serde::Deserialize;

mod retriever;
#[cfg(test)]
mod tests;

pub use retriever::{
    DataRetrievalMode, MAX_TENANT_DOMAIN, RetrieverConfig, RetrieverFile, RetrieverSource,
    SCHEMA_ARTISYNC, SCHEMA_WSO2_APIM_32, SUPER_TENANT, Schema, check_tenant_domain,
};

/// A configuration problem, always naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The whole agent configuration (`artisync run --config FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Unique human name of this node in the cluster (logs, status, conflict copy names).
    pub node: PeerName,
    /// gRPC listen address for peers and the health probe.
    pub listen: SocketAddr,
    /// Directory for the index, node id, conflict copies and the admin socket.
    pub state_dir: PathBuf,
    /// Allow plaintext peer connections to non-loopback addresses.
    #[serde(default)]
    pub insecure: bool,
    /// Mutual TLS between peers.
    pub tls: Option<TlsConfig>,
    /// Full rescan of every folder as a backstop for missed watcher events, in seconds.
    #[serde(default = "default_rescan_interval_secs")]
    pub rescan_interval_secs: u64,
    /// Quiet time after a file event with no close-after-write before the path is shipped, ms.
    #[serde(default = "default_quiet_period_ms")]
    pub quiet_period_ms: u64,
    /// A file written to but never closed is shipped after this much quiet time anyway, ms.
    #[serde(default = "default_open_write_hold_ms")]
    pub open_write_hold_ms: u64,
    /// How long deletions are remembered, in days.
    #[serde(default = "default_tombstone_ttl_days")]
    pub tombstone_ttl_days: u64,
    /// Files up to this size travel inline with their index record; larger ones are fetched.
    #[serde(default = "default_inline_max_bytes")]
    pub inline_max_bytes: u64,
    /// A peer change that fails to apply three times in a row is skipped, so the peer's other
    /// changes go on; it is retried after this many ms, doubling each time, never above 1 h.
    #[serde(default = "default_skip_retry_ms")]
    pub skip_retry_ms: u64,
    /// A peer's stamp or version counter further ahead of this node's clock than this many ms
    /// is applied without moving the clock (a wrong clock elsewhere must not drag this one
    /// along); it is reported in status.
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
    #[serde(default, rename = "folder")]
    pub folders: Vec<FolderConfig>,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// `[retriever]` as written in the file; [`Config::parse`] validates it into `retriever`.
    #[serde(rename = "retriever")]
    retriever_file: Option<RetrieverFile>,
    /// DB-backed artifact retrieval, validated and typed (served by the retriever).
    #[serde(skip)]
    pub retriever: Option<RetrieverConfig>,
    /// The Prometheus endpoint; absent: no metrics are served.
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: Prometheus text at `GET /metrics` on its own address. The endpoint is plaintext
/// HTTP without authentication, so a non-loopback address needs `insecure = true` here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address the endpoint listens on, e.g. `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Serve the plaintext endpoint on a non-loopback address (a trusted network, or a
    /// firewall that lets only the Prometheus server in). The top-level `insecure` does not
    /// cover it: that one is about the peers.
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) that signs every peer's certificate.
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    /// Folder id, the same on every node (e.g. `synapse-configs`).
    pub id: FolderId,
    /// Local root directory of the folder.
    pub path: PathBuf,
    /// Extra glob patterns (relative to the root) that are never synced.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Hold `*.xml` files that are not well-formed instead of shipping them.
    #[serde(default = "default_true")]
    pub xml_gate: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's node name (as in its own `node` key).
    pub name: PeerName,
    /// `http://host:port` (plaintext) or `https://host:port` (TLS).
    pub address: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_rescan_interval_secs() -> u64 {
    3600
}
fn default_quiet_period_ms() -> u64 {
    25
}
fn default_open_write_hold_ms() -> u64 {
    10_000
}
fn default_tombstone_ttl_days() -> u64 {
    30
}
fn default_inline_max_bytes() -> u64 {
    256 * 1024
}
fn default_skip_retry_ms() -> u64 {
    60_000
}
fn default_max_clock_skew_ms() -> u64 {
    crate::model::DEFAULT_MAX_CLOCK_SKEW_MS
}

/// Longest allowed inline size: one gRPC message must stay well under tonic's 4 MiB default.
const INLINE_MAX_LIMIT: u64 = 1024 * 1024;
/// The largest `max_clock_skew_ms` accepted: 7 days.
const MAX_CLOCK_SKEW_LIMIT_MS: u64 = 7 * 24 * 3600 * 1000;
/// The largest `tombstone_ttl_days` accepted: 100 years (a larger one overflowed the TTL).
const MAX_TOMBSTONE_TTL_DAYS: u64 = 36_500;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `origin` is only used in messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        config.retriever = match &config.retriever_file {
            Some(r) => Some(r.resolve(&config)?),
            None => None,
        };
        Ok(config)
    }

    /// Checks everything serde cannot: names, paths, addresses, cross-references.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() || !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        if !self.insecure && self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(invalid(
                "listen",
                format!(
                    "{} is not a loopback address: configure [tls] or set insecure = true",
                    self.listen
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            for (key, p) in [
                ("tls.ca", &tls.ca),
                ("tls.cert", &tls.cert),
                ("tls.key", &tls.key),
            ] {
                if !p.is_file() {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        if self.quiet_period_ms == 0 || self.quiet_period_ms > 60_000 {
            return Err(invalid("quiet_period_ms", "must be between 1 and 60000"));
        }
        if self.rescan_interval_secs == 0 {
            return Err(invalid("rescan_interval_secs", "must be at least 1"));
        }
        if !(100..=3_600_000).contains(&self.skip_retry_ms) {
            return Err(invalid(
                "skip_retry_ms",
                "must be between 100 and 3600000 (one hour)",
            ));
        }
        if !(1..=MAX_CLOCK_SKEW_LIMIT_MS).contains(&self.max_clock_skew_ms) {
            return Err(invalid(
                "max_clock_skew_ms",
                format!("must be between 1 and {MAX_CLOCK_SKEW_LIMIT_MS} (7 days)"),
            ));
        }
        if !(1..=MAX_TOMBSTONE_TTL_DAYS).contains(&self.tombstone_ttl_days) {
            return Err(invalid(
                "tombstone_ttl_days",
                format!("must be between 1 and {MAX_TOMBSTONE_TTL_DAYS} (100 years)"),
            ));
        }
        if self.inline_max_bytes > INLINE_MAX_LIMIT {
            return Err(invalid(
                "inline_max_bytes",
                format!("must be at most {INLINE_MAX_LIMIT}"),
            ));
        }
        self.validate_folders()?;
        self.validate_peers()?;
        self.validate_metrics()?;
        if let Some(r) = &self.retriever_file {
            r.resolve(self)?;
        }
        Ok(())
    }

    fn validate_metrics(&self) -> Result<(), ConfigError> {
        let Some(m) = &self.metrics else {
            return Ok(());
        };
        if !m.insecure && !m.listen.ip().is_loopback() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{} is not a loopback address, and the metrics endpoint is plaintext HTTP without authentication: keep it on loopback, or set insecure = true in [metrics]",
                    m.listen
                ),
            ));
        }
        if m.listen.port() != 0 && m.listen == self.listen {
            return Err(invalid(
                "metrics.listen",
                format!("{} is the gRPC `listen` address too", m.listen),
            ));
        }
        Ok(())
    }

    fn validate_folders(&self) -> Result<(), ConfigError> {
        if self.folders.is_empty() && self.retriever_file.is_none() {
            return Err(invalid("folder", "at least one [[folder]] is required"));
        }
        let mut ids = HashSet::new();
        let mut roots: Vec<(&str, PathBuf)> = Vec::new();
        let state = resolve_existing_prefix(&self.state_dir)
            .map_err(|e| invalid("state_dir", format!("{}: {e}", self.state_dir.display())))?;
        for (i, f) in self.folders.iter().enumerate() {
            let key = format!("folder[{i}]");
            if !ids.insert(f.id.as_str()) {
                return Err(invalid(
                    format!("{key}.id"),
                    format!("duplicate folder id {:?}", f.id),
                ));
            }
            if !f.path.is_absolute() {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("{} must be an absolute path", f.path.display()),
                ));
            }
            let meta = std::fs::symlink_metadata(&f.path).map_err(|e| {
                invalid(format!("{key}.path"), format!("{}: {e}", f.path.display()))
            })?;
            if !meta.is_dir() {
                return Err(invalid(
                    format!("{key}.path"),
                    format!("{} is not a directory", f.path.display()),
                ));
            }
            let canonical = f.path.canonicalize().map_err(|e| {
                invalid(format!("{key}.path"), format!("{}: {e}", f.path.display()))
            })?;
            for (other, other_root) in &roots {
                if canonical.starts_with(other_root) || other_root.starts_with(&canonical) {
                    return Err(invalid(
                        format!("{key}.path"),
                        format!("overlaps the path of folder {other:?}"),
                    ));
                }
            }
            // The index, node id, lock and `running` files would be synced to peers (and the
            // agent would trip over its own `running` file): refused whether or not state_dir
            // exists yet. A folder inside state_dir would be synced from beside the index.
            if state.starts_with(&canonical) {
                return Err(invalid(
                    "state_dir",
                    format!(
                        "{} must not lie inside folder {:?} ({})",
                        self.state_dir.display(),
                        f.id,
                        f.path.display()
                    ),
                ));
            }
            if canonical.starts_with(&state) {
                return Err(invalid(
                    "state_dir",
                    format!(
                        "{} must not contain folder {:?} ({})",
                        self.state_dir.display(),
                        f.id,
                        f.path.display()
                    ),
                ));
            }
            for (j, pattern) in f.ignore.iter().enumerate() {
                globset::Glob::new(pattern).map_err(|e| {
                    invalid(
                        format!("{key}.ignore[{j}]"),
                        format!("bad glob {pattern:?}: {e}"),
                    )
                })?;
            }
            roots.push((&f.id, canonical));
        }
        Ok(())
    }

    fn validate_peers(&self) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        for (i, p) in self.peers.iter().enumerate() {
            let key = format!("peer[{i}]");
            if p.name == self.node {
                return Err(invalid(
                    format!("{key}.name"),
                    "a node cannot be its own peer",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("duplicate peer {:?}", p.name),
                ));
            }
            let Some(address) = &p.address else {
                return Err(invalid(
                    format!("{key}.address"),
                    format!("peer {:?} has no address", p.name),
                ));
            };
            self.check_address(&format!("{key}.address"), address)?;
        }
        Ok(())
    }

    /// An `http://` or `https://` address with a host and port; plaintext only on loopback
    /// unless `insecure`, TLS only with `[tls]`.
    pub fn check_address(&self, key: &str, address: &str) -> Result<(), ConfigError> {
        let (secure, host) = parse_peer_address(address).map_err(|p| invalid(key, p))?;
        if secure && self.tls.is_none() {
            return Err(invalid(
                key,
                format!("{address} uses https but there is no [tls] section"),
            ));
        }
        if !secure && !self.insecure && !host_is_loopback(&host) {
            return Err(invalid(
                key,
                format!(
                    "{address} is plaintext to a non-loopback host: use https with [tls], or set insecure = true"
                ),
            ));
        }
        Ok(())
    }

    pub fn rescan_interval(&self) -> Duration {
        Duration::from_secs(self.rescan_interval_secs)
    }

    pub fn quiet_period(&self) -> Duration {
        Duration::from_millis(self.quiet_period_ms)
    }

    pub fn open_write_hold(&self) -> Duration {
        Duration::from_millis(self.open_write_hold_ms)
    }

    pub fn tombstone_ttl(&self) -> Duration {
        Duration::from_secs(self.tombstone_ttl_days * 24 * 3600)
    }

    pub fn folder(&self, id: &str) -> Option<&FolderConfig> {
        self.folders.iter().find(|f| f.id == id)
    }

    /// Path of the admin socket in `state_dir`.
    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }
}

/// `path` (absolute) with `.` and `..` resolved lexically, then its longest existing ancestor
/// canonicalized (symlinks resolved) and the rest appended: where the path is, or will be once
/// created, comparable with canonical folder roots.
fn resolve_existing_prefix(path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut lexical = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    let mut existing = lexical.as_path();
    let mut rest = Vec::new();
    loop {
        match existing.canonicalize() {
            Ok(mut resolved) => {
                resolved.extend(rest.iter().rev());
                return Ok(resolved);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e);
                };
                rest.push(name);
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

pub use crate::model::valid_name;

/// Splits a peer address into (uses TLS, host). Errors name the problem.
pub fn parse_peer_address(address: &str) -> Result<(bool, String), String> {
    let (secure, rest) = if let Some(r) = address.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = address.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(format!("{address:?} must start with http:// or https://"));
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!(
            "{address:?} must be scheme://host:port with no path"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (h, p) = bracketed
            .split_once("]:")
            .ok_or_else(|| format!("{address:?}: expected [ipv6]:port"))?;
        (h.to_owned(), p)
    } else {
        let (h, p) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("{address:?} has no port"))?;
        (h.to_owned(), p)
    };
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    port.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{address:?} has an invalid port {port:?}"))?;
    Ok((secure, host))
}

fn host_is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}
