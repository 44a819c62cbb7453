//! The retriever's status and the commands the admin service sends it, and how the retriever
//! carries those out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Retriever, SourceError};
use crate::artifacts::owners::PathConflict;
use crate::store::DeployedArtifact;

/// A deployment that failed, and when it is tried again.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub id: String,
    pub revision: i64,
    pub attempts: u32,
    pub reason: String,
    /// Retries ran out: the node runs without it until a new event or `redeploy`.
    pub gave_up: bool,
    #[serde(skip)]
    pub(super) next_at: Option<Instant>,
}

/// What `artisync status` shows about the retriever.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct RetrieverStatus {
    pub mode: String,
    pub source: String,
    /// The default folder (WSO2: the super tenant's).
    pub folder: String,
    /// Tenant domain -> folder id (`[retriever.tenants]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, String>,
    pub labels: Vec<String>,
    pub startup_done: bool,
    pub source_available: bool,
    pub last_event_id: i64,
    /// Queries issued to the database (or calls to the hub) since start.
    pub source_queries: u64,
    pub deployed: Vec<DeployedArtifact>,
    pub failing: Vec<serde_json::Value>,
    pub last_error: Option<String>,
    /// Paths where deployed artifacts want different content, and which one the file holds.
    #[serde(default)]
    pub conflicts: Vec<PathConflict>,
}

/// Local admin actions (this node only). The reply is the text the admin prints.
pub enum Command {
    Redeploy(String, oneshot::Sender<Result<String, CommandError>>),
    Undeploy(String, oneshot::Sender<Result<String, CommandError>>),
}

/// Why a local admin action on one artifact did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("artifact {id} failed: {reason}")]
    Failed { id: String, reason: String },
    #[error("artifact {id} is not current for this node's labels")]
    NotCurrent { id: String },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("artifact {id} could not be undeployed (see log)")]
    NotUndeployed { id: String },
    #[error("artifact {id} is not deployed on this node")]
    NotDeployed { id: String },
    #[error("retriever has stopped")]
    Stopped,
}

/// Handle for the admin service.
#[derive(Clone)]
pub struct RetrieverHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) status: Arc<Mutex<RetrieverStatus>>,
}

impl RetrieverHandle {
    pub fn status(&self) -> RetrieverStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub async fn command(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<String, CommandError>>) -> Command,
    ) -> Result<String, CommandError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| CommandError::Stopped)?;
        rx.await.map_err(|_| CommandError::Stopped)?
    }
}

impl Retriever {
    pub(super) async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Redeploy(id, reply) => {
                self.held_off.remove(&id);
                self.failures.remove(&id);
                if let Some(d) = self.deployed.get_mut(&id) {
                    d.revision = -1; // fetched again, and its files checked
                }
                let r = match self.sync_one(&id).await {
                    Ok(()) => match (self.deployed.get(&id), self.failures.get(&id)) {
                        (_, Some(f)) => Err(CommandError::Failed {
                            id: id.clone(),
                            reason: f.reason.clone(),
                        }),
                        (Some(d), None) => {
                            Ok(format!("artifact {id} deployed at revision {}", d.revision))
                        }
                        (None, None) => Err(CommandError::NotCurrent { id: id.clone() }),
                    },
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(r);
            }
            Command::Undeploy(id, reply) => {
                let r = if self.deployed.contains_key(&id) {
                    self.undeploy(&id).await;
                    if self.deployed.contains_key(&id) {
                        Err(CommandError::NotUndeployed { id: id.clone() })
                    } else {
                        self.held_off.insert(id.clone());
                        Ok(format!(
                            "artifact {id} undeployed on this node (until redeploy or a new publish)"
                        ))
                    }
                } else {
                    Err(CommandError::NotDeployed { id: id.clone() })
                };
                let _ = reply.send(r);
            }
        }
    }
}
