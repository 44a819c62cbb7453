//! The TOML configuration: serde structs with defaults, and `validate()`, which names the
//! offending key. Nothing is touched on disk before a config has validated.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    pub node: String,
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
    pub id: String,
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
    pub name: String,
    /// `http://host:port` (plaintext) or `https://host:port` (TLS).
    pub address: Option<String>,
}

/// `[retriever]` as the file spells it (the config contract). Modes are strings here and
/// fields are optional because each is needed in some modes only; `RetrieverFile::resolve`
/// checks it once and turns it into the typed [`RetrieverConfig`] the rest of the agent uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrieverFile {
    /// `db` (this node reads the database) or `hub` (it asks an agent that does).
    #[serde(default = "default_retriever_kind")]
    pub artifact_retriever: String,
    /// Which tables the database holds (mode `db` only): `artisync` (its own artifact store,
    /// created by migrations) or `wso2-apim-3.2` (WSO2 API-M 3.2's `AM_GW_API_ARTIFACTS`,
    /// read only; never written or migrated).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Folder id that artifacts deploy into (with WSO2's tables: the super tenant's APIs).
    #[serde(default = "default_retriever_folder")]
    pub folder: String,
    /// `[retriever.tenants]`: WSO2 tenant domain -> id of the `[[folder]]` its APIs deploy
    /// into (the folder on `repository/tenants/<tenant id>/synapse-configs`), e.g.
    /// `"wso2.com" = "tenant-1-synapse"`. The super tenant `carbon.super` always deploys into
    /// `folder` and cannot be listed; an API of a tenant not listed fails, naming the tenant.
    /// The folders listed are this node's target folders beside `folder` in every mode.
    #[serde(default)]
    pub tenants: BTreeMap<String, String>,
    /// `sqlite://...`, `postgres://...` or `mysql://...` (mode `db`).
    pub database_url: Option<String>,
    /// Address of the hub agent (mode `hub`).
    pub hub: Option<String>,
    /// Labels this node deploys.
    #[serde(default)]
    pub gateway_labels: Vec<String>,
    /// First retry delay in ms; doubles per failure, capped at one hour.
    #[serde(default = "default_retry_ms")]
    pub deployment_retry_duration: u64,
    #[serde(default = "default_max_retry_count")]
    pub max_retry_count: u32,
    /// `sync` (health NOT_SERVING until the start-up deploy is done) or `async`.
    #[serde(default = "default_retrieval_mode")]
    pub data_retrieval_mode: String,
    /// Sync mode: tries a failing artifact gets before the node serves without it (it keeps
    /// retrying in the background); 0.5 s, then doubling, between tries.
    #[serde(default = "default_startup_attempts")]
    pub startup_attempts: u32,
    /// Wait after an event before fetching, in ms.
    #[serde(default = "default_event_waiting_time")]
    pub event_waiting_time: u64,
    /// Full reconcile against the DB, in seconds.
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval: u64,
    /// How often the event table (or the hub) is polled, in ms. PostgreSQL also wakes the
    /// retriever at once through LISTEN/NOTIFY; polling stays as the safety net.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: u64,
    /// Names of the publisher certificates (`artisync cert publisher --name N`) whose publish
    /// and remove this agent takes over `[tls]` (mode `db` with artisync's own store). A node
    /// certificate never may publish; without `[tls]`, only callers on this machine may.
    #[serde(default)]
    pub publishers: Vec<String>,
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
fn default_retriever_kind() -> String {
    "db".into()
}
fn default_schema() -> String {
    SCHEMA_ARTISYNC.into()
}
fn default_retriever_folder() -> String {
    "synapse-configs".into()
}
fn default_retry_ms() -> u64 {
    15_000
}
fn default_max_retry_count() -> u32 {
    5
}
fn default_retrieval_mode() -> String {
    "async".into()
}
fn default_startup_attempts() -> u32 {
    3
}
fn default_event_waiting_time() -> u64 {
    1
}
fn default_reconcile_interval() -> u64 {
    300
}
fn default_poll_interval() -> u64 {
    200
}

