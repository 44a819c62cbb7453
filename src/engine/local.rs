//! Local changes: a watcher hint or a rescan becomes a `look` at each path (stat + hash), the
//! model's `observe_local`, and an index commit that wakes the subscribers.

use std::collections::BTreeSet;

use tracing::{debug, info, warn};

use crate::engine::{EngineError, FolderEngine, block};
use crate::fs::scan::Look;
use crate::fs::watch::Change;
use crate::fs::{par, scan, xml};
use crate::model::{Kind, RelPath};
use crate::store::{SkipChanges, StatKey, StoredRecord};

/// Longest a local change waits for a chain of peer batches (see `remote_chain`). Ending a
/// chain costs the overlap of one batch, so this bounds that cost to one batch a second of
/// inflow; a local edit made during a bulk inflow reaches the index (and the peers) at most
/// this much later. The watcher's quiet period is on top, as always.
pub(in crate::engine) const LOCAL_DEFER_MAX: std::time::Duration =
    std::time::Duration::from_secs(1);

/// A local change waits for a chain of peer batches no longer than this: then the chain ends.
pub(in crate::engine) fn waited_enough(deferred: &Option<(Change, std::time::Instant)>) -> bool {
    deferred
        .as_ref()
        .is_some_and(|(_, since)| since.elapsed() >= LOCAL_DEFER_MAX)
}

/// One change standing for two that came one after the other: the union of their paths, or
/// a rescan when either is one.
pub(in crate::engine) fn merge_changes(a: Change, b: Change) -> Change {
    match (a, b) {
        (Change::Paths(mut a), Change::Paths(b)) => {
            a.extend(b);
            Change::Paths(a)
        }
        _ => Change::Rescan,
    }
}

impl FolderEngine {
    /// Looks at local paths (or the whole folder) and records what changed.
    pub(in crate::engine) async fn on_local(&mut self, change: Change) -> Result<(), EngineError> {
        if self.index_error.is_some() {
            // Nothing can be recorded now; the rescan after the index reload sees it all.
            return Ok(());
        }
        // Mass-delete guard, part 1: the root must be there and be the same directory.
        let identity = block(|| scan::root_identity(&self.root));
        match identity {
            None => {
                self.pause(format!(
                    "folder root {} is missing or not a directory",
                    self.root.display()
                ));
                return Ok(());
            }
            Some(id) if self.root_identity.is_some_and(|old| old != id) && !self.confirmed => {
                // Another directory or mount stands at the root: stay paused until the
                // original is back or an operator confirms.
                self.pause(format!(
                    "folder root {} was replaced (another directory or mount)",
                    self.root.display()
                ));
                return Ok(());
            }
            Some(_) => {}
        }
        // Mass-delete guard, part 2: an empty root while the index has content (an unmounted
        // disk, `rm -rf root/*`) pauses the folder instead of deleting on every node.
        if self.live_count() > 0 && !self.confirmed && block(|| self.root_is_empty()) {
            self.pause(format!(
                "folder root {} is empty but the index has {} entries (unmounted disk?)",
                self.root.display(),
                self.live_count()
            ));
            return Ok(());
        }
        let full = matches!(change, Change::Rescan) || self.paused.is_some();
        let mut paths: BTreeSet<RelPath> = BTreeSet::new();
        if full {
            let walk = block(|| scan::walk(&self.root, &self.ignore)).map_err(|source| {
                EngineError::Scan {
                    folder: self.id.clone(),
                    source,
                }
            })?;
            self.log_walk_problems(&walk);
            if self.paused.is_some() {
                info!(folder = %self.id, "folder root is back with content; resuming");
                self.paused = None;
            }
            self.root_identity = identity;
            paths.extend(walk.paths);
            paths.extend(
                self.replica
                    .records()
                    .filter(|r| !r.deleted)
                    .map(|r| r.path.clone()),
            );
        } else if let Change::Paths(list) = change {
            for p in list {
                self.expand(&p, &mut paths);
            }
        }
        self.confirmed = false;
        self.observe(paths).await
    }

