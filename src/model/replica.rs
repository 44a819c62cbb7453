//! The per-folder replica state machine: the index of one folder on one node and the rules
//! that turn local observations and remote records into decisions.
//!
//! Pure: no I/O, no clock reads. Wall time comes in as `now_ms`. The edge (the folder engine)
//! carries out a `Decision` on disk and only then calls [`Replica::commit`], so the index never
//! claims what the disk does not have.
//!
//! # Merge rule, and why it converges
//! A record carries the union of the version vectors of every write it has absorbed, and the
//! content and stamp of the absorbed write with the greatest stamp. Merging two records is
//! therefore "union the vectors, keep the content of the greater stamp": commutative,
//! associative and idempotent, so every node that has seen the same writes holds the same
//! record, whatever the delivery order. Stamps are hybrid-logical-clock values that grow along
//! causality, so a write that dominates another also has the greater stamp, and plain
//! "remote dominates -> take it" agrees with the rule. One exception keeps conflict copies
//! sound: a node whose file beats a concurrent live file with other content does not absorb
//! that write (it does not hold its bytes); the nodes holding it make the conflict copy and
//! send back the merged record.
//!
//! The contract adds "delete vs modify: the modification wins". When the delete has the greater
//! stamp, the node that sees the conflict writes the live content again as a *new* write (its own
//! counter bumped, a fresh stamp): that write dominates both sides, so the ordinary rule then
//! spreads it. Several nodes may do so at once; their writes carry identical content, which
//! merges without a conflict.

use std::collections::BTreeMap;

use super::path::RelPath;
use super::record::{FileRecord, Kind, Observed};
use super::version::{Causality, Hlc, NodeId, Stamp};

/// What the edge must do with a remote record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Local already has it (equal or newer): nothing to do.
    Ignore,
    /// Only the index changes (merged version, local content stays): commit `record`.
    Store(FileRecord),
    /// Make the disk hold `record` (write its content, or delete), then commit it.
    /// With `conflict_copy`, the local file's bytes lose a concurrent conflict and must first be
    /// kept outside the folder.
    Apply {
        record: FileRecord,
        conflict_copy: bool,
    },
}

/// What an index holds, counted as records come and go (status reads it on every message,
/// so it must not cost a pass over the index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub tombstones: u64,
}

impl Totals {
    /// What one record counts for.
    fn of(r: &FileRecord) -> Self {
        match (r.deleted, r.kind) {
            (true, _) => Self {
                tombstones: 1,
                ..Self::default()
            },
            (false, Kind::Dir) => Self {
                dirs: 1,
                ..Self::default()
            },
            (false, Kind::File) => Self {
                files: 1,
                bytes: r.size,
                ..Self::default()
            },
        }
    }

    fn add(&mut self, r: &FileRecord) {
        let d = Self::of(r);
        self.files += d.files;
        self.dirs += d.dirs;
        self.bytes += d.bytes;
        self.tombstones += d.tombstones;
    }

    fn sub(&mut self, r: &FileRecord) {
        let d = Self::of(r);
        self.files -= d.files;
        self.dirs -= d.dirs;
        self.bytes -= d.bytes;
        self.tombstones -= d.tombstones;
    }

    /// Live entries (files and directories).
    pub fn live(&self) -> u64 {
        self.files + self.dirs
    }
}

/// Index of one folder on one node.
#[derive(Debug, Clone)]
pub struct Replica {
    node: NodeId,
    records: BTreeMap<RelPath, FileRecord>,
    totals: Totals,
    seq: u64,
    hlc: Hlc,
}