/// DB-backed artifact retrieval, validated: the typed form of `[retriever]`.
#[derive(Debug, Clone)]
pub struct RetrieverConfig {
    /// Where artifacts come from (`artifact_retriever` with `database_url` and `schema`, or
    /// `hub`).
    pub source: RetrieverSource,
    /// Folder id that artifacts deploy into (a configured `[[folder]]`); with WSO2's tables,
    /// the super tenant's APIs.
    pub folder: String,
    /// WSO2 tenant domain (lower case) -> the `[[folder]]` its APIs deploy into; never
    /// [`SUPER_TENANT`], never `folder`, one folder per tenant.
    pub tenants: BTreeMap<String, String>,
    /// Labels this node deploys (none: every label).
    pub gateway_labels: Vec<String>,
    /// First retry delay in ms; doubles per failure, capped at one hour.
    pub deployment_retry_duration: u64,
    pub max_retry_count: u32,
    /// When the health service reports SERVING.
    pub data_retrieval_mode: DataRetrievalMode,
    /// Sync mode: tries each failing artifact gets before the node serves without it.
    pub startup_attempts: u32,
    /// Wait after an event before fetching, in ms.
    pub event_waiting_time: u64,
    /// Full reconcile against the source, in seconds.
    pub reconcile_interval: u64,
    /// How often the event table (or the hub) is polled, in ms.
    pub poll_interval: u64,
    /// Publisher certificate names whose publish and remove this agent takes (only with
    /// [`RetrieverSource::Db`] and [`Schema::Artisync`]; empty otherwise).
    pub publishers: Vec<String>,
}

/// `artifact_retriever`: where a retriever reads artifacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetrieverSource {
    /// `"db"`: this node reads the database at `database_url`, holding `schema`'s tables.
    Db { url: String, schema: Schema },
    /// `"hub"`: this node asks the agent at `hub`, which has the database.
    Hub { address: String },
}

/// `retriever.schema`: which tables the database holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// artisync's own artifact store, created by migrations.
    Artisync,
    /// WSO2 API-M 3.2's `AM_GW_API_ARTIFACTS`, read only; never written or migrated.
    Wso2Apim32,
}

impl Schema {
    /// The value as the config file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Schema::Artisync => SCHEMA_ARTISYNC,
            Schema::Wso2Apim32 => SCHEMA_WSO2_APIM_32,
        }
    }
}

impl std::fmt::Display for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `retriever.data_retrieval_mode`: whether health waits for the start-up deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRetrievalMode {
    /// `"sync"`: NOT_SERVING until the start-up deploy is done.
    Sync,
    /// `"async"`: SERVING at once; the start-up deploy runs in the background.
    Async,
}

impl DataRetrievalMode {
    /// The value as the config file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            DataRetrievalMode::Sync => "sync",
            DataRetrievalMode::Async => "async",
        }
    }
}

impl std::fmt::Display for DataRetrievalMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WSO2's super tenant, whose APIs deploy into `retriever.folder`.
pub const SUPER_TENANT: &str = "carbon.super";
/// Longest tenant domain accepted (WSO2 keeps it in a `VARCHAR(255)`).
pub const MAX_TENANT_DOMAIN: usize = 255;

/// `retriever.schema`: artisync's own artifact store.
pub const SCHEMA_ARTISYNC: &str = "artisync";
/// `retriever.schema`: WSO2 API-M 3.2's gateway artifact tables, read only.
pub const SCHEMA_WSO2_APIM_32: &str = "wso2-apim-3.2";

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
        if !valid_name(&self.node) {
            return Err(invalid(
                "node",
                format!(
                    "{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    self.node
                ),
            ));
        }
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
            if !valid_name(&f.id) {
                return Err(invalid(
                    format!("{key}.id"),
                    format!(
                        "{:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                        f.id
                    ),
                ));
            }
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
            if !valid_name(&p.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} is not a valid node name", p.name),
                ));
            }
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

impl RetrieverConfig {
    /// `data_retrieval_mode = "sync"`: health waits for the start-up deploy.
    pub fn sync_start(&self) -> bool {
        self.data_retrieval_mode == DataRetrievalMode::Sync
    }

    /// Every folder id this retriever deploys into: `folder`, then each tenant's.
    pub fn target_folders(&self) -> Vec<&str> {
        let mut out = vec![self.folder.as_str()];
        out.extend(self.tenants.values().map(String::as_str));
        out
    }

    /// The database holds WSO2 API-M 3.2's tables (read only) rather than artisync's own.
    pub fn is_wso2(&self) -> bool {
        matches!(
            self.source,
            RetrieverSource::Db {
                schema: Schema::Wso2Apim32,
                ..
            }
        )
    }
}

