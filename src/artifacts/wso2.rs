//! WSO2 API Manager 3.2 compatibility, read only (`[retriever] schema = "wso2-apim-3.2"`).
//!
//! API Manager keeps what each gateway label deploys in `AM_GW_API_ARTIFACTS` (one row per
//! API and label: `GATEWAY_INSTRUCTION` `Publish` or `Remove`, `ARTIFACT` = the
//! `GatewayAPIDTO` as JSON, `TIME_STAMP`), with names in `AM_GW_PUBLISHED_API_DETAILS`. This
//! source reads those tables, never writes them, and renders each API into Synapse files
//! under `default/{api,sequences,endpoints,local-entries}` of the retriever's folder.
//!
//! There is no event table: every poll reads the (small) key columns of every row, and a row
//! that appeared, went or changed instruction, time stamp or size becomes an event. A change
//! that keeps all three (a re-publish of the same size within the same second) is caught by
//! the periodic reconcile, whose revisions come from a digest of the content itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::db::{Backend, placeholders, redact};
use super::retriever::{Source, SourceError};
use super::{ArtifactMeta, Bundle, BundleFile, Event, Instruction};
use crate::config::SCHEMA_WSO2;
use crate::model::RelPath;

/// Where Synapse's super-tenant artifacts live inside `synapse-configs`.
const SYNAPSE_ROOT: &str = "default";
/// Characters Synapse replaces by `_` in an artifact's file name.
const UNSAFE_IN_NAMES: [char; 8] = ['/', '?', '*', '|', ':', '<', '>', ' '];
/// Rendered files get this mode (the retriever deploys with the folder's permissions anyway).
const FILE_MODE: u32 = 0o644;
/// Synthesized events kept for pollers that are behind.
const EVENTS_KEPT: usize = 10_000;
/// API ids per blob query.
const IDS_PER_QUERY: usize = 100;

/// One `GatewayContentDTO`: a sequence, endpoint or local entry.
#[derive(Deserialize)]
struct GatewayContent {
    name: Option<String>,
    content: Option<String>,
}

/// The parts of a `GatewayAPIDTO` (Gson field names) that become files. Certificates and
/// credentials go to the gateway's key and credential stores, not to files: not rendered.
/// The `*ToBeRemove` lists are not needed: files of the artifact's previous deployment that
/// are not in the new one are removed by the retriever anyway.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GatewayApi {
    api_definition: Option<String>,
    #[serde(rename = "defaultAPIDefinition")]
    default_api_definition: Option<String>,
    sequence_to_be_add: Option<Vec<GatewayContent>>,
    endpoint_entries_to_be_add: Option<Vec<GatewayContent>>,
    local_entries_to_be_add: Option<Vec<GatewayContent>>,
}

/// Synapse's file name for an artifact named `name`: the characters `/?*|:<> ` replaced by
/// `_`, plus `.xml`. Refuses names that would not make one plain file name.
pub fn file_name(name: &str) -> Result<String, String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!("artifact name {name:?} cannot be a file name"));
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return Err(format!(
            "artifact name {name:?} holds control characters or a backslash"
        ));
    }
    let safe: String = name
        .chars()
        .map(|c| if UNSAFE_IN_NAMES.contains(&c) { '_' } else { c })
        .collect();
    Ok(format!("{safe}.xml"))
}

/// The `name` attribute of the root element of a Synapse definition.
fn root_name(xml: &str) -> Result<String, String> {
    use quick_xml::events::Event as Xml;
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Xml::Start(e) | Xml::Empty(e)) => {
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| format!("bad attribute: {e}"))?;
                    if attr.key.as_ref() == b"name" {
                        let value = attr
                            .unescape_value()
                            .map_err(|e| format!("bad name attribute: {e}"))?;
                        return Ok(value.into_owned());
                    }
                }
                return Err("its root element has no name attribute".into());
            }
            Ok(Xml::Eof) => return Err("it has no root element".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("not XML: {e}")),
        }
    }
}

