//! WSO2 API-M 3.2 compatibility (`[retriever] schema = "wso2-apim-3.2"`): the retriever reads
//! WSO2's own gateway artifact tables, read only, and renders every API into the files Synapse
//! deploys. WSO2's tables, as its 3.2 DDL creates them:
//!
//! - `AM_GW_PUBLISHED_API_DETAILS (API_ID, TENANT_DOMAIN, API_PROVIDER, API_NAME, API_VERSION)`
//! - `AM_GW_API_ARTIFACTS (API_ID, ARTIFACT, GATEWAY_INSTRUCTION, GATEWAY_LABEL, TIME_STAMP)`,
//!   one row per API and gateway label; `ARTIFACT` is WSO2's `GatewayAPIDTO` as JSON,
//!   `GATEWAY_INSTRUCTION` is `Publish` or `Remove`.
//!
//! The parts:
//! - [`render`] (pure, bytes in, files out): one `ARTIFACT` becomes `default/api/`,
//!   `default/sequences/`, `default/endpoints/` and `default/local-entries/` files, named as
//!   Synapse names them ([`synapse_file_name`]).
//! - [`select`] (pure): an API's rows, one per label, become what a node with some labels
//!   deploys: metadata, revision, digest and bundle.
//! - [`ChangeLog`] (pure): WSO2 has no event table. Successive snapshots of every row's cheap
//!   version ([`Fingerprint`]) become the event log the retriever follows.
//! - [`Wso2Source`]: the retriever [`Source`] over them, on SQLite, PostgreSQL or
//!   MySQL/MariaDB. It never writes: SQLite is opened read-only, server sessions are set to
//!   read-only transactions, and nothing is migrated.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::db::{Backend, MAX_BUNDLE_BYTES, placeholders, redact};
use super::retriever::{Source, SourceError};
use super::{ArtifactMeta, Bundle, BundleFile, Event, Instruction};
use crate::model::RelPath;

/// Where each kind of entry goes, below the retriever's folder (the `synapse-configs` root).
pub const API_DIR: &str = "default/api";
pub const SEQUENCES_DIR: &str = "default/sequences";
pub const ENDPOINTS_DIR: &str = "default/endpoints";
pub const LOCAL_ENTRIES_DIR: &str = "default/local-entries";
/// Characters Synapse replaces with `_` in a file name (its `MultiXMLConfigurationSerializer`).
pub const SYNAPSE_NAME_REPLACED: &[char] = &['/', '?', '*', '|', ':', '<', '>', ' '];
/// Mode recorded for rendered files (the folder's engine writes them with the folder's mode).
const FILE_MODE: u32 = 0o640;
/// Longest file name Linux file systems take.
const MAX_FILE_NAME_BYTES: usize = 255;
/// Events kept for subscribers that poll behind (older ones are caught by reconcile).
const EVENT_LOG_CAP: usize = 10_000;
/// MySQL/MariaDB: rows whose `TIME_STAMP` is this recent are also compared by an MD5 of their
/// `ARTIFACT`, because `TIME_STAMP` has one-second resolution (a second write within the same
/// second leaves it unchanged). Generous, for a WSO2 node whose clock is a little off.
const HOT_ROW_SECS: u32 = 10;
/// Longest text taken from a database value into a message.
const MAX_SHOWN: usize = 80;

fn shown(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}

/// Why an `ARTIFACT` cannot be rendered. Never quotes the artifact's content: it can hold
/// endpoint credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("ARTIFACT is {size} bytes, more than the {max} allowed")]
    TooLarge { size: u64, max: u64 },
    #[error("ARTIFACT is not GatewayAPIDTO JSON: {0}")]
    Json(String),
    #[error("ARTIFACT has no {0}")]
    Missing(&'static str),
    #[error("{field} entry {name:?}: {problem}")]
    Name {
        field: &'static str,
        name: String,
        problem: String,
    },
    #[error("{path}: not well-formed XML ({problem})")]
    NotXml { path: String, problem: String },
    #[error("{path} would be written by two entries")]
    Duplicate { path: String },
}

/// The part of WSO2's `GatewayAPIDTO` that becomes files. Everything else in the JSON (client
/// certificates, endpoint credentials, the `*ToBeRemove` lists, `override`, ...) is not even
/// read.
#[derive(Debug, Deserialize)]
struct GatewayApiDto {
    #[serde(rename = "apiDefinition", default)]
    api_definition: Option<String>,
    #[serde(rename = "defaultAPIDefinition", default)]
    default_api_definition: Option<String>,
    #[serde(rename = "sequenceToBeAdd", default)]
    sequences: Option<Vec<GatewayContentDto>>,
    #[serde(rename = "endpointEntriesToBeAdd", default)]
    endpoints: Option<Vec<GatewayContentDto>>,
    #[serde(rename = "localEntriesToBeAdd", default)]
    local_entries: Option<Vec<GatewayContentDto>>,
}

/// WSO2's `GatewayContentDTO`: a named Synapse configuration.
#[derive(Debug, Deserialize)]
struct GatewayContentDto {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    content: Option<String>,
}

/// Synapse's file name for an artifact called `name`: `/?*|:<> ` become `_`, then `.xml`.
/// Refuses a name that is empty, `.` or `..`, has control characters, is too long for a file
/// name, or that the sync engine would never write (editor and temp file patterns).
pub fn synapse_file_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name == "." || name == ".." {
        return Err("the name is not a file name".into());
    }
    if name.chars().any(char::is_control) {
        return Err("the name has control characters".into());
    }
    let base: String = name
        .chars()
        .map(|c| {
            if SYNAPSE_NAME_REPLACED.contains(&c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let file = format!("{base}.xml");
    if file.len() > MAX_FILE_NAME_BYTES {
        return Err(format!(
            "the file name would be longer than {MAX_FILE_NAME_BYTES} bytes"
        ));
    }
    Ok(file)
}

/// The `name` attribute of the root `<api>` element of a Synapse API definition.
fn api_name(definition: &str) -> Result<String, String> {
    use quick_xml::events::Event as Xml;
    let mut reader = quick_xml::Reader::from_str(definition);
    loop {
        match reader.read_event() {
            Ok(Xml::Start(e)) | Ok(Xml::Empty(e)) => {
                if e.local_name().as_ref() != b"api" {
                    return Err(format!(
                        "the root element is <{}>, not <api>",
                        shown(&String::from_utf8_lossy(e.local_name().as_ref()))
                    ));
                }
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| format!("bad attribute: {e}"))?;
                    if attr.key.local_name().as_ref() == b"name" {
                        return attr
                            .unescape_value()
                            .map(|v| v.into_owned())
                            .map_err(|e| format!("bad name attribute: {e}"));
                    }
                }
                return Err("<api> has no name attribute".into());
            }
            Ok(Xml::Eof) => return Err("no root element".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("at byte {}: {e}", reader.error_position())),
        }
    }
}