impl RetrieverFile {
    /// Checks `[retriever]` (naming the offending key) and returns its typed form. Long but
    /// flat: one check per key, in the order the checks have always run (the first error wins).
    fn resolve(&self, config: &Config) -> Result<RetrieverConfig, ConfigError> {
        let source = match self.artifact_retriever.as_str() {
            "db" => {
                let Some(url) = &self.database_url else {
                    return Err(invalid(
                        "retriever.database_url",
                        "required when artifact_retriever = \"db\"",
                    ));
                };
                let scheme = url.split(':').next().unwrap_or_default();
                if !matches!(
                    scheme,
                    "sqlite" | "postgres" | "postgresql" | "mysql" | "mariadb"
                ) {
                    return Err(invalid(
                        "retriever.database_url",
                        "must start with sqlite:, postgres://, postgresql:// or mysql://",
                    ));
                }
                RetrieverSource::Db {
                    url: url.clone(),
                    schema: Schema::Artisync,
                }
            }
            "hub" => {
                let Some(hub) = &self.hub else {
                    return Err(invalid(
                        "retriever.hub",
                        "required when artifact_retriever = \"hub\"",
                    ));
                };
                config.check_address("retriever.hub", hub)?;
                RetrieverSource::Hub {
                    address: hub.clone(),
                }
            }
            other => {
                return Err(invalid(
                    "retriever.artifact_retriever",
                    format!("{other:?} must be \"db\" or \"hub\""),
                ));
            }
        };
        let source = match (self.schema.as_str(), source) {
            (SCHEMA_ARTISYNC, source) => source,
            (SCHEMA_WSO2_APIM_32, RetrieverSource::Db { url, .. }) => RetrieverSource::Db {
                url,
                schema: Schema::Wso2Apim32,
            },
            (SCHEMA_WSO2_APIM_32, RetrieverSource::Hub { .. }) => {
                return Err(invalid(
                    "retriever.schema",
                    format!(
                        "{SCHEMA_WSO2_APIM_32:?} needs artifact_retriever = \"db\" (the tables are \
                         read from the database); a hub subscriber gets the rendered WSO2 \
                         artifacts from its hub and sets no schema"
                    ),
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "retriever.schema",
                    format!("{other:?} must be {SCHEMA_ARTISYNC:?} or {SCHEMA_WSO2_APIM_32:?}"),
                ));
            }
        };
        self.validate_publishers(config, &source)?;
        if config.folder(&self.folder).is_none() {
            return Err(invalid(
                "retriever.folder",
                format!("no [[folder]] has id {:?}", self.folder),
            ));
        }
        let tenants = self.resolve_tenants(config)?;
        let data_retrieval_mode = match self.data_retrieval_mode.as_str() {
            "sync" => DataRetrievalMode::Sync,
            "async" => DataRetrievalMode::Async,
            _ => {
                return Err(invalid(
                    "retriever.data_retrieval_mode",
                    "must be \"sync\" or \"async\"",
                ));
            }
        };
        if self.gateway_labels.iter().any(|l| l.trim().is_empty()) {
            return Err(invalid(
                "retriever.gateway_labels",
                "labels must not be empty",
            ));
        }
        if self.poll_interval == 0 || self.poll_interval > 60_000 {
            return Err(invalid(
                "retriever.poll_interval",
                "must be between 1 and 60000 ms",
            ));
        }
        if self.reconcile_interval == 0 {
            return Err(invalid(
                "retriever.reconcile_interval",
                "must be at least 1 s",
            ));
        }
        if self.deployment_retry_duration == 0 {
            return Err(invalid(
                "retriever.deployment_retry_duration",
                "must be at least 1 ms",
            ));
        }
        if !(1..=10).contains(&self.startup_attempts) {
            return Err(invalid(
                "retriever.startup_attempts",
                "must be between 1 and 10",
            ));
        }
        Ok(RetrieverConfig {
            source,
            folder: self.folder.clone(),
            tenants,
            gateway_labels: self.gateway_labels.clone(),
            deployment_retry_duration: self.deployment_retry_duration,
            max_retry_count: self.max_retry_count,
            data_retrieval_mode,
            startup_attempts: self.startup_attempts,
            event_waiting_time: self.event_waiting_time,
            reconcile_interval: self.reconcile_interval,
            poll_interval: self.poll_interval,
            publishers: self.publishers.clone(),
        })
    }