impl Replica {
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            records: BTreeMap::new(),
            totals: Totals::default(),
            seq: 0,
            hlc: Hlc::default(),
        }
    }

    /// Rebuilds a replica from stored records (their `seq` fields are kept).
    pub fn from_records(node: NodeId, records: impl IntoIterator<Item = FileRecord>) -> Self {
        let mut r = Self::new(node);
        for rec in records {
            r.seq = r.seq.max(rec.seq);
            r.hlc.observe(rec.stamp.hlc);
            r.insert(rec);
        }
        r
    }

    fn insert(&mut self, record: FileRecord) {
        self.totals.add(&record);
        if let Some(old) = self.records.insert(record.path.clone(), record) {
            self.totals.sub(&old);
        }
    }

    /// Counts of what the index holds, kept up to date on every change.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn get(&self, path: &RelPath) -> Option<&FileRecord> {
        self.records.get(path)
    }

    pub fn records(&self) -> impl Iterator<Item = &FileRecord> {
        self.records.values()
    }

    /// The record of `path` and every record below it.
    pub fn under<'a>(&'a self, path: &'a RelPath) -> impl Iterator<Item = &'a FileRecord> + 'a {
        self.records
            .range(path.clone()..)
            .take_while(move |(p, _)| p.as_str().starts_with(path.as_str()))
            .filter(move |(p, _)| p.starts_with(path))
            .map(|(_, r)| r)
    }

    /// Records changed after `seq`, in sequence order.
    pub fn since(&self, seq: u64) -> Vec<FileRecord> {
        let mut v: Vec<FileRecord> = self
            .records
            .values()
            .filter(|r| r.seq > seq)
            .cloned()
            .collect();
        v.sort_by_key(|r| r.seq);
        v
    }

    /// A local observation of `path` (`None`: absent on disk). Returns the new record (already
    /// committed) when it differs from the index, `None` when the index already says so.
    pub fn observe_local(
        &mut self,
        path: &RelPath,
        observed: Option<&Observed>,
        now_ms: u64,
    ) -> Option<FileRecord> {
        let local = self.records.get(path);
        let mut version = match (local, observed) {
            (None, None) => return None,
            (Some(l), None) if l.deleted => return None,
            (Some(l), Some(o)) if l.matches(o) => return None,
            (Some(l), _) => l.version.clone(),
            (None, Some(_)) => Default::default(),
        };
        let stamp = Stamp {
            hlc: self.hlc.tick(now_ms),
            node: self.node,
        };
        version.bump_past(self.node, stamp.hlc);
        let record = match observed {
            Some(o) => FileRecord {
                path: path.clone(),
                kind: o.kind,
                deleted: false,
                size: o.size,
                mode: o.mode,
                hash: o.hash,
                version,
                stamp,
                seq: 0,
            },
            None => {
                let kind = local.map_or(Kind::File, |l| l.kind);
                FileRecord {
                    path: path.clone(),
                    kind,
                    deleted: true,
                    size: 0,
                    mode: 0,
                    hash: None,
                    version,
                    stamp,
                    seq: 0,
                }
            }
        };
        Some(self.commit(record))
    }

    /// Decides what to do with a record received from a peer. Does not change the index
    /// (apart from moving the clock past the remote stamp); see [`Replica::commit`].
    pub fn receive(&mut self, remote: &FileRecord, now_ms: u64) -> Decision {
        self.hlc.observe(remote.stamp.hlc);
        let Some(local) = self.records.get(&remote.path) else {
            return Decision::Apply {
                record: remote.clone(),
                conflict_copy: false,
            };
        };
        match local.version.compare(&remote.version) {
            Causality::Equal | Causality::After => Decision::Ignore,
            Causality::Before => Decision::Apply {
                record: remote.clone(),
                conflict_copy: false,
            },
            Causality::Concurrent => {
                let version = local.version.merged(&remote.version);
                let remote_wins = remote.stamp > local.stamp;
                let (winner, loser) = if remote_wins {
                    (remote, local)
                } else {
                    (local, remote)
                };
                if winner.deleted && !loser.deleted {
                    // Delete vs modify: the modification wins, as a new write that dominates both.
                    let mut record = loser.clone();
                    record.stamp = Stamp {
                        hlc: self.hlc.tick(now_ms),
                        node: self.node,
                    };
                    record.version = version;
                    record.version.bump_past(self.node, record.stamp.hlc);
                    return if remote_wins {
                        Decision::Store(record)
                    } else {
                        Decision::Apply {
                            record,
                            conflict_copy: false,
                        }
                    };
                }
                let mut record = winner.clone();
                record.version = version;
                if remote_wins {
                    let conflict_copy = local.is_live_file() && !local.same_content(remote);
                    Decision::Apply {
                        record,
                        conflict_copy,
                    }
                } else if remote.is_live_file() && !remote.same_content(local) {
                    // The remote file loses, but its bytes are not here. Absorbing its version
                    // would make a record that dominates that write without holding it, and a
                    // node still holding it would then drop it as a plain update, with no
                    // conflict copy anywhere. The nodes holding it make the copy when our
                    // record reaches them; their merged record then comes back as dominating.
                    Decision::Ignore
                } else {
                    Decision::Store(record)
                }
            }
        }
    }

    /// Stores a record in the index under a new local sequence number and returns it as stored.
    pub fn commit(&mut self, mut record: FileRecord) -> FileRecord {
        self.seq += 1;
        record.seq = self.seq;
        self.hlc.observe(record.stamp.hlc);
        self.insert(record.clone());
        record
    }

    /// Drops tombstones whose stamp is older than `older_than_ms` (wall time). Returns the
    /// purged paths. Safe once every peer has certainly seen the delete (the TTL's job).
    pub fn purge_tombstones(&mut self, older_than_ms: u64) -> Vec<RelPath> {
        let old: Vec<RelPath> = self
            .records
            .values()
            .filter(|r| r.deleted && Hlc::millis(r.stamp.hlc) < older_than_ms)
            .map(|r| r.path.clone())
            .collect();
        for p in &old {
            if let Some(r) = self.records.remove(p) {
                self.totals.sub(&r);
            }
        }
        old
    }
}
