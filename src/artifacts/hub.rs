//! Hub mode: an agent with database access serves `ArtifactHub` (retrieval by label for agents
//! without DB credentials) and `ArtifactSaver` (remote publish/remove) on its listen address,
//! all from one connection pool. [`HubSource`] is the client side, a retriever [`Source`].
//! Who may call which is decided in [`crate::identity`]: reads need a cluster node certificate
//! (with TLS), publish and remove a listed publisher certificate (or, without TLS, a caller on
//! this machine).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::db::NewArtifact;
use super::retriever::{DbSource, Source, SourceError};
use super::{ArtifactMeta, Bundle, BundleFile, Event, Instruction};
use crate::config::TlsConfig;
use crate::identity::{authorize_cluster_read, authorize_publisher};
use crate::model::RelPath;
use crate::pb::artifacts as pb;

const CHUNK_BYTES: usize = 1024 * 1024;

fn meta_to_pb(m: &ArtifactMeta) -> pb::Meta {
    pb::Meta {
        id: m.id.clone(),
        name: m.name.clone(),
        version: m.version.clone(),
        tenant: m.tenant.clone(),
        folder: m.folder.clone(),
        revision: m.revision,
        removed: m.removed,
        labels: m.labels.clone(),
        digest: m.digest.to_vec(),
        size: m.size,
        keep: m.keep.clone(),
        warnings: m.warnings.clone(),
    }
}

/// Most warnings, and longest warning, taken from a hub for one artifact.
const MAX_WARNINGS: usize = 8;
const MAX_WARNING_CHARS: usize = 1024;

/// A hub's warnings, bounded and without control characters (they reach a terminal).
fn warnings_from_pb(warnings: Vec<String>) -> Vec<String> {
    warnings
        .into_iter()
        .take(MAX_WARNINGS)
        .map(|w| {
            w.chars()
                .filter(|c| !c.is_control())
                .take(MAX_WARNING_CHARS)
                .collect()
        })
        .collect()
}

/// Most keep paths taken from a hub for one artifact.
const MAX_KEEP_PATHS: usize = 10_000;

/// A hub's keep paths, checked: bounded in number, each a valid relative path.
fn keep_from_pb(id: &str, keep: Vec<String>) -> Result<Vec<String>, SourceError> {
    let bad = |problem: String| SourceError::Artifact {
        id: id.chars().take(80).collect(),
        problem,
    };
    if keep.len() > MAX_KEEP_PATHS {
        return Err(bad(format!(
            "hub sent {} keep paths, more than {MAX_KEEP_PATHS}",
            keep.len()
        )));
    }
    keep.into_iter()
        .map(|p| {
            RelPath::new(&p)
                .map(|r| r.to_string())
                .map_err(|e| bad(format!("hub sent a bad keep path: {e}")))
        })
        .collect()
}

fn meta_from_pb(m: pb::Meta) -> Result<ArtifactMeta, SourceError> {
    let digest: [u8; 32] = m
        .digest
        .as_slice()
        .try_into()
        .map_err(|_| SourceError::Artifact {
            id: m.id.clone(),
            problem: "hub sent a digest that is not 32 bytes".into(),
        })?;
    Ok(ArtifactMeta {
        id: super::parse_id(&m.id).map_err(|e| SourceError::Artifact {
            id: m.id.clone(),
            problem: e.to_string(),
        })?,
        name: m.name,
        version: m.version,
        tenant: m.tenant,
        folder: m.folder,
        revision: m.revision,
        removed: m.removed,
        labels: m.labels,
        digest,
        size: m.size,
        keep: keep_from_pb(&m.id, m.keep)?,
        warnings: warnings_from_pb(m.warnings),
    })
}

fn status_of(e: SourceError) -> Status {
    match e {
        SourceError::Unavailable(m) => Status::unavailable(m.to_string()),
        SourceError::Artifact { id, problem } => {
            Status::failed_precondition(format!("artifact {id}: {problem}"))
        }
    }
}

/// The hub and saver services of an agent that has the database.
#[derive(Clone)]
pub struct HubService {
    source: Arc<dyn Source>,
    /// Where publish and remove go; `None` for a read-only source (WSO2's tables).
    saver: Option<Arc<DbSource>>,
    /// Names of the publisher certificates that may publish and remove over TLS
    /// (`[retriever] publishers`).
    publishers: Arc<[String]>,
}