    /// Checks `[retriever.tenants]`: each domain a plausible tenant domain (kept lower case, as
    /// WSO2 keeps them), not the super tenant, mapped to a configured `[[folder]]` that is
    /// neither `retriever.folder` nor another tenant's (a tenant's APIs in another tenant's
    /// `synapse-configs` would be served as that tenant's).
    fn resolve_tenants(&self, config: &Config) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut out = BTreeMap::new();
        let mut by_folder: BTreeMap<&str, &str> = BTreeMap::new();
        for (domain, folder) in &self.tenants {
            let shown: String = domain.chars().take(80).collect();
            let key = format!("retriever.tenants.{shown:?}");
            if let Err(problem) = check_tenant_domain(domain) {
                return Err(invalid(key, format!("tenant domain {problem}")));
            }
            let lower = domain.to_ascii_lowercase();
            if lower == SUPER_TENANT {
                return Err(invalid(
                    key,
                    format!(
                        "the super tenant's APIs always deploy into retriever.folder {:?};                          set retriever.folder instead",
                        self.folder
                    ),
                ));
            }
            if config.folder(folder).is_none() {
                return Err(invalid(
                    key,
                    format!(
                        "tenant {lower:?} maps to folder {folder:?}, but no [[folder]] has that id                          (add one on repository/tenants/<tenant id>/synapse-configs)"
                    ),
                ));
            }
            if *folder == self.folder {
                return Err(invalid(
                    key,
                    format!(
                        "tenant {lower:?} maps to folder {folder:?}, which is retriever.folder, the                          super tenant's: its APIs would be served as the super tenant's; give it                          the [[folder]] on repository/tenants/<tenant id>/synapse-configs"
                    ),
                ));
            }
            if let Some(other) = by_folder.insert(folder, domain) {
                return Err(invalid(
                    key,
                    format!(
                        "tenant {lower:?} maps to folder {folder:?}, as tenant {other:?} does: each                          tenant has its own synapse-configs"
                    ),
                ));
            }
            if out.insert(lower.clone(), folder.clone()).is_some() {
                return Err(invalid(
                    key,
                    format!("tenant {lower:?} is listed twice (tenant domains ignore case)"),
                ));
            }
        }
        Ok(out)
    }

    fn validate_publishers(
        &self,
        config: &Config,
        source: &RetrieverSource,
    ) -> Result<(), ConfigError> {
        if self.publishers.is_empty() {
            return Ok(());
        }
        let key = "retriever.publishers";
        let own_store = matches!(
            source,
            RetrieverSource::Db {
                schema: Schema::Artisync,
                ..
            }
        );
        if !own_store {
            return Err(invalid(
                key,
                "only an agent with artifact_retriever = \"db\" and artisync's own schema takes \
                 publishes",
            ));
        }
        if config.tls.is_none() {
            return Err(invalid(
                key,
                "publisher certificates need [tls]; without it only callers on this machine may \
                 publish",
            ));
        }
        let mut seen = HashSet::new();
        for (i, name) in self.publishers.iter().enumerate() {
            if !valid_name(name) {
                return Err(invalid(
                    format!("{key}[{i}]"),
                    format!(
                        "{name:?} must be 1-64 characters of letters, digits, '-', '_' or '.' \
                         (the --name given to `artisync cert publisher`)"
                    ),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(invalid(
                    format!("{key}[{i}]"),
                    format!("duplicate publisher {name:?}"),
                ));
            }
        }
        Ok(())
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

/// Checks a WSO2 tenant domain (from the config or a database row): non-empty, at most
/// [`MAX_TENANT_DOMAIN`] bytes, no whitespace or control characters. The problem, if any.
pub fn check_tenant_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("must not be empty");
    }
    if domain.len() > MAX_TENANT_DOMAIN {
        return Err("is longer than 255 bytes");
    }
    if domain.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("contains whitespace or control characters");
    }
    Ok(())
}

