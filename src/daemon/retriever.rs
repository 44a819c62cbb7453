//! Starting the artifact retriever: its source (a DB-backed node also serves the hub and the
//! saver to agents without DB access), then its task once the gRPC server serves.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::watch;

use super::servers::GrpcServer;
use super::{DaemonError, Tasks};
use crate::artifacts::retriever::{Retriever, RetrieverHandle};
use crate::config::Config;
use crate::engine::FolderHandle;
use crate::model::FolderId;
use crate::store::Store;

/// A retriever made and waiting to run.
pub(super) struct RetrieverStart {
    retriever: Retriever,
    handle: RetrieverHandle,
    sync: bool,
}

/// A running retriever: its handle, and in sync start-up mode, whether the start-up deploy
/// finished.
pub(super) struct RetrieverRunning {
    pub(super) handle: RetrieverHandle,
    pub(super) startup: Option<watch::Receiver<bool>>,
}

impl RetrieverStart {
    /// Makes the retriever when one is configured, and adds its hub to `grpc` when its
    /// source is a database.
    pub(super) async fn prepare(
        config: &Config,
        folders: &Arc<HashMap<FolderId, FolderHandle>>,
        store: &Store,
        mut grpc: GrpcServer,
    ) -> Result<(GrpcServer, Option<Self>), DaemonError> {
        let Some(rc) = &config.retriever else {
            return Ok((grpc, None));
        };
        // The retriever: a DB-backed node also serves the hub and saver to agents without DB
        // access (with WSO2's tables: the hub only).
        let (source, hub) = crate::artifacts::source_for(rc, config.tls.as_ref()).await?;
        if let Some(hub) = hub {
            grpc = grpc.with_hub(hub);
        }
        // A handle on each target folder: retriever.folder and each tenant's.
        let mut targets = BTreeMap::new();
        for id in rc.target_folders() {
            let folder = folders.get(id).cloned().ok_or_else(|| {
                DaemonError::Retriever(format!(
                    "retriever folder {id:?} is not a configured folder"
                ))
            })?;
            targets.insert(folder.id.clone(), folder);
        }
        let (retriever, handle) =
            Retriever::new(rc.clone(), targets, store.clone(), source).await?;
        let start = Self {
            retriever,
            handle,
            sync: rc.sync_start(),
        };
        Ok((grpc, Some(start)))
    }

    /// Spawns the retriever's task.
    pub(super) fn start(self, tasks: &Tasks) -> RetrieverRunning {
        let (ready_tx, ready_rx) = watch::channel(false);
        tasks
            .tracker
            .spawn(self.retriever.run(ready_tx, tasks.cancel.clone()));
        RetrieverRunning {
            handle: self.handle,
            startup: self.sync.then_some(ready_rx),
        }
    }
}
