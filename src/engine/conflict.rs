//! Keeping the losing side of a conflict, or a held local file a peer version replaces, as a
//! copy under the conflicts directory, named after the node that wrote it.

use tracing::{debug, warn};

use crate::engine::{FolderEngine, block};
use crate::fs::apply;
use crate::model::{FileRecord, Hash, Hlc, NodeId, RelPath};
use crate::store::ConflictEntry;

impl FolderEngine {
    /// Keeps the local bytes that lose a conflict under `state_dir/conflicts/<folder>/<path>.<node>.<stamp>`.
    /// False when the file on disk no longer holds the losing version (written since the
    /// last look): nothing is kept, the caller looks at the file first.
    pub(in crate::engine) async fn keep_conflict_copy(
        &mut self,
        winner: &FileRecord,
        local: Option<&FileRecord>,
        now: u64,
        peer: &str,
    ) -> Result<bool, std::io::Error> {
        let Some(local) = local else { return Ok(true) };
        let writer = self.name_of(local.stamp.node);
        let winner_name = self.name_of(winner.stamp.node);
        let warning =
            "conflict: concurrent change elsewhere wins; local version kept as a conflict copy";
        let stamp_ms = Hlc::millis(local.stamp.hlc);
        self.keep_copy_of(
            &local.path,
            local.hash.as_ref(),
            &writer,
            stamp_ms,
            winner_name,
            now,
            peer,
            warning,
        )
        .await
    }

    /// Keeps the local bytes of a file held back by the XML gate, which a peer's version is
    /// about to replace (or delete), as a conflict copy named after this node and the file's
    /// modification time.
    pub(in crate::engine) async fn keep_held_copy(
        &mut self,
        winner: &FileRecord,
        now: u64,
        peer: &str,
    ) -> Result<(), std::io::Error> {
        let writer = self.opts.node_name.clone();
        let winner_name = self.name_of(winner.stamp.node);
        let warning = "a peer's version replaces a local file held back as not well-formed; the local bytes are kept as a conflict copy";
        // Named by the file's mtime: the same bytes met again make the same name.
        let full = self.root.join(winner.path.as_str());
        let mtime_ms = std::fs::symlink_metadata(&full)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(now, |d| d.as_millis() as u64);
        // Held bytes were never indexed: whatever is there is what the peer's version
        // replaces.
        self.keep_copy_of(
            &winner.path,
            None,
            &writer,
            mtime_ms,
            winner_name,
            now,
            peer,
            warning,
        )
        .await
        .map(|_| ())
    }

