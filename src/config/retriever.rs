//! `[retriever]`: as the file spells it ([`RetrieverFile`]) and validated into the typed
//! [`RetrieverConfig`] the rest of the agent uses; WSO2 tenant domains.

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;

use super::{Config, ConfigError, invalid, valid_name};

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
    pub(super) fn resolve(&self, config: &Config) -> Result<RetrieverConfig, ConfigError> {
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