/// Renders a `GatewayAPIDTO` (the `ARTIFACT` column) into Synapse files, sorted by path.
/// Every file must be well-formed XML; any problem refuses the whole artifact, so nothing
/// of it is half deployed.
pub fn render(artifact: &[u8]) -> Result<Vec<BundleFile>, String> {
    let api: GatewayApi = serde_json::from_slice(artifact)
        .map_err(|e| format!("ARTIFACT is not a GatewayAPIDTO in JSON: {e}"))?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |dir: &str, what: &str, name: &str, content: String| -> Result<(), String> {
        crate::fs::xml::check_well_formed(content.as_bytes())
            .map_err(|e| format!("{what} {name:?} is not well-formed XML: {e}"))?;
        let path = format!("{SYNAPSE_ROOT}/{dir}/{}", file_name(name)?);
        if files.insert(path.clone(), content.into_bytes()).is_some() {
            return Err(format!("two of its files would be {path}"));
        }
        Ok(())
    };
    let definitions = [
        ("apiDefinition", api.api_definition),
        ("defaultAPIDefinition", api.default_api_definition),
    ];
    let mut has_api = false;
    for (what, definition) in definitions {
        if let Some(xml) = definition.filter(|d| !d.trim().is_empty()) {
            let name = root_name(&xml).map_err(|e| format!("{what}: {e}"))?;
            add("api", what, &name, xml)?;
            has_api = true;
        }
    }
    if !has_api {
        return Err("the GatewayAPIDTO has no apiDefinition".into());
    }
    let lists = [
        ("sequences", "sequence", api.sequence_to_be_add),
        ("endpoints", "endpoint", api.endpoint_entries_to_be_add),
        ("local-entries", "local entry", api.local_entries_to_be_add),
    ];
    for (dir, what, list) in lists {
        for item in list.unwrap_or_default() {
            let name = item.name.ok_or_else(|| format!("a {what} has no name"))?;
            let content = item
                .content
                .ok_or_else(|| format!("{what} {name:?} has no content"))?;
            add(dir, what, &name, content)?;
        }
    }
    files
        .into_iter()
        .map(|(path, data)| {
            Ok(BundleFile {
                path: RelPath::new(&path).map_err(|e| format!("{path}: {e}"))?,
                mode: FILE_MODE,
                data,
            })
        })
        .collect()
}

/// One row of `AM_GW_API_ARTIFACTS`, without its blob.
#[derive(Debug, Clone)]
struct Wso2Row {
    api: String,
    label: String,
    publish: bool,
    /// Instruction, time stamp, size and (when read) content digest: changes when the row does.
    key: String,
    name: Option<String>,
    version: Option<String>,
    tenant: Option<String>,
}

/// An API's row that is deployed: its latest published one (any label).
fn chosen(rows: &[Wso2Row]) -> Option<&Wso2Row> {
    rows.iter()
        .filter(|r| r.publish)
        .max_by(|a, b| (&a.key, &a.label).cmp(&(&b.key, &b.label)))
}

