//! The newest rows of each folder's index, kept in memory, so that feeding subscribers that
//! have caught up costs no query. In a mesh every commit wakes one feed per subscriber, and
//! each asked the database for the rows after its cursor: with ten nodes that was most of the
//! index's reads under a steady flow of edits.
//!
//! The rows are exact: for a folder that has them, they are every row of its index whose
//! sequence number is above `floor`, as of the last commit. Every write of the `files` table
//! goes through the [`Store`](super::Store), which keeps them so (a committed row replaces the
//! path's row; a removed path goes; new stat keys are copied), and a write that fails drops the
//! folder's rows, so a doubt falls back to the database. The floor is set where the whole
//! index was read ([`RecentRows::anchor`], when an engine loads it) and rises as the oldest
//! rows are let go ([`RECENT_ROWS`]).

use std::collections::{BTreeMap, HashMap};

use crate::model::RelPath;

use super::{Origin, StatKey, StoredRecord};

/// Rows kept per folder: a subscriber more than this many changes behind reads the database.
pub(super) const RECENT_ROWS: usize = 4096;

/// One folder's newest rows: every index row with a sequence number above `floor`.
struct Recent {
    floor: u64,
    by_seq: BTreeMap<u64, StoredRecord>,
    by_path: HashMap<RelPath, u64>,
}

impl Recent {
    fn put(&mut self, row: &StoredRecord) {
        if let Some(old) = self.by_path.remove(&row.record.path) {
            self.by_seq.remove(&old);
        }
        let seq = row.record.seq;
        if seq > self.floor {
            self.by_path.insert(row.record.path.clone(), seq);
            self.by_seq.insert(seq, row.clone());
        }
        while self.by_seq.len() > RECENT_ROWS {
            let Some((seq, oldest)) = self.by_seq.pop_first() else {
                break;
            };
            self.by_path.remove(&oldest.record.path);
            self.floor = seq;
        }
    }
}

/// The newest rows of every folder that has them (see the module's docs).
#[derive(Default)]
pub(super) struct RecentRows {
    folders: HashMap<String, Recent>,
    /// Moves with every write of the `files` table, so that an anchor taken from a read
    /// that a write overlapped is not set.
    generation: u64,
}

impl RecentRows {
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The whole index of `folder` was read, its highest sequence number `high`, and no write
    /// came between `generation` (taken before the read) and now: keep the rows from here on.
    pub(super) fn anchor(&mut self, folder: &str, high: u64, generation: u64) {
        if generation != self.generation {
            return;
        }
        self.folders.insert(
            folder.to_owned(),
            Recent {
                floor: high,
                by_seq: BTreeMap::new(),
                by_path: HashMap::new(),
            },
        );
    }

    /// Rows committed to `folder`.
    pub(super) fn committed(&mut self, folder: &str, rows: &[StoredRecord]) {
        self.generation += 1;
        if let Some(recent) = self.folders.get_mut(folder) {
            for row in rows {
                recent.put(row);
            }
        }
    }

    /// Rows of `folder` removed.
    pub(super) fn removed(&mut self, folder: &str, paths: &[RelPath]) {
        self.generation += 1;
        if let Some(recent) = self.folders.get_mut(folder) {
            for path in paths {
                if let Some(seq) = recent.by_path.remove(path) {
                    recent.by_seq.remove(&seq);
                }
            }
        }
    }

    /// New stat keys of rows of `folder`.
    pub(super) fn restated(&mut self, folder: &str, stats: &[(RelPath, StatKey)]) {
        self.generation += 1;
        if let Some(recent) = self.folders.get_mut(folder) {
            for (path, stat) in stats {
                let row = recent
                    .by_path
                    .get(path)
                    .and_then(|seq| recent.by_seq.get_mut(seq));
                if let Some(row) = row {
                    row.stat = Some(*stat);
                }
            }
        }
    }

    /// A write of `folder` failed: whatever it did or did not change, the database answers.
    pub(super) fn forget(&mut self, folder: &str) {
        self.generation += 1;
        self.folders.remove(folder);
    }