impl HubService {
    /// Serves artisync's own store: retrieval, publish and remove.
    pub fn new(source: Arc<DbSource>) -> Self {
        Self {
            source: source.clone(),
            saver: Some(source),
            publishers: Arc::from([]),
        }
    }

    /// Serves retrieval from `source`; publish and remove are refused (WSO2's tables are
    /// written by WSO2 API-M only).
    pub fn read_only(source: Arc<dyn Source>) -> Self {
        Self {
            source,
            saver: None,
            publishers: Arc::from([]),
        }
    }

    /// The publisher certificates (by name) whose publish and remove are taken over TLS.
    pub fn with_publishers(mut self, publishers: &[String]) -> Self {
        self.publishers = Arc::from(publishers);
        self
    }

    fn saver(&self) -> Result<&DbSource, Status> {
        self.saver.as_deref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "this agent reads WSO2's artifact tables ({}), which artisync never writes: \
                 publish and remove through WSO2 API-M",
                self.source.describe()
            ))
        })
    }

    pub fn hub_server(self) -> pb::artifact_hub_server::ArtifactHubServer<Self> {
        pb::artifact_hub_server::ArtifactHubServer::new(self)
    }

    pub fn saver_server(self) -> pb::artifact_saver_server::ArtifactSaverServer<Self> {
        pb::artifact_saver_server::ArtifactSaverServer::new(self)
            .max_decoding_message_size(crate::net::MAX_MESSAGE_BYTES)
    }
}

type BundleStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BundleChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::artifact_hub_server::ArtifactHub for HubService {
    type BundleStream = BundleStream;

    async fn current(
        &self,
        request: Request<pb::CurrentRequest>,
    ) -> Result<Response<pb::MetaList>, Status> {
        authorize_cluster_read(&request, "ArtifactHub")?;
        let labels = request.into_inner().labels;
        let list = self.source.current(&labels).await.map_err(status_of)?;
        Ok(Response::new(pb::MetaList {
            artifacts: list.iter().map(meta_to_pb).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetReply>, Status> {
        authorize_cluster_read(&request, "ArtifactHub")?;
        let req = request.into_inner();
        let m = self
            .source
            .get(&req.id, &req.labels)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::GetReply {
            artifact: m.as_ref().map(meta_to_pb),
        }))
    }

    async fn bundle(
        &self,
        request: Request<pb::BundleRequest>,
    ) -> Result<Response<Self::BundleStream>, Status> {
        authorize_cluster_read(&request, "ArtifactHub")?;
        let req = request.into_inner();
        let mut meta = self
            .source
            .get(&req.id, &req.labels)
            .await
            .map_err(status_of)?
            .ok_or_else(|| Status::not_found(format!("artifact {} does not exist", req.id)))?;
        if meta.revision != req.revision {
            return Err(Status::failed_precondition(format!(
                "artifact {} is at revision {}, not {}",
                req.id, meta.revision, req.revision
            )));
        }
        if !req.labels.is_empty() {
            meta.labels.retain(|l| req.labels.contains(l));
        }
        let bundle = self.source.bundle(&meta).await.map_err(status_of)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for f in bundle.files {
                let mut pieces: Vec<&[u8]> = f.data.chunks(CHUNK_BYTES).collect();
                if pieces.is_empty() {
                    pieces.push(&[]);
                }
                for (i, piece) in pieces.into_iter().enumerate() {
                    let chunk = pb::BundleChunk {
                        start: i == 0,
                        path: if i == 0 {
                            f.path.to_string()
                        } else {
                            String::new()
                        },
                        mode: f.mode,
                        data: piece.to_vec(),
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<pb::EventList>, Status> {
        authorize_cluster_read(&request, "ArtifactHub")?;
        let req = request.into_inner();
        let events = self
            .source
            .events_after(req.after, req.limit.clamp(1, 1000))
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::EventList {
            events: events
                .into_iter()
                .map(|e| pb::Event {
                    id: e.id,
                    artifact_id: e.artifact_id,
                    label: e.label,
                    instruction: e.instruction.as_str().into(),
                    revision: e.revision,
                })
                .collect(),
        }))
    }

    async fn last_event_id(
        &self,
        request: Request<pb::LastEventIdRequest>,
    ) -> Result<Response<pb::LastEventIdReply>, Status> {
        authorize_cluster_read(&request, "ArtifactHub")?;
        let id = self.source.last_event_id().await.map_err(status_of)?;
        Ok(Response::new(pb::LastEventIdReply { id }))
    }
}

/// Why a publish request is refused (sent to the publisher as `INVALID_ARGUMENT`).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Field(#[from] super::ArtifactError),
    #[error("at least one label is required")]
    NoLabel,
    #[error("bundle path: {0}")]
    Path(#[source] crate::model::PathError),
    #[error("{path}: mode {mode:o} out of range")]
    Mode { path: RelPath, mode: u32 },
    #[error("a bundle needs at least one file")]
    NoFile,
}

/// Validates a publish request into what the store takes.
pub fn check_publish(req: pb::PublishRequest) -> Result<(NewArtifact, Bundle), PublishError> {
    let id = super::parse_id(&req.id)?;
    for (field, value) in [
        ("name", &req.name),
        ("version", &req.version),
        ("tenant", &req.tenant),
        ("folder", &req.folder),
    ] {
        super::check_field(field, value)?;
    }
    if req.labels.is_empty() {
        return Err(PublishError::NoLabel);
    }
    for l in &req.labels {
        super::check_field("label", l)?;
    }
    let mut files = Vec::with_capacity(req.files.len());
    for f in req.files {
        let path = RelPath::new(&f.path).map_err(PublishError::Path)?;
        if f.mode > 0o7777 {
            return Err(PublishError::Mode { path, mode: f.mode });
        }
        files.push(BundleFile {
            path,
            mode: f.mode,
            data: f.data,
        });
    }
    if files.is_empty() {
        return Err(PublishError::NoFile);
    }
    let mut labels = req.labels;
    labels.sort();
    labels.dedup();
    Ok((
        NewArtifact {
            id,
            name: req.name,
            version: req.version,
            tenant: req.tenant,
            folder: req.folder,
            labels,
        },
        Bundle { files },
    ))
}

#[tonic::async_trait]
impl pb::artifact_saver_server::ArtifactSaver for HubService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishReply>, Status> {
        authorize_publisher(&request, &self.publishers)?;
        let saver = self.saver()?;
        let (meta, bundle) = check_publish(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let db = saver.db().await.map_err(status_of)?;
        let revision = db
            .publish(&meta, &bundle, crate::now_ms())
            .await
            .map_err(|e| status_of(e.into()))?;
        Ok(Response::new(pb::PublishReply { revision }))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveReply>, Status> {
        authorize_publisher(&request, &self.publishers)?;
        let saver = self.saver()?;
        let req = request.into_inner();
        let id = super::parse_id(&req.id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let db = saver.db().await.map_err(status_of)?;
        let labels = db
            .remove(&id, req.label.as_deref(), crate::now_ms())
            .await
            .map_err(|e| status_of(e.into()))?;
        Ok(Response::new(pb::RemoveReply { labels }))
    }
}

/// A retriever source that asks a hub agent.
pub struct HubSource {
    address: String,
    calls: std::sync::atomic::AtomicU64,
    client: pb::artifact_hub_client::ArtifactHubClient<Channel>,
    poll: Duration,
}

impl HubSource {
    pub async fn new(
        address: &str,
        tls: Option<&TlsConfig>,
        poll: Duration,
    ) -> Result<Self, crate::net::NetError> {
        let channel = crate::net::channel(address, tls, "hub").await?;
        Ok(Self {
            address: address.to_owned(),
            calls: std::sync::atomic::AtomicU64::new(0),
            client: pb::artifact_hub_client::ArtifactHubClient::new(channel)
                .max_decoding_message_size(crate::net::MAX_MESSAGE_BYTES),
            poll,
        })
    }
}

fn source_err(s: Status) -> SourceError {
    match s.code() {
        tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::InvalidArgument => {
            SourceError::Artifact {
                id: String::new(),
                problem: s.message().to_owned(),
            }
        }
        _ => super::retriever::Unavailable::Hub(s.message().to_owned()).into(),
    }
}

impl HubSource {
    /// A client for one call (counted).
    fn client(&self) -> pb::artifact_hub_client::ArtifactHubClient<Channel> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.client.clone()
    }
}

#[tonic::async_trait]
impl Source for HubSource {
    fn describe(&self) -> String {
        format!("hub {}", self.address)
    }

    fn queries(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError> {
        let reply = self
            .client()
            .current(pb::CurrentRequest {
                labels: labels.to_vec(),
            })
            .await
            .map_err(source_err)?;
        reply
            .into_inner()
            .artifacts
            .into_iter()
            .map(meta_from_pb)
            .collect()
    }

    async fn get(&self, id: &str, labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError> {
        let reply = self
            .client()
            .get(pb::GetRequest {
                id: id.into(),
                labels: labels.to_vec(),
            })
            .await
            .map_err(source_err)?;
        reply.into_inner().artifact.map(meta_from_pb).transpose()
    }

    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError> {
        let bad = |problem: String| SourceError::Artifact {
            id: meta.id.clone(),
            problem,
        };
        let mut stream = self
            .client()
            .bundle(pb::BundleRequest {
                id: meta.id.clone(),
                revision: meta.revision,
                labels: meta.labels.clone(),
            })
            .await
            .map_err(|s| match source_err(s) {
                SourceError::Artifact { problem, .. } => bad(problem),
                other => other,
            })?
            .into_inner();
        let mut files: Vec<BundleFile> = Vec::new();
        let mut total: u64 = 0;
        while let Some(chunk) = stream.message().await.map_err(source_err)? {
            total += chunk.data.len() as u64;
            if total > meta.size.max(1) * 2 + 1024 {
                return Err(bad("hub sent more data than the artifact's size".into()));
            }
            if chunk.start {
                let path =
                    RelPath::new(&chunk.path).map_err(|e| bad(format!("bundle path: {e}")))?;
                if chunk.mode > 0o7777 {
                    return Err(bad(format!("{path}: bad mode")));
                }
                files.push(BundleFile {
                    path,
                    mode: chunk.mode,
                    data: chunk.data,
                });
            } else {
                let last = files
                    .last_mut()
                    .ok_or_else(|| bad("bundle stream starts mid-file".into()))?;
                last.data.extend_from_slice(&chunk.data);
            }
        }
        let bundle = Bundle { files };
        if bundle.digest() != meta.digest {
            return Err(bad("bundle from the hub does not match its digest".into()));
        }
        Ok(bundle)
    }

    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError> {
        let reply = self
            .client()
            .events(pb::EventsRequest { after, limit })
            .await
            .map_err(source_err)?;
        Ok(reply
            .into_inner()
            .events
            .into_iter()
            .filter_map(|e| {
                Some(Event {
                    id: e.id,
                    instruction: Instruction::parse(&e.instruction)?,
                    artifact_id: e.artifact_id,
                    label: e.label,
                    revision: e.revision,
                })
            })
            .collect())
    }

    async fn last_event_id(&self) -> Result<i64, SourceError> {
        let reply = self
            .client()
            .last_event_id(pb::LastEventIdRequest {})
            .await
            .map_err(source_err)?;
        Ok(reply.into_inner().id)
    }

    async fn wait(&self, max: Duration) {
        tokio::time::sleep(self.poll.min(max)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::artifact_saver_server::ArtifactSaver;

    #[tokio::test]
    async fn a_caller_of_unknown_origin_is_refused_before_the_database_is_touched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/artifacts.db", dir.path().display());
        let hub = HubService::new(Arc::new(DbSource::new(&url, Duration::from_millis(200))));
        // A request that did not come through the server has no remote address.
        let publish = hub
            .publish(Request::new(pb::PublishRequest::default()))
            .await
            .expect_err("refused");
        assert_eq!(publish.code(), tonic::Code::PermissionDenied);
        assert!(publish.message().contains("mutual TLS"), "{publish:?}");
        let remove = hub
            .remove(Request::new(pb::RemoveRequest::default()))
            .await
            .expect_err("refused");
        assert_eq!(remove.code(), tonic::Code::PermissionDenied);
        assert_eq!(hub.source.queries(), 0, "the database was not asked");
        assert!(!dir.path().join("artifacts.db").exists());
    }
}