/// Renders one `ARTIFACT` (WSO2's `GatewayAPIDTO` JSON) into the files Synapse deploys, paths
/// relative to the `synapse-configs` folder, sorted:
///
/// - `apiDefinition` (required) and `defaultAPIDefinition` (optional) go to
///   `default/api/<name>.xml`, named by the `name` attribute of their `<api>` element;
/// - each entry of `sequenceToBeAdd`, `endpointEntriesToBeAdd` and `localEntriesToBeAdd` goes
///   to `default/{sequences,endpoints,local-entries}/<name>.xml`.
///
/// Every file must be well-formed XML: Synapse's hot deployer would fail on a broken one, so
/// the whole artifact fails instead and whatever was deployed before stays.
pub fn render(artifact: &[u8]) -> Result<Bundle, RenderError> {
    let size = artifact.len() as u64;
    if size > MAX_BUNDLE_BYTES {
        return Err(RenderError::TooLarge {
            size,
            max: MAX_BUNDLE_BYTES,
        });
    }
    let dto: GatewayApiDto = serde_json::from_slice(artifact).map_err(|e| {
        // serde_json's own message can quote a value: only the kind and the position.
        let kind = match e.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "a field has the wrong type",
            serde_json::error::Category::Eof => "truncated",
        };
        RenderError::Json(format!(
            "{kind} at line {}, column {}",
            e.line(),
            e.column()
        ))
    })?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |field: &'static str, dir: &str, name: &str, content: String| {
        let bad_name = |problem: String| RenderError::Name {
            field,
            name: shown(name),
            problem,
        };
        let file = synapse_file_name(name).map_err(bad_name)?;
        let path = format!("{dir}/{file}");
        let rel = RelPath::new(&path).map_err(|e| bad_name(e.to_string()))?;
        if rel.as_str() != path || rel.file_name() != file {
            return Err(bad_name("the name would leave its directory".into()));
        }
        if IGNORED.is_ignored(&rel) {
            return Err(bad_name(
                "the file name matches an ignore pattern (editor or temp file)".into(),
            ));
        }
        crate::fs::xml::check_well_formed(content.as_bytes()).map_err(|problem| {
            RenderError::NotXml {
                path: path.clone(),
                problem,
            }
        })?;
        if files.insert(path.clone(), content.into_bytes()).is_some() {
            return Err(RenderError::Duplicate { path });
        }
        Ok(())
    };
    let definition = dto
        .api_definition
        .filter(|d| !d.trim().is_empty())
        .ok_or(RenderError::Missing("apiDefinition"))?;
    let definitions = std::iter::once(("apiDefinition", definition)).chain(
        dto.default_api_definition
            .filter(|d| !d.trim().is_empty())
            .map(|d| ("defaultAPIDefinition", d)),
    );
    for (field, xml) in definitions {
        crate::fs::xml::check_well_formed(xml.as_bytes()).map_err(|problem| {
            RenderError::NotXml {
                path: format!("{field} ({API_DIR})"),
                problem,
            }
        })?;
        let name = api_name(&xml).map_err(|problem| RenderError::Name {
            field,
            name: String::new(),
            problem,
        })?;
        add(field, API_DIR, &name, xml)?;
    }
    for (field, dir, entries) in [
        ("sequenceToBeAdd", SEQUENCES_DIR, dto.sequences),
        ("endpointEntriesToBeAdd", ENDPOINTS_DIR, dto.endpoints),
        ("localEntriesToBeAdd", LOCAL_ENTRIES_DIR, dto.local_entries),
    ] {
        for entry in entries.unwrap_or_default() {
            let name = entry.name.unwrap_or_default();
            let content = entry.content.ok_or_else(|| RenderError::Name {
                field,
                name: shown(&name),
                problem: "has no content".into(),
            })?;
            add(field, dir, &name, content)?;
        }
    }
    let files = files
        .into_iter()
        .map(|(path, data)| {
            RelPath::new(&path)
                .map(|path| BundleFile {
                    path,
                    mode: FILE_MODE,
                    data,
                })
                .map_err(|e| RenderError::Name {
                    field: "path",
                    name: shown(&path),
                    problem: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Bundle { files })
}

static IGNORED: std::sync::LazyLock<crate::fs::ignore::Ignore> = std::sync::LazyLock::new(|| {
    crate::fs::ignore::Ignore::new(&[])
        .unwrap_or_else(|e| unreachable!("the built-in ignore patterns are valid globs: {e}"))
});

/// What a `GATEWAY_INSTRUCTION` says (WSO2 writes `Publish` and `Remove`; case is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowInstruction {
    Publish,
    Remove,
    Unknown(String),
}

impl RowInstruction {
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some(v) if v.eq_ignore_ascii_case("publish") => Self::Publish,
            Some(v) if v.eq_ignore_ascii_case("remove") => Self::Remove,
            Some(v) => Self::Unknown(shown(v)),
            None => Self::Unknown("NULL".into()),
        }
    }
}

/// One row of `AM_GW_API_ARTIFACTS` with its API's details.
#[derive(Clone, PartialEq, Eq)]
pub struct ArtifactRow {
    /// Lower case canonical UUID.
    pub api_id: String,
    pub label: String,
    pub instruction: RowInstruction,
    /// Not read for `Remove` rows.
    pub artifact: Option<Vec<u8>>,
    pub name: Option<String>,
    pub version: Option<String>,
    pub tenant: Option<String>,
}

impl std::fmt::Debug for ArtifactRow {
    // The artifact may hold credentials: only its size is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ArtifactRow({}, {:?}, {:?}, {:?} bytes)",
            self.api_id,
            self.label,
            self.instruction,
            self.artifact.as_ref().map(Vec::len)
        )
    }
}

/// What a node deploys of one API: its metadata and its files (or why it cannot).
#[derive(Debug, Clone)]
pub struct Selected {
    pub meta: ArtifactMeta,
    pub bundle: Result<Bundle, String>,
}

/// Revision of a row's content: the first 63 bits of BLAKE3 over instruction and `ARTIFACT`.
/// Content-addressed: the same bytes give the same revision on every node and after every
/// restart, whatever `TIME_STAMP` says.
fn revision_of(instruction: &RowInstruction, artifact: Option<&[u8]>) -> i64 {
    let mut h = blake3::Hasher::new();
    h.update(format!("{instruction:?}").as_bytes());
    match artifact {
        Some(a) => {
            h.update(&[1]);
            h.update(a);
        }
        None => {
            h.update(&[0]);
        }
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    (u64::from_le_bytes(first) >> 1) as i64
}

/// What a node with `labels` (empty: every label) deploys of API `api_id`, from its rows (any
/// labels, any order; rows of other APIs are skipped). `None` when no row of those labels
/// publishes it.
///
/// Every row of those labels that is not `Remove` counts; the API carries those labels. WSO2
/// renders an API per gateway environment, so two labels can hold different content: the row
/// of the first label (in byte order) is the one deployed, so every node with the same labels
/// deploys the same bytes. A row with an unknown instruction or a NULL `ARTIFACT`, or one that
/// does not render, makes the API fail (reported, retried) rather than deploy something else.
pub fn select(
    api_id: &str,
    rows: &[ArtifactRow],
    labels: &[String],
    folder: &str,
) -> Option<Selected> {
    let mut candidates: Vec<&ArtifactRow> = rows
        .iter()
        .filter(|r| r.api_id == api_id)
        .filter(|r| labels.is_empty() || labels.contains(&r.label))
        .filter(|r| r.instruction != RowInstruction::Remove)
        .collect();
    candidates.sort_by(|a, b| a.label.cmp(&b.label));
    candidates.dedup_by(|a, b| a.label == b.label);
    let chosen = *candidates.first()?;
    let bundle = match &chosen.instruction {
        RowInstruction::Publish => match &chosen.artifact {
            Some(bytes) => render(bytes).map_err(|e| e.to_string()),
            None => Err(format!("ARTIFACT of label {:?} is NULL", chosen.label)),
        },
        RowInstruction::Unknown(what) => Err(format!(
            "GATEWAY_INSTRUCTION {what:?} of label {:?} is neither Publish nor Remove",
            chosen.label
        )),
        RowInstruction::Remove => Err("removed".into()),
    };
    let (digest, size) = match &bundle {
        Ok(b) => (b.digest(), b.size()),
        Err(_) => (
            [0; 32],
            chosen.artifact.as_ref().map_or(0, |a| a.len() as u64),
        ),
    };
    let meta = ArtifactMeta {
        id: api_id.to_owned(),
        name: chosen.name.clone().unwrap_or_default(),
        version: chosen.version.clone().unwrap_or_default(),
        tenant: chosen.tenant.clone().unwrap_or_default(),
        folder: folder.to_owned(),
        revision: revision_of(&chosen.instruction, chosen.artifact.as_deref()),
        removed: false,
        labels: candidates.iter().map(|r| r.label.clone()).collect(),
        digest,
        size,
    };
    Some(Selected { meta, bundle })
}

/// A row's cheap version, as the change scan reads it without reading `ARTIFACT` (except where
/// the backend offers nothing better).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub instruction: Option<String>,
    /// PostgreSQL: the row version's `xmin` (new on every write). MySQL/MariaDB: `TIME_STAMP`
    /// (`ON UPDATE CURRENT_TIMESTAMP` in WSO2's DDL). SQLite: `TIME_STAMP`.
    pub stamp: Option<String>,
    /// A content hash where the scan has one: MySQL/MariaDB for rows written in the last few
    /// seconds; SQLite for every row.
    pub hash: Option<String>,
}

