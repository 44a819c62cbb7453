//! Deploying artifacts from the database into the folder (see [`DeployRequest`]).

use std::collections::BTreeSet;

use crate::engine::{DeployRequest, EngineError, FolderEngine, FolderHandle, block};
use crate::fs::apply;
use crate::fs::apply::{Content, Op};
use crate::model::{Hash, RelPath};

impl FolderEngine {
    pub(in crate::engine) async fn on_deploy(
        &mut self,
        request: DeployRequest,
    ) -> Result<(), EngineError> {
        if let Some(reason) = &self.paused {
            return Err(EngineError::Paused {
                folder: self.id.clone(),
                reason: reason.clone(),
            });
        }
        self.index_writable()?;
        // Deployed files get the folder's permissions (without execute bits), never wider.
        let root_mode = block(|| std::fs::metadata(&self.root))
            .map(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode()
            })
            .unwrap_or(0o750);
        let file_mode = root_mode & 0o666;
        let mut paths = BTreeSet::new();
        let mut ops = Vec::new();
        for (path, data) in request.writes {
            if self.ignore.is_ignored(&path) {
                continue;
            }
            paths.insert(path.clone());
            ops.push(Op::Write {
                path,
                content: Content::Bytes(data.into()),
                mode: file_mode,
                new: false,
                // The database is the authority for deployed files: replaced as they are.
                expect: None,
            });
        }
        for path in request.removes {
            paths.insert(path.clone());
            ops.push(Op::RemoveFile { path, expect: None });
        }
        let described: Vec<String> = ops.iter().map(|o| o.path().to_string()).collect();
        let results = block(|| apply::apply_batch(&self.root, ops, Some(&self.own)));
        let failure = described
            .into_iter()
            .zip(&results)
            .find_map(|(p, r)| r.as_ref().err().map(|e| (p, e.to_string())));
        let failures = results.iter().filter(|r| r.is_err()).count();
        // Record whatever did land, as local changes.
        self.observe(paths).await?;
        match failure {
            Some((path, problem)) => Err(EngineError::ApplyFailed {
                folder: self.id.clone(),
                failed: failures,
                path,
                problem,
            }),
            None => Ok(()),
        }
    }
}

impl FolderHandle {
    /// The BLAKE3 hash of each file below the root as it is on disk now (`None`: missing, not
    /// a regular file, or behind a symlink), for the retriever's check of deployed files.
    /// Read outside the engine: a file that changes meanwhile is caught by the next check.
    pub async fn disk_hashes(&self, paths: Vec<RelPath>) -> Vec<Option<Hash>> {
        let root = self.root.clone();
        let count = paths.len();
        tokio::task::spawn_blocking(move || {
            let Ok(root) = crate::fs::beneath::Root::open(&root) else {
                return vec![None; paths.len()];
            };
            paths
                .iter()
                .map(|p| {
                    let mut file = root.open_file(p).ok()?;
                    let mut hasher = blake3::Hasher::new();
                    std::io::copy(&mut file, &mut hasher).ok()?;
                    Some(*hasher.finalize().as_bytes())
                })
                .collect()
        })
        .await
        .unwrap_or_else(|_| vec![None; count])
    }
}