    /// The human name of a node, as far as this node knows it.
    pub(in crate::engine) fn name_of(&self, id: NodeId) -> String {
        if id == self.opts.node {
            return self.opts.node_name.to_string();
        }
        self.opts
            .names
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(|n| n.to_string()))
            .unwrap_or_else(|| id.to_string())
    }

    /// Copies the file at `path` to `conflicts/<folder>/<path>.<writer>.<stamp_ms>` and logs
    /// the copy; nothing when the file is gone, or when the same bytes were kept under that
    /// name before (a batch prepared, abandoned and retried meets its conflict twice).
    /// With `expect`, the bytes must have that hash: false (nothing kept) when they do not.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::engine) async fn keep_copy_of(
        &mut self,
        path: &RelPath,
        expect: Option<&Hash>,
        writer: &str,
        stamp_ms: u64,
        winner_name: String,
        now: u64,
        peer: &str,
        warning: &str,
    ) -> Result<bool, std::io::Error> {
        let dest = self
            .opts
            .conflicts_dir
            .join(&self.id)
            .join(format!("{path}.{writer}.{stamp_ms}"));
        let src = self.root.join(path.as_str());
        let dest = match block(|| apply::keep_copy(&src, &dest, expect))? {
            apply::Kept::New(dest) => dest,
            apply::Kept::Already(dest) => {
                debug!(folder = %self.id, path = %path, copy = %dest.display(), "conflict copy kept before");
                return Ok(true);
            }
            apply::Kept::Gone => return Ok(true),
            apply::Kept::Changed => {
                debug!(folder = %self.id, path = %path, peer = %peer, "the local file changed since the last look; no conflict copy of it yet");
                return Ok(false);
            }
        };
        warn!(folder = %self.id, path = %path, peer = %peer, copy = %dest.display(), "{warning}");
        self.conflicts += 1;
        let entry = ConflictEntry {
            folder: self.id.to_string(),
            path: path.to_string(),
            copy: dest.display().to_string(),
            winner_node: winner_name,
            created_ms: now,
        };
        if let Err(e) = self.store.add_conflict(&entry).await {
            warn!(folder = %self.id, error = %e, "cannot log conflict in the index");
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use crate::engine::testing::*;
    use crate::fs::watch::Change;

    /// A peer's new file never overwrites a local file the index does not know yet: the
    /// write fails, the local file is looked at, and the next attempt meets it as a
    /// concurrent change. Here the local write is the later one (this node had seen the
    /// peer's stamp when it looked), so it stays, and its record does not absorb the peer's
    /// version: the peer keeps its own bytes as a conflict copy when the record reaches it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_file_meeting_an_unknown_local_file_keeps_both_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        let root = dir.path().join("root");
        // Written after the engine's scan, with no watcher to tell it.
        std::fs::write(root.join("x.xml"), b"<local/>").expect("local write");
        let peer_file = || remote_file("x.xml", b"<peer/>", 1, true);
        match handle.remote(batch(1, 1, vec![peer_file()])).await {
            Err(EngineError::ApplyFailed { path, .. }) => assert_eq!(path.as_str(), "x.xml"),
            other => panic!("expected the write to fail on the local file, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(root.join("x.xml")).expect("x.xml"),
            b"<local/>",
            "the local file is untouched"
        );
        // The session comes back on a new stream: the engine looked at the local file after
        // the failure (there is no watcher here), so now it is a concurrent change.
        let applied = handle
            .remote(batch(2, 1, vec![peer_file()]))
            .await
            .expect("the second attempt is decided");
        assert_eq!(applied, 1);
        assert_eq!(
            std::fs::read(root.join("x.xml")).expect("x.xml"),
            b"<local/>"
        );
        let rows = store
            .since("synapse-configs", 0, 10, None)
            .await
            .expect("index");
        let x = rows
            .iter()
            .find(|r| r.record.path.as_str() == "x.xml")
            .expect("the local file is in the index");
        assert_eq!(x.record.hash, Some(*blake3::hash(b"<local/>").as_bytes()));
        assert_eq!(
            x.record.version.compare(&peer_file().record.version),
            crate::model::Causality::Concurrent,
            "the local record must not dominate the peer's write it does not hold"
        );
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// A peer's version never meets a file a local program is writing: it waits in the
    /// stream (no look at the half-written file, no conflict copy of it, nothing replaced),
    /// and after the writer's close the conflict copy holds the complete local version.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_copy_waits_for_the_local_writers_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        let target = root.join("x.xml");
        std::fs::write(&target, b"<local v1/>").expect("write");
        let (handle, store, cancel, task, own) = engine_watched(dir.path()).await;
        // A local program opens the file with O_TRUNC, as the watcher sees it.
        std::fs::write(&target, b"").expect("truncate");
        own.note_writing(&target);
        // The peer's concurrent version, stamped after the local one: it wins.
        let peer = || {
            let mut inc = remote_file("x.xml", b"<peer/>", 1, true);
            inc.record.stamp.hlc = Hlc::default().tick(crate::now_ms() + 1_000);
            inc
        };
        match handle.remote(batch(1, 1, vec![peer()])).await {
            Err(EngineError::ApplyFailed { path, problem, .. }) => {
                assert_eq!(path, "x.xml");
                assert!(problem.contains("writing"), "{problem}");
            }
            other => panic!("the peer's version must wait for the writer, got {other:?}"),
        }
        assert_eq!(std::fs::read(&target).expect("x.xml"), b"", "untouched");
        assert!(
            !dir.path().join("conflicts").exists(),
            "no copy of a half-written file"
        );
        assert_eq!(
            row_of(&store, "x.xml").await.record.hash,
            Some(*blake3::hash(b"<local v1/>").as_bytes()),
            "the half-written file is not recorded"
        );
        // The writer finishes and closes; the watcher hands the path over.
        std::fs::write(&target, b"<local v2, complete/>").expect("write");
        own.end_writing(&target);
        handle
            .local(Change::Paths(vec![RelPath::new("x.xml").expect("valid")]))
            .await
            .expect("local");
        handle
            .remote(batch(2, 1, vec![peer()]))
            .await
            .expect("decided after the close");
        assert_eq!(std::fs::read(&target).expect("x.xml"), b"<peer/>");
        let copies = conflict_copies(dir.path());
        assert_eq!(copies, vec![b"<local v2, complete/>".to_vec()]);
        cancel.cancel();
        task.await.expect("engine task");
    }

    /// Local bytes held back by the XML gate were never shipped: a peer's version that
    /// replaces them (a new file at that path, or a newer version of a known file) keeps them
    /// as a conflict copy first, and the path is no longer held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_version_replacing_a_held_file_keeps_the_local_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("new.xml"), b"<api").expect("write");
        let (handle, store, cancel, task) = engine_on(dir.path()).await;
        assert!(handle.status().held.contains_key("new.xml"));
        let applied = handle
            .remote(batch(
                1,
                1,
                vec![remote_file("new.xml", b"<api/>", 1, true)],
            ))
            .await
            .expect("a new file replaces the held one");
        assert_eq!(applied, 1);
        assert_eq!(
            std::fs::read(root.join("new.xml")).expect("new.xml"),
            b"<api/>"
        );

        handle
            .remote(batch(
                1,
                2,
                vec![remote_file("known.xml", b"<v1/>", 2, true)],
            ))
            .await
            .expect("applies");
        std::fs::write(root.join("known.xml"), b"<v1").expect("write");
        handle
            .local(Change::Paths(vec![
                RelPath::new("known.xml").expect("valid"),
            ]))
            .await
            .expect("queued");
        assert!(
            status_until(&handle, |s| s.held.contains_key("known.xml")).await,
            "the broken edit is held"
        );
        let mut v2 = remote_file("known.xml", b"<v2/>", 3, true);
        v2.record.version.bump(PEER);
        handle
            .remote(batch(1, 3, vec![v2]))
            .await
            .expect("the newer version applies");
        assert_eq!(
            std::fs::read(root.join("known.xml")).expect("known.xml"),
            b"<v2/>"
        );

        let mut kept: Vec<(String, Vec<u8>)> = store
            .conflicts()
            .await
            .expect("conflicts")
            .into_iter()
            .map(|c| (c.path, std::fs::read(&c.copy).expect("the copy is there")))
            .collect();
        kept.sort();
        assert_eq!(
            kept,
            vec![
                ("known.xml".to_owned(), b"<v1".to_vec()),
                ("new.xml".to_owned(), b"<api".to_vec()),
            ]
        );
        let status = handle.status();
        assert!(status.held.is_empty(), "{:?}", status.held);
        assert_eq!(status.conflicts, 2);
        cancel.cancel();
        task.await.expect("engine task");
    }
}