impl Fingerprint {
    /// True when the row was written since `old` was taken. A hash that is present on one side
    /// only (a MySQL row that aged out of the recent window) is no change.
    fn differs_from(&self, old: &Fingerprint) -> bool {
        self.instruction != old.instruction
            || self.stamp != old.stamp
            || matches!((&self.hash, &old.hash), (Some(a), Some(b)) if a != b)
    }
}

/// (API id, gateway label) -> the row's fingerprint.
pub type Snapshot = BTreeMap<(String, String), Fingerprint>;

/// The event log of a table that has none: each [`ChangeLog::observe`] compares a snapshot
/// of every row's [`Fingerprint`] with the previous one and appends an event per (API, label)
/// row that appeared, changed or vanished. Event ids continue from `first_id`; the source
/// starts it at the wall clock (ms * 1000), so the ids of an agent restarted later are higher
/// and subscribers of a hub never see its log go backwards.
#[derive(Debug)]
pub struct ChangeLog {
    known: Option<Snapshot>,
    events: VecDeque<Event>,
    last_id: i64,
}

impl ChangeLog {
    pub fn new(first_id: i64) -> Self {
        Self {
            known: None,
            events: VecDeque::new(),
            last_id: first_id,
        }
    }

    /// Takes a new snapshot. The first one only primes the log (the start-up deploy and every
    /// reconcile read the tables themselves). Returns the events appended.
    pub fn observe(&mut self, now: Snapshot) -> Vec<Event> {
        let Some(old) = self.known.take() else {
            self.known = Some(now);
            return Vec::new();
        };
        let mut appended = Vec::new();
        for (key, fp) in &now {
            if old.get(key).is_none_or(|o| fp.differs_from(o)) {
                let remove =
                    RowInstruction::parse(fp.instruction.as_deref()) == RowInstruction::Remove;
                appended.push((key, remove));
            }
        }
        for key in old.keys().filter(|k| !now.contains_key(*k)) {
            appended.push((key, true));
        }
        let appended: Vec<Event> = appended
            .into_iter()
            .map(|((api, label), remove)| {
                self.last_id += 1;
                Event {
                    id: self.last_id,
                    artifact_id: api.clone(),
                    label: label.clone(),
                    instruction: if remove {
                        Instruction::Remove
                    } else {
                        Instruction::Publish
                    },
                    revision: 0,
                }
            })
            .collect();
        self.events.extend(appended.iter().cloned());
        while self.events.len() > EVENT_LOG_CAP {
            self.events.pop_front();
        }
        self.known = Some(now);
        appended
    }

    /// Events with an id above `after`, oldest first, at most `limit`.
    pub fn after(&self, after: i64, limit: i64) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.id > after)
            .take(usize::try_from(limit.max(0)).unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    /// The newest event id (the first id when there is none).
    pub fn last_id(&self) -> i64 {
        self.last_id
    }
}

/// The change log and when the tables were last scanned.
struct Scanned {
    log: ChangeLog,
    at: Option<Instant>,
}

/// WSO2 API-M 3.2's tables as a retriever source (read only). Connects lazily, so a database
/// that is down at start-up is retried like any other failure.
pub struct Wso2Source {
    url: String,
    folder: String,
    poll: Duration,
    queries: AtomicU64,
    pool: tokio::sync::Mutex<Option<(AnyPool, Backend)>>,
    scanned: tokio::sync::Mutex<Scanned>,
}

impl Wso2Source {
    /// `folder`: the folder id rendered files deploy into (the retriever's `folder`).
    pub fn new(url: &str, folder: &str, poll: Duration) -> Self {
        let first_id = i64::try_from(crate::now_ms())
            .unwrap_or(0)
            .saturating_mul(1000);
        Self {
            url: url.to_owned(),
            folder: folder.to_owned(),
            poll,
            queries: AtomicU64::new(0),
            pool: tokio::sync::Mutex::new(None),
            scanned: tokio::sync::Mutex::new(Scanned {
                log: ChangeLog::new(first_id),
                at: None,
            }),
        }
    }

    fn down(&self, backend: Backend, e: impl std::fmt::Display) -> SourceError {
        SourceError::Unavailable(format!("WSO2 database ({}): {e}", backend.name()))
    }

