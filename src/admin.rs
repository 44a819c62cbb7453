//! The local admin service: `artisync status`, `conflicts` and `resume` talk to the running
//! agent over a unix socket in `state_dir` (mode 0600: only the agent's user may use it).
//! Answers are JSON documents; the CLI prints them as they are (`--json`) or as text.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::engine::{FolderHandle, FolderStatus};
use crate::liveness::{self, ENGINE_STALL_LIMIT, EngineReport};
use crate::model::{FolderId, NodeId};
use crate::net::{PeerStatus, PeerStatuses};
use crate::pb::admin as pb;
use crate::store::{ConflictEntry, Store};

/// The whole `artisync status --json` document.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct StatusReport {
    pub node: String,
    pub node_id: String,
    pub listen: String,
    pub uptime_secs: u64,
    pub folders: Vec<FolderReport>,
    pub peers: Vec<PeerStatus>,
    pub retriever: Option<crate::artifacts::retriever::RetrieverStatus>,
}

/// A folder's status as the engine reports it, plus whether it is in sync with every peer.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FolderReport {
    #[serde(flatten)]
    pub status: FolderStatus,
    /// The engine's liveness, judged when the report is made (a stuck or dead engine cannot
    /// publish its own status, so `status` may be old then).
    #[serde(default)]
    pub engine: Option<EngineReport>,
    /// Not paused, nothing held or skipped, the engine neither stalled nor stopped, and every
    /// peer connected with nothing left to apply.
    pub in_sync: bool,
}

#[derive(Clone)]
pub struct AdminService {
    pub node: NodeId,
    pub node_name: crate::model::PeerName,
    pub listen: String,
    pub started: std::time::Instant,
    pub folders: Arc<HashMap<FolderId, FolderHandle>>,
    pub peers: PeerStatuses,
    pub store: Store,
    pub retriever: Option<crate::artifacts::retriever::RetrieverHandle>,
}

impl AdminService {
    pub fn report(&self) -> StatusReport {
        let peers: Vec<PeerStatus> = self
            .peers
            .lock()
            .map(|m| {
                let mut v: Vec<PeerStatus> = m.values().cloned().collect();
                v.sort_by(|a, b| a.name.cmp(&b.name));
                v
            })
            .unwrap_or_default();
        let now_ms = liveness::mono_ms();
        let mut folders: Vec<FolderReport> = self
            .folders
            .values()
            .map(|h| {
                let f = h.status();
                let engine = h.engine_report(now_ms, ENGINE_STALL_LIMIT);
                FolderReport {
                    in_sync: in_sync(&f, &engine, &peers),
                    engine: Some(engine),
                    status: f,
                }
            })
            .collect();
        folders.sort_by(|a, b| a.status.id.cmp(&b.status.id));
        StatusReport {
            node: self.node_name.to_string(),
            node_id: self.node.to_string(),
            listen: self.listen.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            retriever: self.retriever.as_ref().map(|r| r.status()),
            folders,
            peers,
        }
    }

    pub fn into_server(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self)
    }
}

/// See [`FolderReport::in_sync`].
pub(crate) fn in_sync(f: &FolderStatus, engine: &EngineReport, peers: &[PeerStatus]) -> bool {
    let peers_done = peers
        .iter()
        .all(|p| p.connected && p.behind.get(f.id.as_str()).is_some_and(|b| *b == 0));
    f.paused.is_none()
        && f.index_error.is_none()
        && f.held.is_empty()
        && f.skipped.is_empty()
        && !engine.is_failing()
        && peers_done
}