/// The revision of an API: from its chosen row's label and key.
fn revision_of(row: &Wso2Row) -> i64 {
    let mut h = blake3::Hasher::new();
    h.update(row.label.as_bytes());
    h.update(&[0]);
    h.update(row.key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    i64::from_le_bytes(first) & i64::MAX
}

#[derive(Default)]
struct State {
    /// Key of every (API, label) row at the last poll; `None` before the first.
    snapshot: Option<HashMap<(String, String), String>>,
    events: VecDeque<Event>,
    last_event: i64,
    /// Digest and size of rendered revisions (what the hub's clients check bundles against).
    digests: HashMap<(String, i64), ([u8; 32], u64)>,
    /// Revisions rendered by the last listing, for the bundle call that follows it.
    fresh: HashMap<(String, i64), Result<Bundle, String>>,
}

/// WSO2 API Manager's tables as an artifact source.
pub struct Wso2Source {
    url: String,
    folder: String,
    poll: Duration,
    queries: AtomicU64,
    pool: tokio::sync::Mutex<Option<(AnyPool, Backend)>>,
    state: Mutex<State>,
}

impl Wso2Source {
    /// Reads `url` (connecting lazily); artifacts deploy into `folder`. Event ids continue
    /// from the wall clock in ms, so they only grow across restarts.
    pub fn new(url: &str, folder: &str, poll: Duration) -> Self {
        Self {
            url: url.to_owned(),
            folder: folder.to_owned(),
            poll,
            queries: AtomicU64::new(0),
            pool: tokio::sync::Mutex::new(None),
            state: Mutex::new(State {
                last_event: i64::try_from(crate::now_ms()).unwrap_or(0),
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn pool(&self) -> Result<(AnyPool, Backend), SourceError> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let mut guard = self.pool.lock().await;
        if let Some(p) = guard.as_ref() {
            return Ok(p.clone());
        }
        sqlx::any::install_default_drivers();
        let backend =
            Backend::of_url(&self.url).map_err(|e| SourceError::Unavailable(e.to_string()))?;
        // No migration: these tables are API Manager's.
        let pool = AnyPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&self.url)
            .await
            .map_err(|e| self.unavailable(backend, e))?;
        *guard = Some((pool.clone(), backend));
        Ok((pool, backend))
    }

    fn unavailable(&self, backend: Backend, e: sqlx::Error) -> SourceError {
        SourceError::Unavailable(format!(
            "WSO2 database ({}, {}): {e}",
            backend.name(),
            redact(&self.url)
        ))
    }

    /// Rows of `AM_GW_API_ARTIFACTS` (all, or those of the APIs that have a row for one of
    /// `labels`, or of one API), with a digest of the content in the key when `digest`.
    async fn rows(&self, filter: RowFilter<'_>, digest: bool) -> Result<Vec<Wso2Row>, SourceError> {
        let (pool, backend) = self.pool().await?;
        let (text, size, content) = match backend {
            Backend::Postgres => (
                "TEXT",
                "CAST(octet_length(a.ARTIFACT) AS BIGINT)",
                "md5(a.ARTIFACT)",
            ),
            Backend::MySql => (
                "CHAR",
                "CAST(LENGTH(a.ARTIFACT) AS SIGNED)",
                "MD5(a.ARTIFACT)",
            ),
            Backend::Sqlite => ("TEXT", "length(a.ARTIFACT)", "hex(a.ARTIFACT)"),
        };
        let content = if digest { content } else { "NULL" };
        let mut sql = format!(
            "SELECT a.API_ID, a.GATEWAY_LABEL, a.GATEWAY_INSTRUCTION, CAST(a.TIME_STAMP AS {text}), \
             {size}, {content}, d.API_NAME, d.API_VERSION, d.TENANT_DOMAIN \
             FROM AM_GW_API_ARTIFACTS a LEFT JOIN AM_GW_PUBLISHED_API_DETAILS d ON d.API_ID = a.API_ID"
        );
        match filter {
            RowFilter::All => {}
            RowFilter::Api(_) => sql.push_str(" WHERE a.API_ID = ?"),
            RowFilter::Labels(labels) => {
                let marks = vec!["?"; labels.len()].join(", ");
                sql.push_str(&format!(
                    " WHERE a.API_ID IN (SELECT API_ID FROM AM_GW_API_ARTIFACTS WHERE GATEWAY_LABEL IN ({marks}))"
                ));
            }
        }
        let sql = placeholders(backend, &sql);
        let mut q = sqlx::query(AssertSqlSafe(sql));
        match filter {
            RowFilter::All => {}
            RowFilter::Api(id) => q = q.bind(id.to_owned()),
            RowFilter::Labels(labels) => {
                for l in labels {
                    q = q.bind(l.clone());
                }
            }
        }
        let rows = q
            .fetch_all(&pool)
            .await
            .map_err(|e| self.unavailable(backend, e))?;
        rows.iter()
            .map(|r| row_of(r).map_err(|e| self.unavailable(backend, e)))
            .collect()
    }

    /// The raw `ARTIFACT` of each (API, label).
    async fn blobs(
        &self,
        wanted: &[(String, String)],
    ) -> Result<HashMap<(String, String), Option<Vec<u8>>>, SourceError> {
        let (pool, backend) = self.pool().await?;
        let mut out = HashMap::new();
        let ids: Vec<&String> = {
            let mut ids: Vec<&String> = wanted.iter().map(|(id, _)| id).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let sql = placeholders(
                backend,
                &format!(
                    "SELECT API_ID, GATEWAY_LABEL, ARTIFACT FROM AM_GW_API_ARTIFACTS WHERE API_ID IN ({marks})"
                ),
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind((*id).clone());
            }
            let rows = q
                .fetch_all(&pool)
                .await
                .map_err(|e| self.unavailable(backend, e))?;
            for r in rows {
                let api: String = r.try_get(0).map_err(|e| self.unavailable(backend, e))?;
                let label: String = r.try_get(1).map_err(|e| self.unavailable(backend, e))?;
                let blob: Option<Vec<u8>> =
                    r.try_get(2).map_err(|e| self.unavailable(backend, e))?;
                out.insert((api, label), blob);
            }
        }
        out.retain(|k, _| wanted.contains(k));
        Ok(out)
    }

    /// Metadata of each API in `rows` (grouped), its labels limited to `labels` if given;
    /// rendered (once per revision) so that digests and sizes are known.
    async fn metas(
        &self,
        rows: Vec<Wso2Row>,
        labels: Option<&[String]>,
    ) -> Result<Vec<ArtifactMeta>, SourceError> {
        let mut by_api: BTreeMap<String, Vec<Wso2Row>> = BTreeMap::new();
        for r in rows {
            by_api.entry(r.api.clone()).or_default().push(r);
        }
        let mut metas = Vec::with_capacity(by_api.len());
        let mut render: Vec<(String, String)> = Vec::new();
        for (api, rows) in &by_api {
            let mut published: Vec<String> = rows
                .iter()
                .filter(|r| r.publish && labels.is_none_or(|l| l.contains(&r.label)))
                .map(|r| r.label.clone())
                .collect();
            published.sort();
            published.dedup();
            let pick = chosen(rows);
            let any = &rows[0];
            let names = pick.unwrap_or(any);
            let revision = pick.map_or(0, revision_of);
            if let Some(row) = pick {
                if !self.state().digests.contains_key(&(api.clone(), revision)) {
                    render.push((api.clone(), row.label.clone()));
                }
            }
            metas.push(ArtifactMeta {
                id: api.clone(),
                name: names.name.clone().unwrap_or_else(|| api.clone()),
                version: names.version.clone().unwrap_or_default(),
                tenant: names
                    .tenant
                    .clone()
                    .unwrap_or_else(|| "carbon.super".into()),
                folder: self.folder.clone(),
                revision,
                removed: pick.is_none(),
                labels: published,
                digest: [0; 32],
                size: 0,
            });
        }
        if !render.is_empty() {
            let blobs = self.blobs(&render).await?;
            let mut state = self.state();
            for (meta, rows) in metas.iter().zip(by_api.values()) {
                let Some(row) = chosen(rows) else { continue };
                let key = (meta.id.clone(), meta.revision);
                if state.digests.contains_key(&key) {
                    continue;
                }
                let rendered = match blobs.get(&(row.api.clone(), row.label.clone())) {
                    Some(Some(blob)) => render_bundle(blob),
                    Some(None) => Err("its ARTIFACT is NULL".to_owned()),
                    None => continue, // changed meanwhile: the next listing renders it
                };
                if let Ok(b) = &rendered {
                    state.digests.insert(key.clone(), (b.digest(), b.size()));
                }
                state.fresh.insert(key, rendered);
            }
        }
        let state = self.state();
        for m in &mut metas {
            if let Some((digest, size)) = state.digests.get(&(m.id.clone(), m.revision)) {
                m.digest = *digest;
                m.size = *size;
            }
        }
        Ok(metas)
    }

    /// Reads every row's key and turns what changed since the last poll into events.
    async fn poll(&self) -> Result<(), SourceError> {
        let rows = self.rows(RowFilter::All, false).await?;
        let now: HashMap<(String, String), (String, bool)> = rows
            .into_iter()
            .map(|r| ((r.api, r.label), (r.key, r.publish)))
            .collect();
        let mut state = self.state();
        let Some(before) = state.snapshot.take() else {
            state.snapshot = Some(now.into_iter().map(|(k, (key, _))| (k, key)).collect());
            return Ok(());
        };
        let mut changed: Vec<(String, String, bool)> = Vec::new();
        for ((api, label), (key, publish)) in &now {
            if before.get(&(api.clone(), label.clone())) != Some(key) {
                changed.push((api.clone(), label.clone(), *publish));
            }
        }
        for (api, label) in before.keys() {
            if !now.contains_key(&(api.clone(), label.clone())) {
                changed.push((api.clone(), label.clone(), false));
            }
        }
        changed.sort();
        for (api, label, publish) in changed {
            state.last_event += 1;
            let event = Event {
                id: state.last_event,
                artifact_id: api,
                label,
                instruction: if publish {
                    Instruction::Publish
                } else {
                    Instruction::Remove
                },
                revision: 0,
            };
            tracing::debug!(artifact = %event.artifact_id, label = %event.label, instruction = event.instruction.as_str(), "WSO2 artifact row changed");
            state.events.push_back(event);
            if state.events.len() > EVENTS_KEPT {
                state.events.pop_front();
            }
        }
        state.snapshot = Some(now.into_iter().map(|(k, (key, _))| (k, key)).collect());
        Ok(())
    }
}

enum RowFilter<'a> {
    All,
    Api(&'a str),
    Labels(&'a [String]),
}

fn row_of(r: &AnyRow) -> Result<Wso2Row, sqlx::Error> {
    let instruction: Option<String> = r.try_get(2)?;
    let stamp: Option<String> = r.try_get(3)?;
    let size: Option<i64> = r.try_get(4)?;
    let content: Option<String> = r.try_get(5)?;
    let instruction = instruction.unwrap_or_default();
    Ok(Wso2Row {
        api: r.try_get(0)?,
        label: r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
        publish: instruction.eq_ignore_ascii_case("publish"),
        key: format!(
            "{}|{instruction}|{}|{}",
            stamp.unwrap_or_default(),
            size.map_or_else(|| "null".into(), |s| s.to_string()),
            content.unwrap_or_default()
        ),
        name: r.try_get(6)?,
        version: r.try_get(7)?,
        tenant: r.try_get(8)?,
    })
}

fn render_bundle(blob: &[u8]) -> Result<Bundle, String> {
    render(blob).map(|files| Bundle { files })
}

#[tonic::async_trait]
impl Source for Wso2Source {
    fn describe(&self) -> String {
        format!("{SCHEMA_WSO2} {}", redact(&self.url))
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError> {
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        self.state().fresh.clear();
        let rows = self.rows(RowFilter::Labels(labels), true).await?;
        let metas: Vec<ArtifactMeta> = self
            .metas(rows, Some(labels))
            .await?
            .into_iter()
            .filter(|m| !m.removed && !m.labels.is_empty())
            .collect();
        // Digests of revisions no longer listed are not needed.
        let listed: std::collections::HashSet<(String, i64)> =
            metas.iter().map(|m| (m.id.clone(), m.revision)).collect();
        self.state().digests.retain(|k, _| listed.contains(k));
        Ok(metas)
    }

    async fn get(&self, id: &str) -> Result<Option<ArtifactMeta>, SourceError> {
        let rows = self.rows(RowFilter::Api(id), true).await?;
        Ok(self.metas(rows, None).await?.into_iter().next())
    }

    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError> {
        let key = (meta.id.clone(), meta.revision);
        let fresh = self.state().fresh.remove(&key);
        let rendered = match fresh {
            Some(r) => r,
            None => {
                let current = self.get(&meta.id).await?;
                if current.as_ref().map(|m| m.revision) != Some(meta.revision) {
                    return Err(SourceError::Artifact {
                        id: meta.id.clone(),
                        problem: "changed in the WSO2 database since it was listed".into(),
                    });
                }
                let again = self.state().fresh.remove(&key);
                match again {
                    Some(r) => r,
                    None => {
                        // Rendered before (its digest is known): read it again.
                        let rows = self.rows(RowFilter::Api(&meta.id), true).await?;
                        let row = chosen(&rows)
                            .cloned()
                            .ok_or_else(|| SourceError::Artifact {
                                id: meta.id.clone(),
                                problem: "no longer published".into(),
                            })?;
                        let blobs = self.blobs(&[(row.api.clone(), row.label.clone())]).await?;
                        match blobs.get(&(row.api, row.label)) {
                            Some(Some(blob)) => render_bundle(blob),
                            _ => Err("its ARTIFACT is NULL or gone".to_owned()),
                        }
                    }
                }
            }
        };
        rendered.map_err(|problem| SourceError::Artifact {
            id: meta.id.clone(),
            problem,
        })
    }

    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError> {
        self.poll().await?;
        let limit = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        Ok(self
            .state()
            .events
            .iter()
            .filter(|e| e.id > after)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn last_event_id(&self) -> Result<i64, SourceError> {
        if self.state().snapshot.is_none() {
            self.poll().await?;
        }
        Ok(self.state().last_event)
    }

    async fn wait(&self, max: Duration) {
        tokio::time::sleep(self.poll.min(max)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dto(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"name":"PizzaShackAPI","version":"1.0.0","provider":"admin","apiId":"01234567-89ab-cdef-0123-456789abcdef",
            "apiDefinition":"<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--PizzaShackAPI:v1.0.0\" context=\"/pizzashack/1.0.0\"><resource methods=\"GET\" uri-template=\"/menu\"/></api>"{extra}}}"#
        )
        .into_bytes()
    }

    fn paths(files: &[BundleFile]) -> Vec<&str> {
        files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn names_follow_synapse() {
        assert_eq!(
            file_name("admin--PizzaShackAPI:v1.0.0").expect("ok"),
            "admin--PizzaShackAPI_v1.0.0.xml"
        );
        assert_eq!(
            file_name("a/b?c*d|e:f<g>h i").expect("ok"),
            "a_b_c_d_e_f_g_h_i.xml"
        );
        assert_eq!(
            file_name("../etc").expect("ok"),
            ".._etc.xml",
            "no separator is left"
        );
        for bad in ["", ".", "..", "a\nb", "a\\b"] {
            assert!(file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_api_renders_into_synapse_directories() {
        let files = render(&dto(
            r#","defaultAPIDefinition":"<api name=\"admin--PizzaShackAPI\" context=\"/pizzashack\"/>",
            "sequenceToBeAdd":[{"name":"admin--PizzaShackAPI:v1.0.0--In","content":"<sequence name=\"in\"/>"}],
            "endpointEntriesToBeAdd":[{"name":"PizzaShackAPI--v1.0.0_APIproductionEndpoint","content":"<endpoint name=\"p\"><address uri=\"https://backend:9443/am/sample/pizzashack/v1/api/\"/></endpoint>"}],
            "localEntriesToBeAdd":[{"name":"0123-swagger","content":"<localEntry key=\"k\">x</localEntry>"}],
            "sequencesToBeRemove":["old"],"clientCertificatesToBeAdd":[],"override":true"#,
        ))
        .expect("renders");
        assert_eq!(
            paths(&files),
            vec![
                "default/api/admin--PizzaShackAPI.xml",
                "default/api/admin--PizzaShackAPI_v1.0.0.xml",
                "default/endpoints/PizzaShackAPI--v1.0.0_APIproductionEndpoint.xml",
                "default/local-entries/0123-swagger.xml",
                "default/sequences/admin--PizzaShackAPI_v1.0.0--In.xml",
            ]
        );
        let api = files
            .iter()
            .find(|f| f.path.as_str() == "default/api/admin--PizzaShackAPI_v1.0.0.xml")
            .expect("api file");
        assert!(String::from_utf8_lossy(&api.data).contains("uri-template=\"/menu\""));
        assert!(files.iter().all(|f| f.mode == FILE_MODE));
        let only = render(&dto("")).expect("an API alone renders");
        assert_eq!(
            paths(&only),
            vec!["default/api/admin--PizzaShackAPI_v1.0.0.xml"]
        );
    }

    #[test]
    fn a_bad_artifact_is_refused_whole_with_the_reason() {
        let cases = [
            (b"not json".to_vec(), "not a GatewayAPIDTO"),
            (br#"{"name":"x"}"#.to_vec(), "no apiDefinition"),
            (
                br#"{"apiDefinition":"<api context=\"/x\"/>"}"#.to_vec(),
                "no name attribute",
            ),
            (
                dto(r#","sequenceToBeAdd":[{"name":"s","content":"<sequence>"}]"#),
                "not well-formed",
            ),
            (
                dto(r#","sequenceToBeAdd":[{"content":"<s/>"}]"#),
                "has no name",
            ),
            (
                dto(r#","endpointEntriesToBeAdd":[{"name":"e"}]"#),
                "has no content",
            ),
            (
                dto(r#","localEntriesToBeAdd":[{"name":"..","content":"<l/>"}]"#),
                "cannot be a file name",
            ),
            (
                dto(
                    r#","sequenceToBeAdd":[{"name":"a:b","content":"<s/>"},{"name":"a_b","content":"<t/>"}]"#,
                ),
                "two of its files",
            ),
        ];
        for (blob, want) in cases {
            let e = render(&blob).expect_err(want);
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
    }

    #[test]
    fn the_latest_published_row_is_chosen_and_its_revision_follows_content() {
        let row = |label: &str, publish: bool, key: &str| Wso2Row {
            api: "a".into(),
            label: label.into(),
            publish,
            key: key.into(),
            name: None,
            version: None,
            tenant: None,
        };
        let rows = vec![
            row(
                "Production and Sandbox",
                true,
                "2026-12-01 10:00:00|Publish|10|aa",
            ),
            row("Internal", true, "2026-12-02 10:00:00|Publish|10|bb"),
            row("External", false, "2026-12-03 10:00:00|Remove|10|cc"),
        ];
        assert_eq!(chosen(&rows).map(|r| r.label.as_str()), Some("Internal"));
        assert!(chosen(&rows[2..]).is_none(), "removed everywhere");
        let a = revision_of(&rows[0]);
        let b = revision_of(&row(
            "Production and Sandbox",
            true,
            "2026-12-01 10:00:00|Publish|10|ab",
        ));
        assert_ne!(a, b, "same stamp and size, other content");
        assert!(a >= 0 && b >= 0);
    }
}