    /// The connection pool (one query is counted per call).
    async fn pool(&self) -> Result<(AnyPool, Backend), SourceError> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.pool.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        sqlx::any::install_default_drivers();
        let backend =
            Backend::of_url(&self.url).map_err(|e| SourceError::Unavailable(e.to_string()))?;
        let mut url = self.url.clone();
        // Read only: SQLite opens the file read-only (and never creates it); server sessions
        // run read-only transactions, so even a bug here could not write to WSO2's tables.
        if backend == Backend::Sqlite && !url.contains("mode=") {
            url.push_str(if url.contains('?') {
                "&mode=ro"
            } else {
                "?mode=ro"
            });
        }
        let read_only = match backend {
            Backend::Postgres => Some("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
            Backend::MySql => Some("SET SESSION TRANSACTION READ ONLY"),
            Backend::Sqlite => None,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if let Some(q) = read_only {
                        sqlx::query(q).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|e| self.down(backend, e))?;
        *guard = Some((pool.clone(), backend));
        Ok((pool, backend))
    }

    /// Rows (with details) of the given labels, or of the given API ids; never both empty.
    async fn rows(
        &self,
        by_label: &[String],
        by_id: &[String],
    ) -> Result<Vec<ArtifactRow>, SourceError> {
        let (pool, backend) = self.pool().await?;
        let artifact = if backend == Backend::Sqlite {
            "CAST(a.ARTIFACT AS BLOB)"
        } else {
            "a.ARTIFACT"
        };
        let (column, values) = if by_id.is_empty() {
            ("a.GATEWAY_LABEL", by_label)
        } else {
            ("LOWER(a.API_ID)", by_id)
        };
        if values.is_empty() {
            return Ok(Vec::new());
        }
        let marks = vec!["?"; values.len()].join(", ");
        let q = format!(
            "SELECT a.API_ID, a.GATEWAY_LABEL, a.GATEWAY_INSTRUCTION, \
             CASE WHEN UPPER(a.GATEWAY_INSTRUCTION) = 'REMOVE' THEN NULL ELSE {artifact} END, \
             d.API_NAME, d.API_VERSION, d.TENANT_DOMAIN \
             FROM AM_GW_API_ARTIFACTS a LEFT JOIN AM_GW_PUBLISHED_API_DETAILS d ON d.API_ID = a.API_ID \
             WHERE {column} IN ({marks})"
        );
        let mut query = sqlx::query(AssertSqlSafe(placeholders(backend, &q)));
        for v in values {
            query = query.bind(v.as_str());
        }
        let rows = query
            .fetch_all(&pool)
            .await
            .map_err(|e| self.down(backend, e))?;
        let mut out = Vec::with_capacity(rows.len());
        let mut unusable: Vec<String> = Vec::new();
        for r in rows {
            let text = |i: usize| -> Result<Option<String>, SourceError> {
                r.try_get::<Option<String>, _>(i)
                    .map_err(|e| self.down(backend, e))
            };
            let (Some(id), Some(label)) = (text(0)?, text(1)?) else {
                continue;
            };
            let Ok(api_id) = super::parse_id(id.trim()) else {
                unusable.push(id);
                continue;
            };
            out.push(ArtifactRow {
                api_id,
                label,
                instruction: RowInstruction::parse(text(2)?.as_deref()),
                artifact: r
                    .try_get::<Option<Vec<u8>>, _>(3)
                    .map_err(|e| self.down(backend, e))?,
                name: text(4)?,
                version: text(5)?,
                tenant: text(6)?,
            });
        }
        if let Some(first) = unusable.first() {
            // Ids travel to hub subscribers and into the index as UUIDs (WSO2's are).
            warn!(count = unusable.len(), first = %shown(first), "skipping WSO2 artifact rows whose API_ID is not a UUID");
        }
        Ok(out)
    }

    /// Reads every row's fingerprint (no `ARTIFACT` on PostgreSQL, and on MySQL/MariaDB only
    /// for rows written in the last seconds) and feeds the change log, unless that was done
    /// less than half a poll interval ago (a hub's subscribers all poll: one scan serves them).
    async fn refresh(&self, scanned: &mut Scanned) -> Result<(), SourceError> {
        if scanned
            .at
            .is_some_and(|at| at.elapsed() < self.poll / 2 && scanned.log.known.is_some())
        {
            return Ok(());
        }
        let (pool, backend) = self.pool().await?;
        let q = match backend {
            Backend::Postgres => {
                "SELECT API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION, CAST(xmin AS TEXT) \
                 FROM AM_GW_API_ARTIFACTS"
                    .to_owned()
            }
            Backend::MySql => format!(
                "SELECT API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION, CAST(TIME_STAMP AS CHAR), \
                 CASE WHEN TIME_STAMP >= NOW() - INTERVAL {HOT_ROW_SECS} SECOND THEN MD5(ARTIFACT) END \
                 FROM AM_GW_API_ARTIFACTS"
            ),
            Backend::Sqlite => "SELECT API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION, \
                 CAST(TIME_STAMP AS TEXT), CAST(ARTIFACT AS BLOB) FROM AM_GW_API_ARTIFACTS"
                .to_owned(),
        };
        let rows = sqlx::query(AssertSqlSafe(q))
            .fetch_all(&pool)
            .await
            .map_err(|e| self.down(backend, e))?;
        let snapshot = snapshot_of(&rows, backend).map_err(|e| self.down(backend, e))?;
        for e in scanned.log.observe(snapshot) {
            debug!(api = %e.artifact_id, label = %e.label, instruction = e.instruction.as_str(), event = e.id, "WSO2 artifact row changed");
        }
        scanned.at = Some(Instant::now());
        Ok(())
    }

    /// What a node with `labels` deploys of each API in `rows`.
    fn select_all(&self, rows: &[ArtifactRow], labels: &[String]) -> Vec<Selected> {
        let mut by_api: BTreeMap<&str, Vec<ArtifactRow>> = BTreeMap::new();
        for r in rows {
            by_api.entry(&r.api_id).or_default().push(r.clone());
        }
        by_api
            .into_iter()
            .filter_map(|(id, rows)| select(id, &rows, labels, &self.folder))
            .collect()
    }
}

fn snapshot_of(rows: &[AnyRow], backend: Backend) -> Result<Snapshot, sqlx::Error> {
    let mut snapshot = Snapshot::new();
    for r in rows {
        let (Some(id), Some(label)) = (
            r.try_get::<Option<String>, _>(0)?,
            r.try_get::<Option<String>, _>(1)?,
        ) else {
            continue;
        };
        let Ok(api_id) = super::parse_id(id.trim()) else {
            continue;
        };
        let hash = match backend {
            Backend::Postgres => None,
            Backend::MySql => r.try_get::<Option<String>, _>(4)?,
            Backend::Sqlite => r
                .try_get::<Option<Vec<u8>>, _>(4)?
                .map(|a| blake3::hash(&a).to_hex().to_string()),
        };
        snapshot.insert(
            (api_id, label),
            Fingerprint {
                instruction: r.try_get::<Option<String>, _>(2)?,
                stamp: r.try_get::<Option<String>, _>(3)?,
                hash,
            },
        );
    }
    Ok(snapshot)
}

#[tonic::async_trait]
impl Source for Wso2Source {
    fn describe(&self) -> String {
        format!(
            "{} {}",
            crate::config::SCHEMA_WSO2_APIM_32,
            redact(&self.url)
        )
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError> {
        let rows = self.rows(labels, &[]).await?;
        Ok(self
            .select_all(&rows, labels)
            .into_iter()
            .map(|s| s.meta)
            .collect())
    }

    async fn get(&self, id: &str, labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError> {
        let Ok(id) = super::parse_id(id) else {
            return Ok(None);
        };
        let rows = self.rows(&[], std::slice::from_ref(&id)).await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        if let Some(s) = self.select_all(&rows, labels).pop() {
            return Ok(Some(s.meta));
        }
        // Every row of those labels says Remove.
        Ok(Some(ArtifactMeta {
            id: id.clone(),
            name: first.name.clone().unwrap_or_default(),
            version: first.version.clone().unwrap_or_default(),
            tenant: first.tenant.clone().unwrap_or_default(),
            folder: self.folder.clone(),
            revision: 0,
            removed: true,
            labels: Vec::new(),
            digest: [0; 32],
            size: 0,
        }))
    }

    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError> {
        self.bundles(std::slice::from_ref(meta))
            .await?
            .pop()
            .unwrap_or_else(|| {
                Err(SourceError::Artifact {
                    id: meta.id.clone(),
                    problem: "no bundle".into(),
                })
            })
    }

    async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, SourceError>>, SourceError> {
        let ids: Vec<String> = metas.iter().map(|m| m.id.clone()).collect();
        let rows = self.rows(&[], &ids).await?;
        Ok(metas
            .iter()
            .map(|meta| {
                let bad = |problem: String| SourceError::Artifact {
                    id: meta.id.clone(),
                    problem,
                };
                if meta.labels.is_empty() {
                    return Err(bad("has none of this node's labels".into()));
                }
                let selected =
                    select(&meta.id, &rows, &meta.labels, &self.folder).ok_or_else(|| {
                        bad(format!(
                            "is no longer published for labels {:?}",
                            meta.labels
                        ))
                    })?;
                let bundle = selected.bundle.map_err(bad)?;
                if selected.meta.revision != meta.revision || bundle.digest() != meta.digest {
                    return Err(bad(
                        "ARTIFACT changed while being read; the change is deployed next".into(),
                    ));
                }
                Ok(bundle)
            })
            .collect())
    }

    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError> {
        let mut scanned = self.scanned.lock().await;
        self.refresh(&mut scanned).await?;
        Ok(scanned.log.after(after, limit))
    }

    async fn last_event_id(&self) -> Result<i64, SourceError> {
        let mut scanned = self.scanned.lock().await;
        self.refresh(&mut scanned).await?;
        Ok(scanned.log.last_id())
    }

    async fn wait(&self, max: Duration) {
        tokio::time::sleep(self.poll.min(max)).await;
    }
}

/// WSO2's side of the tables, for tests: creates them as WSO2 API-M 3.2's DDL does and writes
/// rows as its `DBSaver` does (insert, or update `ARTIFACT` and `GATEWAY_INSTRUCTION` in place).
#[doc(hidden)]
pub mod testing {
    use super::*;

    const SQLITE_DDL: &[&str] = &[
        "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID varchar(255) NOT NULL, \
         TENANT_DOMAIN varchar(255), API_PROVIDER varchar(255), API_NAME varchar(255), \
         API_VERSION varchar(255), PRIMARY KEY (API_ID))",
        "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID varchar(255) NOT NULL, ARTIFACT blob, \
         GATEWAY_INSTRUCTION varchar(20), GATEWAY_LABEL varchar(255), \
         TIME_STAMP TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
         PRIMARY KEY (GATEWAY_LABEL, API_ID), \
         FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID))",
    ];
    const POSTGRES_DDL: &[&str] = &[
        "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID varchar(255) NOT NULL, \
         TENANT_DOMAIN varchar(255), API_PROVIDER varchar(255), API_NAME varchar(255), \
         API_VERSION varchar(255), PRIMARY KEY (API_ID))",
        "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID varchar(255) NOT NULL, ARTIFACT bytea, \
         GATEWAY_INSTRUCTION varchar(20), GATEWAY_LABEL varchar(255), \
         TIME_STAMP TIMESTAMP(0) NOT NULL DEFAULT CURRENT_TIMESTAMP, \
         PRIMARY KEY (GATEWAY_LABEL, API_ID), \
         FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID) \
         ON UPDATE CASCADE ON DELETE NO ACTION)",
    ];
    const MYSQL_DDL: &[&str] = &[
        "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID varchar(255) NOT NULL, \
         TENANT_DOMAIN varchar(255), API_PROVIDER varchar(255), API_NAME varchar(255), \
         API_VERSION varchar(255), PRIMARY KEY (API_ID)) ENGINE=InnoDB",
        "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID varchar(255) NOT NULL, ARTIFACT LONGBLOB, \
         GATEWAY_INSTRUCTION varchar(20), GATEWAY_LABEL varchar(255), \
         TIME_STAMP TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP, \
         PRIMARY KEY (GATEWAY_LABEL, API_ID), \
         FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID) \
         ON UPDATE CASCADE ON DELETE NO ACTION) ENGINE=InnoDB",
    ];