/// A node, folder or publisher name: 1-64 letters, digits, '-', '_' or '.'.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> String {
        format!(
            "node = \"gw1\"\nlisten = \"127.0.0.1:7701\"\nstate_dir = \"{}/state\"\n\n[[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n",
            dir.display(),
            dir.join("sc").display()
        )
    }

    fn setup() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sc")).expect("mkdir");
        dir
    }

    fn err_of(text: &str) -> String {
        match Config::parse(text, Path::new("test.toml")) {
            Ok(_) => panic!("config should have been refused:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let dir = setup();
        let c = Config::parse(&base(dir.path()), Path::new("t")).expect("valid");
        assert_eq!(c.quiet_period_ms, 25);
        assert_eq!(c.rescan_interval_secs, 3600);
        assert_eq!(c.folders[0].id, "synapse-configs");
        assert!(c.folders[0].xml_gate);
        assert_eq!(c.skip_retry_ms, 60_000);
    }

    #[test]
    fn skip_retry_out_of_range_is_named() {
        let dir = setup();
        for bad in ["0", "99", "3600001"] {
            let e = err_of(&format!("skip_retry_ms = {bad}\n{}", base(dir.path())));
            assert!(e.contains("skip_retry_ms"), "{e}");
        }
        let text = format!("skip_retry_ms = 500\n{}", base(dir.path()));
        let c = Config::parse(&text, Path::new("t")).expect("valid");
        assert_eq!(c.skip_retry_ms, 500);
    }

    /// Found with the config fuzz harness (tests/fuzz/config/): a TTL of more days than fit in a u64 of seconds
    /// passed check-config, then overflowed when the daemon computed it (wrapped in a
    /// release build, to a TTL that purges tombstones early); 0 purged every tombstone.
    #[test]
    fn tombstone_ttl_out_of_range_is_named() {
        let dir = setup();
        for bad in ["0", "36501", "9223372036854775807"] {
            let e = err_of(&format!("tombstone_ttl_days = {bad}\n{}", base(dir.path())));
            assert!(e.contains("tombstone_ttl_days"), "{e}");
        }
        let text = format!("tombstone_ttl_days = 36500\n{}", base(dir.path()));
        let c = Config::parse(&text, Path::new("t")).expect("valid");
        assert_eq!(c.tombstone_ttl().as_secs(), 36_500 * 24 * 3600);
    }

    #[test]
    fn max_clock_skew_defaults_to_five_minutes_and_out_of_range_is_named() {
        let dir = setup();
        let c = Config::parse(&base(dir.path()), Path::new("t")).expect("valid");
        assert_eq!(c.max_clock_skew_ms, 300_000);
        for bad in ["0", "604800001"] {
            let e = err_of(&format!("max_clock_skew_ms = {bad}\n{}", base(dir.path())));
            assert!(e.contains("max_clock_skew_ms"), "{e}");
        }
        let text = format!("max_clock_skew_ms = 2000\n{}", base(dir.path()));
        let c = Config::parse(&text, Path::new("t")).expect("valid");
        assert_eq!(c.max_clock_skew_ms, 2000);
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = setup();
        let e = err_of(&format!("{}colour = \"blue\"\n", base(dir.path())));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn missing_folder_path_is_named() {
        let dir = setup();
        let text = base(dir.path()).replace("/sc\"", "/nope\"");
        let e = err_of(&text);
        assert!(e.contains("folder[0].path") && e.contains("nope"), "{e}");
    }

    #[test]
    fn duplicate_folder_id_is_named() {
        let dir = setup();
        std::fs::create_dir(dir.path().join("ep")).expect("mkdir");
        let e = err_of(&format!(
            "{}\n[[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n",
            base(dir.path()),
            dir.path().join("ep").display()
        ));
        assert!(e.contains("folder[1].id") && e.contains("duplicate"), "{e}");
    }

    #[test]
    fn peer_problems_are_named() {
        let dir = setup();
        let b = base(dir.path());
        let e = err_of(&format!("{b}\n[[peer]]\nname = \"gw2\"\n"));
        assert!(e.contains("peer[0].address"), "{e}");
        let e = err_of(&format!(
            "{b}\n[[peer]]\nname = \"gw2\"\naddress = \"gw2:7701\"\n"
        ));
        assert!(e.contains("http://"), "{e}");
        let e = err_of(&format!(
            "{b}\n[[peer]]\nname = \"gw2\"\naddress = \"http://10.1.2.3:7701\"\n"
        ));
        assert!(e.contains("non-loopback"), "{e}");
        let e = err_of(&format!(
            "{b}\n[[peer]]\nname = \"gw2\"\naddress = \"http://127.0.0.1:x\"\n"
        ));
        assert!(e.contains("invalid port"), "{e}");
        let e = err_of(&format!(
            "{b}\n[[peer]]\nname = \"gw1\"\naddress = \"http://127.0.0.1:1\"\n"
        ));
        assert!(e.contains("own peer"), "{e}");
    }

    #[test]
    fn metrics_are_off_by_default_and_a_non_loopback_endpoint_needs_its_own_insecure() {
        let dir = setup();
        let b = base(dir.path());
        let c = Config::parse(&b, Path::new("t")).expect("no [metrics]");
        assert!(c.metrics.is_none());
        let c = Config::parse(
            &format!("{b}\n[metrics]\nlisten = \"127.0.0.1:9464\"\n"),
            Path::new("t"),
        )
        .expect("loopback");
        assert_eq!(
            c.metrics.map(|m| m.listen.to_string()).as_deref(),
            Some("127.0.0.1:9464")
        );
        let open = format!("{b}\n[metrics]\nlisten = \"0.0.0.0:9464\"\n");
        let e = err_of(&open);
        assert!(
            e.contains("`metrics.listen`") && e.contains("plaintext") && e.contains("insecure"),
            "{e}"
        );
        // The peers' insecure does not cover the metrics endpoint.
        let e = err_of(&open.replace("node = \"gw1\"", "node = \"gw1\"\ninsecure = true"));
        assert!(e.contains("`metrics.listen`"), "{e}");
        Config::parse(&format!("{open}insecure = true\n"), Path::new("t"))
            .expect("metrics.insecure allows it");
        let e = err_of(&format!("{b}\n[metrics]\nlisten = \"127.0.0.1:7701\"\n"));
        assert!(e.contains("gRPC `listen`"), "{e}");
        let e = err_of(&format!(
            "{b}\n[metrics]\nlisten = \"127.0.0.1:9464\"\npath = \"/m\"\n"
        ));
        assert!(e.contains("unknown field") && e.contains("path"), "{e}");
    }

    #[test]
    fn non_loopback_listen_needs_tls_or_insecure() {
        let dir = setup();
        let text = base(dir.path()).replace("127.0.0.1:7701", "0.0.0.0:7701");
        assert!(err_of(&text).contains("`listen`"));
        let ok = text.replace("node = \"gw1\"", "node = \"gw1\"\ninsecure = true");
        Config::parse(&ok, Path::new("t")).expect("insecure allows it");
    }

    #[test]
    fn bad_ignore_glob_and_overlapping_folders_are_named() {
        let dir = setup();
        let e = err_of(&format!("{}ignore = [\"a[\"]\n", base(dir.path())));
        assert!(e.contains("folder[0].ignore[0]"), "{e}");
        std::fs::create_dir(dir.path().join("sc/inner")).expect("mkdir");
        let e = err_of(&format!(
            "{}\n[[folder]]\nid = \"inner\"\npath = \"{}\"\n",
            base(dir.path()),
            dir.path().join("sc/inner").display()
        ));
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn retriever_is_validated() {
        let dir = setup();
        let b = base(dir.path());
        let e = err_of(&format!("{b}\n[retriever]\nartifact_retriever = \"db\"\n"));
        assert!(e.contains("retriever.database_url"), "{e}");
        let e = err_of(&format!(
            "{b}\n[retriever]\ndatabase_url = \"oracle://x\"\n"
        ));
        assert!(e.contains("retriever.database_url"), "{e}");
        let e = err_of(&format!(
            "{b}\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\nfolder = \"nope\"\n"
        ));
        assert!(e.contains("retriever.folder"), "{e}");
    }

    #[test]
    fn retriever_tenants_map_domains_to_folders_and_mistakes_are_named() {
        let dir = setup();
        std::fs::create_dir_all(dir.path().join("t1")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("t2")).expect("mkdir");
        let b = format!(
            "{}\n[[folder]]\nid = \"tenant-1\"\npath = \"{}\"\n\n[[folder]]\nid = \"tenant-2\"\npath = \"{}\"\n",
            base(dir.path()),
            dir.path().join("t1").display(),
            dir.path().join("t2").display()
        );
        let db =
            "\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\nschema = \"wso2-apim-3.2\"\n";
        let c = Config::parse(
            &format!("{b}{db}\n[retriever.tenants]\n\"WSO2.com\" = \"tenant-1\"\n\"acme.org\" = \"tenant-2\"\n"),
            Path::new("t"),
        )
        .expect("valid");
        let r = c.retriever.expect("retriever");
        assert_eq!(
            r.tenants,
            BTreeMap::from([
                ("acme.org".to_owned(), "tenant-2".to_owned()),
                ("wso2.com".to_owned(), "tenant-1".to_owned()),
            ]),
            "domains are kept lower case"
        );
        assert_eq!(
            r.target_folders(),
            vec!["synapse-configs", "tenant-2", "tenant-1"]
        );
        // No map: the super tenant's folder only.
        let c = Config::parse(&format!("{b}{db}"), Path::new("t")).expect("valid");
        assert!(c.retriever.expect("retriever").tenants.is_empty());
        let long = "a".repeat(256);
        for (tenants, needles) in [
            (
                "\"wso2.com\" = \"nope\"".to_owned(),
                vec![
                    "retriever.tenants.\"wso2.com\"",
                    "\"nope\"",
                    "no [[folder]]",
                ],
            ),
            (
                "\"wso2.com\" = \"synapse-configs\"".to_owned(),
                vec!["retriever.tenants.\"wso2.com\"", "super tenant"],
            ),
            (
                "\"Carbon.Super\" = \"tenant-1\"".to_owned(),
                vec!["retriever.tenants.\"Carbon.Super\"", "retriever.folder"],
            ),
            (
                "\"a.com\" = \"tenant-1\"\n\"b.com\" = \"tenant-1\"".to_owned(),
                vec![
                    "retriever.tenants.\"b.com\"",
                    "\"a.com\"",
                    "own synapse-configs",
                ],
            ),
            (
                "\"A.com\" = \"tenant-1\"\n\"a.com\" = \"tenant-2\"".to_owned(),
                vec!["retriever.tenants.\"a.com\"", "twice"],
            ),
            (
                "\"\" = \"tenant-1\"".to_owned(),
                vec!["retriever.tenants.\"\"", "empty"],
            ),
            (
                "\"a b.com\" = \"tenant-1\"".to_owned(),
                vec!["retriever.tenants.\"a b.com\"", "whitespace"],
            ),
            (
                "\"a\\u0007.com\" = \"tenant-1\"".to_owned(),
                vec!["retriever.tenants.\"a\\u{7}.com\"", "control"],
            ),
            (
                format!("\"{long}\" = \"tenant-1\""),
                vec!["retriever.tenants.", "255"],
            ),
        ] {
            let e = err_of(&format!("{b}{db}\n[retriever.tenants]\n{tenants}\n"));
            for needle in needles {
                assert!(e.contains(needle), "{tenants}: {needle:?} not in {e}");
            }
        }
        let e = err_of(&format!("{b}{db}\n[retriever.tenants]\n\"wso2.com\" = 1\n"));
        assert!(
            e.contains("\"wso2.com\" = 1") && e.contains("expected a string"),
            "a non-string folder is shown: {e}"
        );
    }

    #[test]
    fn retriever_modes_become_types() {
        let dir = setup();
        let b = base(dir.path());
        let c = Config::parse(
            &format!(
                "{b}\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:7702\"\n\
                 data_retrieval_mode = \"sync\"\n"
            ),
            Path::new("t"),
        )
        .expect("valid");
        let r = c.retriever.expect("retriever");
        assert_eq!(
            r.source,
            RetrieverSource::Hub {
                address: "http://127.0.0.1:7702".into()
            }
        );
        assert!(r.sync_start());
        let e = err_of(&format!(
            "{b}\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\ndata_retrieval_mode = \"later\"\n"
        ));
        assert!(e.contains("retriever.data_retrieval_mode"), "{e}");
        let e = err_of(&format!(
            "{b}\n[retriever]\nartifact_retriever = \"file\"\n"
        ));
        assert!(e.contains("retriever.artifact_retriever"), "{e}");
    }

    #[test]
    fn retriever_schema_is_validated() {
        let dir = setup();
        let b = base(dir.path());
        let db = "\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\n";
        let c = Config::parse(&format!("{b}{db}"), Path::new("t")).expect("valid");
        let r = c.retriever.expect("retriever");
        assert_eq!(
            r.source,
            RetrieverSource::Db {
                url: "sqlite:///tmp/a.db".into(),
                schema: Schema::Artisync
            },
            "the default is artisync's own store"
        );
        assert_eq!(r.data_retrieval_mode, DataRetrievalMode::Async);
        assert!(!r.is_wso2());
        let c = Config::parse(
            &format!("{b}{db}schema = \"wso2-apim-3.2\"\n"),
            Path::new("t"),
        )
        .expect("valid");
        assert!(c.retriever.expect("retriever").is_wso2());
        for bad in ["wso2", "WSO2-APIM-3.2", "wso2-apim-4.0", ""] {
            let e = err_of(&format!("{b}{db}schema = \"{bad}\"\n"));
            assert!(
                e.contains("retriever.schema") && e.contains("wso2-apim-3.2"),
                "{bad:?}: {e}"
            );
        }
        let e = err_of(&format!(
            "{b}\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:7702\"\nschema = \"wso2-apim-3.2\"\n"
        ));
        assert!(
            e.contains("retriever.schema") && e.contains("artifact_retriever"),
            "{e}"
        );
        let e = err_of(&format!("{b}{db}schema = 3\n"));
        assert!(e.contains("schema"), "a non-string is named too: {e}");
    }

    /// Issue 12: a state_dir inside a folder had its index, lock and `running` files synced
    /// to peers when it did not exist yet at the first start.
    #[test]
    fn state_dir_inside_a_folder_is_refused_even_before_it_exists() {
        let dir = setup();
        let d = dir.path();
        std::os::unix::fs::symlink(d.join("sc"), d.join("link")).expect("symlink");
        let inside = [
            d.join("sc/state"),
            d.join("sc/deeper/state"),
            d.join("sc/../sc/state"),
            d.join("sc/./x/../state"),
            d.join("link/state"),
            d.join("sc"),
        ];
        for state in inside {
            let text = base(d).replace(
                &format!("{}/state", d.display()),
                &state.display().to_string(),
            );
            let e = err_of(&text);
            assert!(
                e.contains("`state_dir`") && e.contains("\"synapse-configs\""),
                "{}: {e}",
                state.display()
            );
        }
        assert!(!d.join("sc/state").exists() && !d.join("sc/deeper").exists());
        // Beside the folder, even through `..` out of it, is fine.
        let text = base(d).replace(
            &format!("{}/state", d.display()),
            &d.join("sc/../state").display().to_string(),
        );
        Config::parse(&text, Path::new("t")).expect("state_dir beside the folder");
    }

    #[test]
    fn a_folder_inside_state_dir_is_refused() {
        let dir = setup();
        let d = dir.path();
        let text = base(d).replace(&format!("{}/state", d.display()), &d.display().to_string());
        let e = err_of(&text);
        assert!(
            e.contains("`state_dir`") && e.contains("contain folder \"synapse-configs\""),
            "{e}"
        );
    }

    #[test]
    fn retriever_publishers_are_validated() {
        let dir = setup();
        for f in ["ca.pem", "n.pem", "n.key"] {
            std::fs::write(dir.path().join(f), "x").expect("write");
        }
        let d = dir.path().display();
        let tls =
            format!("[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/n.pem\"\nkey = \"{d}/n.key\"\n\n");
        let b = base(dir.path());
        let db = "\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\n";
        let c = Config::parse(
            &format!("{b}\n{tls}{db}publishers = [\"ci-publisher\"]\n"),
            Path::new("t"),
        )
        .expect("valid");
        assert_eq!(c.retriever.expect("retriever").publishers, ["ci-publisher"]);
        for (bad, needle) in [
            ("[\"\"]", "publishers[0]"),
            ("[\"a/b\"]", "publishers[0]"),
            ("[\"ci\", \"ci\"]", "duplicate"),
        ] {
            let e = err_of(&format!("{b}\n{tls}{db}publishers = {bad}\n"));
            assert!(
                e.contains("retriever.publishers") && e.contains(needle),
                "{e}"
            );
        }
        let e = err_of(&format!("{b}{db}publishers = [\"ci\"]\n"));
        assert!(
            e.contains("retriever.publishers") && e.contains("[tls]"),
            "{e}"
        );
        let e = err_of(&format!(
            "{b}\n{tls}{db}schema = \"wso2-apim-3.2\"\npublishers = [\"ci\"]\n"
        ));
        assert!(e.contains("retriever.publishers"), "{e}");
    }

    #[test]
    fn example_config_in_repo_parses_after_path_substitution() {
        let dir = setup();
        std::fs::create_dir(dir.path().join("ep")).expect("mkdir");
        let text = include_str!("../examples/gw1.toml")
            .replace(
                "/opt/wso2am/repository/deployment/server/synapse-configs",
                &dir.path().join("sc").display().to_string(),
            )
            .replace(
                "/opt/wso2am/repository/deployment/server/executionplans",
                &dir.path().join("ep").display().to_string(),
            );
        let c = Config::parse(&text, Path::new("examples/gw1.toml")).expect("example is valid");
        assert_eq!(c.folders.len(), 2);
        assert_eq!(c.peers.len(), 1);
    }
}