    /// [`Store::since`](super::Store::since) from memory, when the rows after `seq` are all
    /// here.
    pub(super) fn since(
        &self,
        folder: &str,
        seq: u64,
        limit: u32,
        except: Option<&Origin>,
    ) -> Option<Vec<StoredRecord>> {
        let recent = self.folders.get(folder)?;
        if seq < recent.floor {
            return None;
        }
        Some(
            recent
                .by_seq
                .range(seq.saturating_add(1)..)
                .map(|(_, row)| row)
                .filter(|row| except.is_none_or(|o| row.origin.as_ref() != Some(o)))
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::store::Store;
    use crate::store::testing::{from_peer, rec};

    const FOLDER: &str = "synapse-configs";

    /// What a feed reads, from memory and from the database, after every write of a seeded
    /// run of commits (re-recorded paths, origins of two peers and none), removals, new stat
    /// keys and re-anchors: the same rows, whatever the cursor, the limit and
    /// the origin left out. Small enough a cap would hide nothing, so it is exercised too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_from_memory_are_the_rows_the_database_gives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).await.expect("open");
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let mut seq = 0u64;
        let origins = [
            None,
            Some(Origin {
                peer: "gw2".into(),
                epoch: 5,
            }),
            Some(Origin {
                peer: "gw3".into(),
                epoch: 9,
            }),
        ];
        let mut served_from_memory = 0;
        for step in 0..400 {
            match rng.random_range(0..10) {
                0 => {
                    store.load_index(FOLDER).await.expect("load");
                }
                1 => {
                    let gone: Vec<RelPath> = (0..rng.random_range(1..4))
                        .map(|_| {
                            RelPath::new(&format!("p{}.xml", rng.random_range(0..40)))
                                .expect("valid")
                        })
                        .collect();
                    store.remove(FOLDER, &gone).await.expect("remove");
                }
                2 => {
                    let path =
                        RelPath::new(&format!("p{}.xml", rng.random_range(0..40))).expect("valid");
                    let stat = StatKey {
                        size: 5,
                        mtime_ns: step,
                        ino: 7,
                    };
                    store
                        .update_stats(FOLDER, &[(path, stat)])
                        .await
                        .expect("stats");
                }
                _ => {
                    let rows: Vec<StoredRecord> = (0..rng.random_range(1..12))
                        .map(|_| {
                            seq += 1;
                            let path = format!("p{}.xml", rng.random_range(0..40));
                            match &origins[rng.random_range(0..3)] {
                                None => rec(&path, seq),
                                Some(o) => from_peer(&path, seq, &o.peer, o.epoch),
                            }
                        })
                        .collect();
                    // One path twice in a batch: the later row wins, in the index as here.
                    let mut seen = std::collections::HashSet::new();
                    let rows: Vec<StoredRecord> = rows
                        .into_iter()
                        .rev()
                        .filter(|r| seen.insert(r.record.path.clone()))
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    store
                        .commit(FOLDER, &rows, None, &Default::default())
                        .await
                        .expect("commit");
                }
            }
            for _ in 0..3 {
                // Mostly a subscriber that has caught up, sometimes one far behind.
                let from = match rng.random_range(0..4) {
                    0 => rng.random_range(0..=seq + 1),
                    _ => seq.saturating_sub(rng.random_range(0..30)),
                };
                let limit = rng.random_range(1..20);
                let except = &origins[rng.random_range(0..3)];
                let memory = store.recent().since(FOLDER, from, limit, except.as_ref());
                let db = store
                    .since_in_db(FOLDER, from, limit, except.as_ref())
                    .await
                    .expect("since");
                if let Some(memory) = memory {
                    served_from_memory += 1;
                    assert_eq!(
                        format!("{memory:?}"),
                        format!("{db:?}"),
                        "step {step}: since {from}, limit {limit}, except {except:?}"
                    );
                }
            }
        }
        assert!(
            served_from_memory > 400,
            "the memory answered {served_from_memory} times"
        );
    }

    /// Past the cap, the oldest rows go and the floor rises: a cursor below it reads the
    /// database; one at it still reads memory.
    #[test]
    fn the_cap_raises_the_floor() {
        let mut recent = RecentRows::default();
        recent.anchor(FOLDER, 0, 0);
        let rows: Vec<StoredRecord> = (1..=RECENT_ROWS as u64 + 10)
            .map(|s| rec(&format!("f{s}.xml"), s))
            .collect();
        recent.committed(FOLDER, &rows);
        assert!(recent.since(FOLDER, 9, 5, None).is_none());
        let at_floor = recent.since(FOLDER, 10, 5, None).expect("kept");
        assert_eq!(at_floor.first().map(|r| r.record.seq), Some(11));
        recent.forget(FOLDER);
        assert!(recent.since(FOLDER, 10, 5, None).is_none());
    }

    /// An anchor from a read that a write overlapped is not set.
    #[test]
    fn an_anchor_a_write_overlapped_is_not_set() {
        let mut recent = RecentRows::default();
        let before = recent.generation();
        recent.committed(FOLDER, &[rec("a.xml", 1)]);
        recent.anchor(FOLDER, 0, before);
        assert!(recent.since(FOLDER, 0, 5, None).is_none());
    }
}