    /// A connection to the database WSO2 API-M would write.
    pub struct Wso2Tables {
        pool: AnyPool,
        backend: Backend,
    }

    impl Wso2Tables {
        /// Connects (creating an SQLite file) and creates WSO2's two tables.
        pub async fn create(url: &str) -> Result<Self, sqlx::Error> {
            sqlx::any::install_default_drivers();
            let backend = Backend::of_url(url)
                .map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
            let url = if backend == Backend::Sqlite {
                format!("{url}?mode=rwc")
            } else {
                url.to_owned()
            };
            let pool = AnyPoolOptions::new()
                .max_connections(2)
                .connect(&url)
                .await?;
            let ddl = match backend {
                Backend::Sqlite => SQLITE_DDL,
                Backend::Postgres => POSTGRES_DDL,
                Backend::MySql => MYSQL_DDL,
            };
            for statement in ddl {
                sqlx::query(*statement).execute(&pool).await?;
            }
            Ok(Self { pool, backend })
        }

        /// Writes the row of (`api_id`, `label`) as WSO2's `DBSaver` does, with the API's
        /// details row first if it is missing.
        pub async fn put(
            &self,
            api_id: &str,
            label: &str,
            instruction: Option<&str>,
            artifact: Option<&[u8]>,
        ) -> Result<(), sqlx::Error> {
            let sql = |q: &str| AssertSqlSafe(placeholders(self.backend, q));
            let details: i64 = sqlx::query_scalar(sql(
                "SELECT COUNT(*) FROM AM_GW_PUBLISHED_API_DETAILS WHERE API_ID = ?",
            ))
            .bind(api_id)
            .fetch_one(&self.pool)
            .await?;
            if details == 0 {
                sqlx::query(sql(
                    "INSERT INTO AM_GW_PUBLISHED_API_DETAILS (API_ID, API_NAME, API_VERSION, \
                     TENANT_DOMAIN, API_PROVIDER) VALUES (?, ?, ?, ?, ?)",
                ))
                .bind(api_id)
                .bind(format!("API-{}", &api_id[..8.min(api_id.len())]))
                .bind("1.0.0")
                .bind("carbon.super")
                .bind("admin")
                .execute(&self.pool)
                .await?;
            }
            let exists: i64 = sqlx::query_scalar(sql(
                "SELECT COUNT(*) FROM AM_GW_API_ARTIFACTS WHERE API_ID = ? AND GATEWAY_LABEL = ?",
            ))
            .bind(api_id)
            .bind(label)
            .fetch_one(&self.pool)
            .await?;
            let q = if exists == 0 {
                "INSERT INTO AM_GW_API_ARTIFACTS (ARTIFACT, GATEWAY_INSTRUCTION, API_ID, \
                 GATEWAY_LABEL) VALUES (?, ?, ?, ?)"
            } else {
                "UPDATE AM_GW_API_ARTIFACTS SET ARTIFACT = ?, GATEWAY_INSTRUCTION = ? \
                 WHERE API_ID = ? AND GATEWAY_LABEL = ?"
            };
            sqlx::query(sql(q))
                .bind(artifact.map(<[u8]>::to_vec))
                .bind(instruction)
                .bind(api_id)
                .bind(label)
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        /// `Publish` of `artifact` for `label`.
        pub async fn publish(
            &self,
            api_id: &str,
            label: &str,
            artifact: &[u8],
        ) -> Result<(), sqlx::Error> {
            self.put(api_id, label, Some("Publish"), Some(artifact))
                .await
        }

        /// `Remove` for `label` (WSO2 writes the removal's DTO as the artifact).
        pub async fn remove(
            &self,
            api_id: &str,
            label: &str,
            artifact: &[u8],
        ) -> Result<(), sqlx::Error> {
            self.put(api_id, label, Some("Remove"), Some(artifact))
                .await
        }

        /// Every table name in the database (lower case), to show nothing else was created.
        pub async fn tables(&self) -> Result<Vec<String>, sqlx::Error> {
            let q = match self.backend {
                Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table'",
                Backend::Postgres => {
                    "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
                     WHERE table_schema = 'public'"
                }
                Backend::MySql => {
                    "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
                     WHERE table_schema = DATABASE()"
                }
            };
            let mut names: Vec<String> = sqlx::query_scalar::<_, String>(q)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .map(|n| n.to_lowercase())
                .collect();
            names.sort();
            Ok(names)
        }

        pub async fn close(self) {
            self.pool.close().await;
        }
    }

    /// A `GatewayAPIDTO` JSON as WSO2 API-M 3.2 writes it, for API `name` (the Synapse API
    /// name, e.g. `admin--PizzaShackAPI:v1.0.0`) with one in-sequence, one endpoint and one
    /// local entry whose bodies carry `tag`, plus endpoint credentials that are never deployed.
    pub fn gateway_api_json(api_id: &str, name: &str, tag: &str) -> Vec<u8> {
        serde_json::json!({
            "name": "PizzaShackAPI",
            "version": "1.0.0",
            "provider": "admin",
            "apiId": api_id,
            "tenantDomain": "carbon.super",
            "override": true,
            "apiDefinition": api_xml(name, tag),
            "sequenceToBeAdd": [{
                "name": format!("{name}--In"),
                "content": format!("<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--In\"><log level=\"custom\"><property name=\"tag\" value=\"{tag}\"/></log></sequence>"),
            }],
            "endpointEntriesToBeAdd": [{
                "name": format!("{name}_APIproductionEndpoint"),
                "content": format!("<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}_APIproductionEndpoint\"><http uri-template=\"https://backend.example/{tag}\"/></endpoint>"),
            }],
            "localEntriesToBeAdd": [{
                "name": api_id,
                "content": format!("<localEntry xmlns=\"http://ws.apache.org/ns/synapse\" key=\"{api_id}\">{tag}</localEntry>"),
            }],
            "sequencesToBeRemove": [format!("{name}--In")],
            "endpointEntriesToBeRemove": [format!("{name}_APIproductionEndpoint")],
            "localEntriesToBeRemove": [api_id],
            "clientCertificatesToBeAdd": [],
            "credentialsToBeAdd": [{"alias": "PizzaShackAPI--v1.0.0", "password": "s3cret-endpoint-password"}],
            "credentialsToBeRemove": [],
        })
        .to_string()
        .into_bytes()
    }