fn json<T: Serialize>(value: &T) -> Result<Response<pb::Json>, Status> {
    serde_json::to_string_pretty(value)
        .map(|json| Response::new(pb::Json { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(&self, _: Request<pb::Empty>) -> Result<Response<pb::Json>, Status> {
        json(&self.report())
    }

    async fn conflicts(&self, _: Request<pb::Empty>) -> Result<Response<pb::Json>, Status> {
        let list: Vec<ConflictEntry> = self
            .store
            .conflicts()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        json(&list)
    }

    async fn resume(
        &self,
        request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::Json>, Status> {
        let folder = request.into_inner().folder;
        let handle = self
            .folders
            .get(folder.as_str())
            .ok_or_else(|| Status::not_found(format!("no folder {folder:?}")))?;
        let text = handle
            .resume()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        json(&serde_json::json!({ "folder": folder, "result": text }))
    }

    async fn deployed(&self, _: Request<pb::Empty>) -> Result<Response<pb::Json>, Status> {
        json(&self.retriever()?.status())
    }

    async fn redeploy(
        &self,
        request: Request<pb::ArtifactRequest>,
    ) -> Result<Response<pb::Json>, Status> {
        self.artifact_command(
            request.into_inner().id,
            crate::artifacts::retriever::Command::Redeploy,
        )
        .await
    }

    async fn undeploy(
        &self,
        request: Request<pb::ArtifactRequest>,
    ) -> Result<Response<pb::Json>, Status> {
        self.artifact_command(
            request.into_inner().id,
            crate::artifacts::retriever::Command::Undeploy,
        )
        .await
    }
}

impl AdminService {
    fn retriever(&self) -> Result<&crate::artifacts::retriever::RetrieverHandle, Status> {
        self.retriever
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this node has no [retriever] configured"))
    }

    async fn artifact_command(
        &self,
        id: String,
        make: fn(
            String,
            tokio::sync::oneshot::Sender<Result<String, crate::artifacts::retriever::CommandError>>,
        ) -> crate::artifacts::retriever::Command,
    ) -> Result<Response<pb::Json>, Status> {
        let id =
            crate::artifacts::parse_id(&id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let r = self.retriever()?.command(|tx| make(id.clone(), tx)).await;
        match r {
            Ok(text) => json(&serde_json::json!({ "id": id, "result": text })),
            Err(e) => Err(Status::failed_precondition(e.to_string())),
        }
    }
}

/// Errors of the CLI side of the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error(
        "the agent is not running (no admin socket at {0}); start it with `artisync run --config FILE`"
    )]
    NotRunning(String),
    #[error("admin socket {path}: {message}")]
    Call { path: String, message: String },
}

/// Connects to the agent's admin socket.
pub async fn connect(
    socket: &Path,
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, AdminClientError> {
    let path = socket.display().to_string();
    if !socket.exists() {
        return Err(AdminClientError::NotRunning(path));
    }
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("unix://{path}")).map_err(|e| {
            AdminClientError::Call {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|_| AdminClientError::NotRunning(path.clone()))?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

/// One admin call returning its JSON document.
pub async fn call(
    socket: &Path,
    what: &str,
    arg: Option<String>,
) -> Result<String, AdminClientError> {
    let mut client = connect(socket).await?;
    let path = socket.display().to_string();
    let result = match (what, arg) {
        ("status", _) => client.status(pb::Empty {}).await,
        ("conflicts", _) => client.conflicts(pb::Empty {}).await,
        ("resume", Some(folder)) => client.resume(pb::ResumeRequest { folder }).await,
        ("deployed", _) => client.deployed(pb::Empty {}).await,
        ("redeploy", Some(id)) => client.redeploy(pb::ArtifactRequest { id }).await,
        ("undeploy", Some(id)) => client.undeploy(pb::ArtifactRequest { id }).await,
        _ => {
            return Err(AdminClientError::Call {
                path,
                message: format!("unknown admin call {what}"),
            });
        }
    };
    result
        .map(|r| r.into_inner().json)
        .map_err(|s| AdminClientError::Call {
            path,
            message: s.message().to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::Verdict;

    #[test]
    fn a_folder_whose_engine_is_stalled_or_stopped_is_not_in_sync() {
        let f = FolderStatus {
            id: "synapse-configs".into(),
            ..Default::default()
        };
        let peer = PeerStatus {
            name: "gw2".into(),
            connected: true,
            behind: [(FolderId::literal("synapse-configs"), 0)].into(),
            ..Default::default()
        };
        let engine = |state| EngineReport {
            state,
            for_secs: 400,
            quiet_secs: 400,
        };
        let peers = std::slice::from_ref(&peer);
        assert!(in_sync(&f, &engine(Verdict::Idle), peers));
        assert!(in_sync(&f, &engine(Verdict::Working), peers));
        assert!(!in_sync(&f, &engine(Verdict::Stalled), peers));
        assert!(!in_sync(&f, &engine(Verdict::Stopped), peers));
    }

    #[test]
    fn status_text_says_loudly_that_an_engine_is_stalled() {
        let report = StatusReport {
            node: "gw1".into(),
            node_id: "1".into(),
            listen: "127.0.0.1:7701".into(),
            uptime_secs: 1,
            folders: vec![FolderReport {
                status: FolderStatus {
                    id: "synapse-configs".into(),
                    ..Default::default()
                },
                engine: Some(EngineReport {
                    state: Verdict::Stalled,
                    for_secs: 420,
                    quiet_secs: 360,
                }),
                in_sync: false,
            }],
            peers: Vec::new(),
            retriever: None,
        };
        let text = crate::demo::render_status(&report);
        assert!(text.contains("NOT in sync"), "{text}");
        assert!(
            text.contains("ENGINE STALLED: busy for 420 s, no progress for 360 s"),
            "{text}"
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(json["folders"][0]["engine"]["state"], "stalled");
    }
}