    /// A changed directory may hide changes below it (a directory moved in or out, or created
    /// before its watch existed): look at its whole subtree.
    ///
    /// Parents the index has no live record of are looked at too (their own events may still
    /// wait out the quiet period): records then go out parents-first, so a peer never has to
    /// create a directory its index does not know, which it would record as its own change.
    pub(in crate::engine) fn expand(&self, path: &RelPath, out: &mut BTreeSet<RelPath>) {
        let mut up = path.parent();
        while let Some(parent) = up {
            if self.replica.get(&parent).is_some_and(|r| !r.deleted) {
                break;
            }
            up = parent.parent();
            out.insert(parent);
        }
        out.insert(path.clone());
        let on_disk = self.root.join(path.as_str());
        let is_dir = std::fs::symlink_metadata(&on_disk)
            .map(|m| m.is_dir())
            .unwrap_or(false);
        if is_dir {
            if let Ok(walk) = scan::walk(&on_disk, &self.ignore) {
                for sub in walk.paths {
                    if let Ok(p) = RelPath::new(&format!("{path}/{sub}")) {
                        out.insert(p);
                    }
                }
            }
        }
        // Whatever the index has below it, too (a directory that went away).
        for r in self.replica.under(path) {
            if !r.deleted {
                out.insert(r.path.clone());
            }
        }
    }

    pub(in crate::engine) fn log_walk_problems(&mut self, walk: &scan::Walk) {
        for s in &walk.symlinks {
            if self.symlinks_logged.insert(s.clone()) {
                info!(folder = %self.id, path = %s, "skipping symlink (symlinks are never synced)");
            }
        }
        for b in &walk.bad_names {
            warn!(folder = %self.id, path = %b.display(), "skipping a name that is not valid UTF-8 or not a valid path");
        }
        for e in &walk.errors {
            warn!(folder = %self.id, error = %e, "cannot read part of the folder");
        }
    }

    /// A look at each of `paths`, in their order. A look is an lstat (and a hash when the stat
    /// key changed): kernel time, which overlaps on several cores. Each thread takes a run of
    /// the sorted paths, so its parent-directory checks are mostly its own.
    fn look_all(&self, paths: &[RelPath]) -> Vec<Result<Look, scan::ScanError>> {
        block(|| {
            let threads = par::threads_for(paths.len());
            let runs: Vec<&[RelPath]> =
                paths.chunks(paths.len().div_ceil(threads).max(1)).collect();
            par::map(&runs, threads, |run| {
                let mut parents = scan::ParentCheck::default();
                run.iter()
                    .map(|p| {
                        let look = scan::look_checked(&self.root, p, self.known(p), &mut parents);
                        // A scan of a large folder is long but never stuck: every path counts.
                        self.live.progress();
                        look
                    })
                    .collect::<Vec<_>>()
            })
            .into_iter()
            .flatten()
            .collect()
        })
    }