    /// The Synapse API definition [`gateway_api_json`] carries.
    pub fn api_xml(name: &str, tag: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\" context=\"/pizzashack/1.0.0\" version=\"1.0.0\" version-type=\"context\"><resource methods=\"GET\" uri-template=\"/menu\"><inSequence><property name=\"tag\" value=\"{tag}\"/></inSequence></resource></api>\n"
        )
    }

    /// The files [`gateway_api_json`] renders to: (path below `synapse-configs`, content).
    pub fn rendered_files(api_id: &str, name: &str, tag: &str) -> Vec<(String, String)> {
        let file = |n: &str| synapse_file_name(n).unwrap_or_default();
        let mut files = vec![
            (format!("{API_DIR}/{}", file(name)), api_xml(name, tag)),
            (
                format!("{SEQUENCES_DIR}/{}", file(&format!("{name}--In"))),
                format!(
                    "<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--In\"><log level=\"custom\"><property name=\"tag\" value=\"{tag}\"/></log></sequence>"
                ),
            ),
            (
                format!(
                    "{ENDPOINTS_DIR}/{}",
                    file(&format!("{name}_APIproductionEndpoint"))
                ),
                format!(
                    "<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}_APIproductionEndpoint\"><http uri-template=\"https://backend.example/{tag}\"/></endpoint>"
                ),
            ),
            (
                format!("{LOCAL_ENTRIES_DIR}/{}", file(api_id)),
                format!(
                    "<localEntry xmlns=\"http://ws.apache.org/ns/synapse\" key=\"{api_id}\">{tag}</localEntry>"
                ),
            ),
        ];
        files.sort();
        files
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const API: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    const API2: &str = "0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f";
    const PIZZA: &str = "admin--PizzaShackAPI:v1.0.0";

    fn paths(b: &Bundle) -> Vec<&str> {
        b.files.iter().map(|f| f.path.as_str()).collect()
    }

    fn dto(value: serde_json::Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    fn render_err(value: serde_json::Value) -> RenderError {
        match render(&dto(value.clone())) {
            Ok(b) => panic!("{value} should not render, got {:?}", paths(&b)),
            Err(e) => e,
        }
    }

    #[test]
    fn renders_every_entry_into_its_synapse_directory_and_file() {
        let b = render(&gateway_api_json(API, PIZZA, "t1")).expect("renders");
        let got: Vec<(String, String)> = b
            .files
            .iter()
            .map(|f| {
                (
                    f.path.to_string(),
                    String::from_utf8(f.data.clone()).expect("utf-8"),
                )
            })
            .collect();
        assert_eq!(got, rendered_files(API, PIZZA, "t1"));
        assert_eq!(
            paths(&b),
            vec![
                "default/api/admin--PizzaShackAPI_v1.0.0.xml",
                "default/endpoints/admin--PizzaShackAPI_v1.0.0_APIproductionEndpoint.xml",
                "default/local-entries/6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c.xml",
                "default/sequences/admin--PizzaShackAPI_v1.0.0--In.xml",
            ]
        );
        assert!(b.files.iter().all(|f| f.mode == 0o640));
        let all: Vec<u8> = b.files.iter().flat_map(|f| f.data.clone()).collect();
        assert!(
            !String::from_utf8_lossy(&all).contains("s3cret-endpoint-password"),
            "credentials are not rendered"
        );
        // The same bytes render the same bundle (digest) every time.
        let again = render(&gateway_api_json(API, PIZZA, "t1")).expect("renders");
        assert_eq!(b.digest(), again.digest());
        assert_ne!(
            b.digest(),
            render(&gateway_api_json(API, PIZZA, "t2"))
                .expect("renders")
                .digest()
        );
    }

    #[test]
    fn the_default_version_definition_is_rendered_beside_the_api() {
        let b = render(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "defaultAPIDefinition": "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--PizzaShackAPI\" context=\"/pizzashack\"/>",
        })))
        .expect("renders");
        assert_eq!(
            paths(&b),
            vec![
                "default/api/admin--PizzaShackAPI.xml",
                "default/api/admin--PizzaShackAPI_v1.0.0.xml"
            ]
        );
    }

    #[test]
    fn synapse_names_replace_exactly_the_contract_characters() {
        assert_eq!(
            synapse_file_name("admin--PizzaShackAPI:v1.0.0").as_deref(),
            Ok("admin--PizzaShackAPI_v1.0.0.xml")
        );
        assert_eq!(
            synapse_file_name("a/b?c*d|e:f<g>h i").as_deref(),
            Ok("a_b_c_d_e_f_g_h_i.xml")
        );
        assert_eq!(
            synapse_file_name("keep-these_.@#&%+=,;'\"()[]{}\\é").as_deref(),
            Ok("keep-these_.@#&%+=,;'\"()[]{}\\é.xml")
        );
        assert_eq!(
            synapse_file_name("../../etc/passwd").as_deref(),
            Ok(".._.._etc_passwd.xml"),
            "slashes are replaced, so the file stays in its directory"
        );
        for bad in ["", ".", "..", "a\nb", "nul\0", &"x".repeat(252)] {
            assert!(synapse_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(synapse_file_name(&"x".repeat(251)).is_ok(), "255 bytes fit");
    }

    #[test]
    fn entry_names_that_cannot_be_files_fail_the_artifact() {
        for name in ["", ".", "..", ".#lock", "a\u{7}b"] {
            let e = render_err(serde_json::json!({
                "apiDefinition": api_xml(PIZZA, "x"),
                "sequenceToBeAdd": [{"name": name, "content": "<sequence/>"}],
            }));
            assert!(
                matches!(
                    &e,
                    RenderError::Name {
                        field: "sequenceToBeAdd",
                        ..
                    }
                ),
                "{name:?}: {e}"
            );
        }
        // A name made of path pieces lands inside its directory.
        let b = render(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "localEntriesToBeAdd": [{"name": "../../../etc/cron.d/x", "content": "<localEntry key=\"x\"/>"}],
        })))
        .expect("renders");
        assert!(
            paths(&b).contains(&"default/local-entries/.._.._.._etc_cron.d_x.xml"),
            "{:?}",
            paths(&b)
        );
        // An API whose <api name> is unusable.
        for definition in [
            "<api context=\"/x\"/>",
            "<api name=\"..\"/>",
            "<api name=\"\"/>",
            "<sequence name=\"x\"/>",
        ] {
            let e = render_err(serde_json::json!({ "apiDefinition": definition }));
            assert!(
                matches!(
                    &e,
                    RenderError::Name {
                        field: "apiDefinition",
                        ..
                    }
                ),
                "{definition}: {e}"
            );
        }
    }

    #[test]
    fn only_the_api_definition_is_required() {
        let b = render(&dto(
            serde_json::json!({ "apiDefinition": api_xml(PIZZA, "x") }),
        ))
        .expect("renders");
        assert_eq!(
            paths(&b),
            vec!["default/api/admin--PizzaShackAPI_v1.0.0.xml"]
        );
        let b = render(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "defaultAPIDefinition": null,
            "sequenceToBeAdd": null,
            "endpointEntriesToBeAdd": [],
        })))
        .expect("nulls and empty lists are nothing");
        assert_eq!(b.files.len(), 1);
        for missing in [
            serde_json::json!({}),
            serde_json::json!({ "apiDefinition": null }),
            serde_json::json!({ "apiDefinition": "  " }),
            serde_json::json!({ "name": "PizzaShackAPI", "sequenceToBeAdd": [] }),
        ] {
            assert_eq!(render_err(missing), RenderError::Missing("apiDefinition"));
        }
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "endpointEntriesToBeAdd": [{"name": "ep"}],
        }));
        assert!(e.to_string().contains("has no content"), "{e}");
    }

    #[test]
    fn bad_json_fails_without_quoting_the_artifact() {
        let secret = "s3cret-endpoint-password";
        let bad: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"".to_vec(),
            b"{\"apiDefinition\": \"<api name=\\\"a\\\"/>\"".to_vec(),
            vec![0xff, 0xfe, b'{', b'}'],
            dto(
                serde_json::json!({ "apiDefinition": api_xml(PIZZA, "x"), "sequenceToBeAdd": secret }),
            ),
            dto(serde_json::json!({ "apiDefinition": [secret] })),
            dto(serde_json::json!([{ "apiDefinition": secret }])),
        ];
        for artifact in bad {
            let e = render(&artifact).expect_err("refused");
            assert!(matches!(e, RenderError::Json(_)), "{e}");
            let text = e.to_string();
            assert!(text.contains("line"), "{text}");
            assert!(
                !text.contains(secret),
                "the error quotes the artifact: {text}"
            );
        }
    }

    #[test]
    fn content_that_is_not_well_formed_xml_fails_the_whole_artifact() {
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "sequenceToBeAdd": [
                {"name": "good", "content": "<sequence name=\"good\"/>"},
                {"name": "broken", "content": "<sequence name=\"broken\"><log>"},
            ],
        }));
        assert!(
            matches!(&e, RenderError::NotXml { path, .. } if path == "default/sequences/broken.xml"),
            "{e}"
        );
        let e =
            render_err(serde_json::json!({ "apiDefinition": "<api name=\"a\"><resource></api>" }));
        assert!(matches!(e, RenderError::NotXml { .. }), "{e}");
    }

    #[test]
    fn two_entries_for_one_file_fail_the_artifact() {
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "sequenceToBeAdd": [
                {"name": "a:b", "content": "<sequence/>"},
                {"name": "a_b", "content": "<sequence/>"},
            ],
        }));
        assert_eq!(
            e,
            RenderError::Duplicate {
                path: "default/sequences/a_b.xml".into()
            }
        );
    }

    fn row(api: &str, label: &str, instruction: &str, artifact: Option<Vec<u8>>) -> ArtifactRow {
        ArtifactRow {
            api_id: api.into(),
            label: label.into(),
            instruction: RowInstruction::parse(Some(instruction)),
            artifact,
            name: Some("PizzaShackAPI".into()),
            version: Some("1.0.0".into()),
            tenant: Some("carbon.super".into()),
        }
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn select_takes_the_first_label_that_publishes_and_skips_removes() {
        let prod = gateway_api_json(API, PIZZA, "prod");
        let sand = gateway_api_json(API, PIZZA, "sandbox");
        let rows = vec![
            row(API, "Sandbox", "Publish", Some(sand.clone())),
            row(API, "Production", "Publish", Some(prod.clone())),
            row(API, "Old", "Remove", None),
            row(
                API2,
                "Production",
                "Publish",
                Some(gateway_api_json(API2, "x", "y")),
            ),
        ];
        let both = select(API, &rows, &labels(&["Sandbox", "Production", "Old"]), "sc")
            .expect("published");
        assert_eq!(both.meta.labels, labels(&["Production", "Sandbox"]));
        assert_eq!(both.meta.folder, "sc");
        assert_eq!(both.meta.name, "PizzaShackAPI");
        let bundle = both.bundle.expect("renders");
        assert_eq!(bundle, render(&prod).expect("renders"), "first label wins");
        assert_eq!(
            (both.meta.digest, both.meta.size),
            (bundle.digest(), bundle.size())
        );

        let sandbox_only = select(API, &rows, &labels(&["Sandbox"]), "sc").expect("published");
        assert_eq!(sandbox_only.meta.labels, labels(&["Sandbox"]));
        assert_eq!(sandbox_only.bundle, Ok(render(&sand).expect("renders")));
        assert_ne!(sandbox_only.meta.revision, both.meta.revision);
        assert!(sandbox_only.meta.revision >= 0);

        let all = select(API, &rows, &[], "sc").expect("every label");
        assert_eq!(all.meta.revision, both.meta.revision);
        assert!(
            select(API, &rows, &labels(&["Old"]), "sc").is_none(),
            "removed"
        );
        assert!(select(API, &rows, &labels(&["Nobody"]), "sc").is_none());
        // Same content, same revision: a restart or another node agrees.
        let again = select(API, &rows.clone(), &labels(&["Production"]), "sc").expect("published");
        assert_eq!(again.meta.revision, both.meta.revision);
    }

    #[test]
    fn select_fails_bad_rows_instead_of_deploying_something_else() {
        let good = gateway_api_json(API, PIZZA, "good");
        for (rows, problem) in [
            (
                vec![
                    row(API, "A", "Publish", None),
                    row(API, "B", "Publish", Some(good.clone())),
                ],
                "NULL",
            ),
            (
                vec![row(API, "A", "Deploy", Some(good.clone()))],
                "neither Publish nor Remove",
            ),
            (
                vec![row(API, "A", "Publish", Some(b"{oops".to_vec()))],
                "not GatewayAPIDTO JSON",
            ),
        ] {
            let s = select(API, &rows, &labels(&["A", "B"]), "sc").expect("listed, failing");
            let e = s.bundle.expect_err("fails");
            assert!(e.contains(problem), "{e}");
            assert_eq!(s.meta.digest, [0; 32]);
        }
        // Case is not significant in GATEWAY_INSTRUCTION; NULL is unknown.
        assert_eq!(
            RowInstruction::parse(Some("PUBLISH")),
            RowInstruction::Publish
        );
        assert_eq!(
            RowInstruction::parse(Some("remove ")),
            RowInstruction::Remove
        );
        assert!(matches!(
            RowInstruction::parse(None),
            RowInstruction::Unknown(_)
        ));
        let rows = vec![row(API, "A", "publish", Some(good))];
        assert!(select(API, &rows, &labels(&["A"]), "sc").is_some_and(|s| s.bundle.is_ok()));
    }

    fn fp(instruction: &str, stamp: &str, hash: Option<&str>) -> Fingerprint {
        Fingerprint {
            instruction: Some(instruction.into()),
            stamp: Some(stamp.into()),
            hash: hash.map(str::to_owned),
        }
    }

    fn snap(entries: &[(&str, &str, Fingerprint)]) -> Snapshot {
        entries
            .iter()
            .map(|(a, l, f)| ((a.to_string(), l.to_string()), f.clone()))
            .collect()
    }

    fn summary(events: &[Event]) -> Vec<(i64, &str, &str, &str)> {
        events
            .iter()
            .map(|e| {
                (
                    e.id,
                    e.artifact_id.as_str(),
                    e.label.as_str(),
                    e.instruction.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn the_change_log_turns_snapshots_into_events() {
        let mut log = ChangeLog::new(1000);
        let first = snap(&[(API, "L1", fp("Publish", "t1", None))]);
        assert!(
            log.observe(first.clone()).is_empty(),
            "the first snapshot primes"
        );
        assert_eq!(log.last_id(), 1000);
        assert!(log.observe(first).is_empty(), "nothing changed");

        // A new row, and a label's row that changed (new row version / time stamp).
        let second = snap(&[
            (API, "L1", fp("Publish", "t2", None)),
            (API2, "L2", fp("Publish", "t1", None)),
        ]);
        let got = log.observe(second);
        assert_eq!(
            summary(&got),
            vec![(1001, API2, "L2", "publish"), (1002, API, "L1", "publish")],
            "in (API, label) order"
        );
        // Publish -> Remove, and a row that vanished.
        let got = log.observe(snap(&[(API, "L1", fp("Remove", "t2", None))]));
        assert_eq!(
            summary(&got),
            vec![(1003, API, "L1", "remove"), (1004, API2, "L2", "remove")]
        );
        assert_eq!(log.last_id(), 1004);
        assert_eq!(summary(&log.after(1002, 10)), summary(&log.after(1002, 10)));
        assert_eq!(
            log.after(1001, 2).iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1002, 1003]
        );
        assert!(log.after(1004, 10).is_empty());
        assert_eq!(log.after(0, 100).len(), 4);
    }

    #[test]
    fn content_hashes_count_only_when_both_snapshots_have_one() {
        let mut log = ChangeLog::new(0);
        log.observe(snap(&[(API, "L", fp("Publish", "12:00:01", Some("h1")))]));
        // Rewritten within the same second: the time stamp is the same, the hash is not.
        let got = log.observe(snap(&[(API, "L", fp("Publish", "12:00:01", Some("h2")))]));
        assert_eq!(got.len(), 1);
        // The row ages out of the recent window: no hash any more, but no change either.
        assert!(
            log.observe(snap(&[(API, "L", fp("Publish", "12:00:01", None))]))
                .is_empty()
        );
    }

    #[test]
    fn the_change_log_keeps_a_bounded_tail() {
        let mut log = ChangeLog::new(0);
        log.observe(Snapshot::new());
        for i in 0..(EVENT_LOG_CAP + 10) {
            log.observe(snap(&[(API, "L", fp("Publish", &i.to_string(), None))]));
        }
        assert_eq!(log.after(0, i64::MAX).len(), EVENT_LOG_CAP);
        assert_eq!(log.last_id(), (EVENT_LOG_CAP + 10) as i64);
    }

    /// The source against real tables written as WSO2 writes them, on every backend.
    async fn source_suite(backend: Backend) {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(url) = crate::artifacts::db::testing::fresh_url(backend, dir.path()).await else {
            return;
        };
        let name = backend.name();
        let wso2 = Wso2Tables::create(&url)
            .await
            .expect("create WSO2's tables");
        let before = wso2.tables().await.expect("tables");
        wso2.publish(API, "L1", &gateway_api_json(API, PIZZA, "v1"))
            .await
            .expect("publish");
        wso2.publish(API2, "L2", &gateway_api_json(API2, "other", "v1"))
            .await
            .expect("publish");

        let source = Wso2Source::new(&url, "synapse-configs", Duration::from_millis(1));
        let start = source.last_event_id().await.expect("primes");
        let current = source.current(&labels(&["L1"])).await.expect("current");
        assert_eq!(current.len(), 1, "{name}: {current:?}");
        let meta = &current[0];
        assert_eq!(
            (meta.id.as_str(), meta.labels.clone()),
            (API, labels(&["L1"]))
        );
        assert_eq!(
            meta.name,
            format!("API-{}", &API[..8]),
            "{name}: details row"
        );
        let bundle = source.bundle(meta).await.expect("bundle");
        assert_eq!(
            bundle,
            render(&gateway_api_json(API, PIZZA, "v1")).expect("renders")
        );
        assert_eq!(
            source
                .get(API, &labels(&["L1"]))
                .await
                .expect("get")
                .as_ref(),
            Some(meta),
            "{name}"
        );
        assert_eq!(
            source
                .get(API, &labels(&["L2"]))
                .await
                .expect("get")
                .map(|m| m.removed),
            Some(true)
        );
        assert_eq!(
            source
                .get("00000000-0000-4000-8000-000000000000", &[])
                .await
                .expect("get"),
            None
        );
        assert!(
            source
                .events_after(start, 100)
                .await
                .expect("events")
                .is_empty()
        );

        // A new revision (in the same second as the first, on purpose), a Remove, a new row.
        wso2.publish(API, "L1", &gateway_api_json(API, PIZZA, "v2"))
            .await
            .expect("republish");
        let events = source.events_after(start, 100).await.expect("events");
        assert_eq!(
            summary(&events)
                .iter()
                .map(|e| (e.1, e.2, e.3))
                .collect::<Vec<_>>(),
            vec![(API, "L1", "publish")],
            "{name}: {events:?}"
        );
        let v2 = source
            .get(API, &labels(&["L1"]))
            .await
            .expect("get")
            .expect("exists");
        assert_ne!(v2.revision, meta.revision, "{name}");
        assert!(
            source.bundle(meta).await.is_err(),
            "{name}: the old revision is gone"
        );
        wso2.remove(API, "L1", b"{\"apiId\":\"x\"}")
            .await
            .expect("remove");
        wso2.publish(API, "L3", &gateway_api_json(API, PIZZA, "v3"))
            .await
            .expect("publish L3");
        let newer = source
            .events_after(events[0].id, 100)
            .await
            .expect("events");
        let mut got: Vec<(&str, &str)> = newer
            .iter()
            .map(|e| (e.label.as_str(), e.instruction.as_str()))
            .collect();
        got.sort();
        assert_eq!(got, vec![("L1", "remove"), ("L3", "publish")], "{name}");
        assert!(
            source
                .current(&labels(&["L1"]))
                .await
                .expect("current")
                .is_empty()
        );
        assert_eq!(
            source
                .get(API, &labels(&["L1", "L3"]))
                .await
                .expect("get")
                .map(|m| m.labels),
            Some(labels(&["L3"]))
        );
        assert!(source.last_event_id().await.expect("last") > start);

        // Bad rows: reported per artifact, never a panic; the other artifacts still deploy.
        wso2.put(API2, "L1", Some("Publish"), None)
            .await
            .expect("NULL blob");
        let listed = source
            .current(&labels(&["L1", "L2"]))
            .await
            .expect("current");
        let bundles = source.bundles(&listed).await.expect("bundles");
        assert_eq!(listed.len(), 1, "{name}");
        let e = bundles[0].as_ref().expect_err("NULL blob fails");
        assert!(
            e.to_string().contains("NULL") && e.to_string().contains(API2),
            "{e}"
        );

        let (pool, _) = source.pool().await.expect("connected");
        let write = sqlx::query("DELETE FROM AM_GW_API_ARTIFACTS")
            .execute(&pool)
            .await;
        assert!(
            write.is_err(),
            "{name}: the source's sessions are read-only"
        );
        assert_eq!(
            wso2.tables().await.expect("tables"),
            before,
            "{name}: nothing created"
        );
        wso2.close().await;
        crate::artifacts::db::testing::drop_db(&url).await;
    }

    #[tokio::test]
    async fn source_suite_sqlite() {
        source_suite(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn source_suite_postgres() {
        source_suite(Backend::Postgres).await;
    }

    #[tokio::test]
    async fn source_suite_mysql() {
        source_suite(Backend::MySql).await;
    }

    #[tokio::test]
    async fn the_source_never_creates_or_writes_a_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wso2.db");
        let url = format!("sqlite://{}", path.display());
        let source = Wso2Source::new(&url, "synapse-configs", Duration::from_millis(1));
        let e = source
            .current(&labels(&["L1"]))
            .await
            .expect_err("no database");
        assert!(matches!(e, SourceError::Unavailable(_)), "{e}");
        assert!(!path.exists(), "the SQLite file was created");
        // A database without WSO2's tables is unavailable, and gets none of artisync's.
        let empty = dir.path().join("empty.db");
        std::fs::File::create(&empty).expect("an empty SQLite file");
        let source = Wso2Source::new(
            &format!("sqlite://{}", empty.display()),
            "synapse-configs",
            Duration::from_millis(1),
        );
        let e = source.last_event_id().await.expect_err("no tables");
        assert!(e.to_string().contains("AM_GW_API_ARTIFACTS"), "{e}");
        assert_eq!(
            std::fs::metadata(&empty).expect("stat").len(),
            0,
            "written to"
        );
    }
}