    /// Looks at each path (not ignored) on disk and records what changed: the model's
    /// `observe_local`, the stat keys, and one index commit that wakes the subscribers. XML
    /// that does not parse is held (not shipped) until it does.
    pub(in crate::engine) async fn observe(
        &mut self,
        paths: BTreeSet<RelPath>,
    ) -> Result<(), EngineError> {
        let now = crate::now_ms();
        let mut commits: Vec<StoredRecord> = Vec::new();
        let mut stat_updates: Vec<(RelPath, StatKey)> = Vec::new();
        // A file a local program is writing is looked at when the watcher hands it over
        // (at its close), never half-written.
        let paths: Vec<RelPath> = paths
            .into_iter()
            .filter(|p| !self.ignore.is_ignored(p) && !self.being_written(p))
            .collect();
        let looks = self.look_all(&paths);
        for (path, look) in paths.into_iter().zip(looks) {
            let look = match look {
                Ok(l) => {
                    self.unreadable.remove(&path);
                    l
                }
                Err(e) => {
                    warn!(folder = %self.id, path = %path, error = %e, "cannot read file");
                    self.unreadable.insert(path, e.to_string());
                    continue;
                }
            };
            let observed = match look {
                Look::Unstable => {
                    self.unstable.insert(path);
                    continue;
                }
                Look::Symlink => {
                    if self.symlinks_logged.insert(path.clone()) {
                        info!(folder = %self.id, path = %path, "skipping symlink (symlinks are never synced)");
                    }
                    continue;
                }
                Look::Absent => None,
                Look::Present(obs, stat) => Some((obs, stat)),
            };
            if let Some((obs, _)) = &observed {
                if self.xml_gate && obs.kind == Kind::File && xml::is_gated(path.as_str()) {
                    let unchanged = self.replica.get(&path).is_some_and(|r| r.matches(obs));
                    if !unchanged {
                        let full = self.root.join(path.as_str());
                        let verdict = block(|| std::fs::read(&full))
                            .map_err(|e| e.to_string())
                            .and_then(|bytes| xml::check_well_formed(&bytes));
                        if let Err(problem) = verdict {
                            if self.held.insert(path.clone(), problem.clone()).is_none() {
                                warn!(folder = %self.id, path = %path, problem = %problem, "holding XML that is not well-formed; it is not shipped until it parses");
                            }
                            continue;
                        }
                    }
                }
            }
            if self.held.remove(&path).is_some() {
                info!(folder = %self.id, path = %path, "held file is well-formed now (or gone)");
            }
            let obs = observed.as_ref().map(|(o, _)| o);
            match self.replica.observe_local(&path, obs, now) {
                Some(record) => {
                    debug!(folder = %self.id, path = %path, deleted = record.deleted, seq = record.seq, "local change");
                    let stat = observed.map(|(_, s)| s);
                    match stat {
                        Some(s) => {
                            self.stats.insert(path, s);
                        }
                        None => {
                            self.stats.remove(&path);
                        }
                    }
                    commits.push(StoredRecord {
                        record,
                        stat,
                        origin: None,
                    });
                }
                None => {
                    if let Some((_, s)) = observed {
                        if self.stats.get(&path) != Some(&s) {
                            self.stats.insert(path.clone(), s);
                            stat_updates.push((path, s));
                        }
                    }
                }
            }
        }
        if !stat_updates.is_empty() {
            self.store.update_stats(&self.id, &stat_updates).await?;
        }
        if !commits.is_empty() {
            info!(folder = %self.id, count = commits.len(), "local changes recorded");
            self.store
                .commit(&self.id, &commits, None, &SkipChanges::default())
                .await?;
            self.seq_tx.send_replace(self.replica.seq());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_changes_keep_every_path_and_a_rescan_wins() {
        let p = |s: &str| RelPath::new(s).expect("valid");
        assert_eq!(
            merge_changes(
                Change::Paths(vec![p("a.xml")]),
                Change::Paths(vec![p("b.xml"), p("a.xml")])
            ),
            Change::Paths(vec![p("a.xml"), p("b.xml"), p("a.xml")])
        );
        assert_eq!(
            merge_changes(Change::Paths(vec![p("a.xml")]), Change::Rescan),
            Change::Rescan
        );
        assert_eq!(
            merge_changes(Change::Rescan, Change::Paths(vec![p("a.xml")])),
            Change::Rescan
        );
    }

    #[test]
    fn a_deferred_local_change_ends_the_chain_once_it_waited_long_enough() {
        let now = std::time::Instant::now();
        let change = || Change::Paths(Vec::new());
        assert!(!waited_enough(&None));
        assert!(!waited_enough(&Some((change(), now))));
        let long_ago = now
            .checked_sub(LOCAL_DEFER_MAX)
            .expect("the monotonic clock is past its origin");
        assert!(waited_enough(&Some((change(), long_ago))));
    }
}
