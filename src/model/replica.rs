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
//!
//! # Bounded clocks
//! Stamps and counters come from peers and may be far ahead of this node's clock: a VM
//! restored with a future date, or a broken or hostile peer. The clock never adopts a value
//! beyond its own wall time plus the maximum skew ([`DEFAULT_MAX_CLOCK_SKEW_MS`] unless set):
//! it observes only remote stamps within that bound, so one bad record cannot drag every later
//! stamp of this node along with it (or, at the top of the range, pin them to one value that
//! makes each later write look equal to the one before). The record itself is kept as sent.
//! The argument above still holds because a node never relies on its clock alone to order a
//! write after what it supersedes: every stamp it makes for a path is greater than the stamp
//! of the record(s) of that path it replaces (`max(clock tick, floor + 1)`), and its own
//! counter moves past that stamp. So a write that dominates another still has the greater
//! stamp, even over a far-future one, and a later write wins on every node. The edge refuses
//! values above [`MAX_CLOCK_VALUE`](super::version::MAX_CLOCK_VALUE), so the `+ 1` per write
//! never gets near `u64::MAX`.

use std::collections::BTreeMap;

use super::path::RelPath;
use super::record::{FileRecord, Kind, Observed};
use super::version::{Causality, Hlc, NodeId, Stamp};

/// How far ahead of this node's wall clock a peer's stamp may be and still move the clock, ms.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 300_000;

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

    /// Saturating: a size a peer declares can be anything, and a count must never wrap (or
    /// panic) whatever the index holds.
    fn add(&mut self, r: &FileRecord) {
        let d = Self::of(r);
        self.files = self.files.saturating_add(d.files);
        self.dirs = self.dirs.saturating_add(d.dirs);
        self.bytes = self.bytes.saturating_add(d.bytes);
        self.tombstones = self.tombstones.saturating_add(d.tombstones);
    }

    fn sub(&mut self, r: &FileRecord) {
        let d = Self::of(r);
        self.files = self.files.saturating_sub(d.files);
        self.dirs = self.dirs.saturating_sub(d.dirs);
        self.bytes = self.bytes.saturating_sub(d.bytes);
        self.tombstones = self.tombstones.saturating_sub(d.tombstones);
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
    /// The clock adopts no stamp beyond wall time plus this many ms.
    max_skew_ms: u64,
    /// The wall time of the latest call that gave one, for [`Replica::commit`]'s bound.
    now_ms: u64,
}

impl Replica {
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            records: BTreeMap::new(),
            totals: Totals::default(),
            seq: 0,
            hlc: Hlc::default(),
            max_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
            now_ms: 0,
        }
    }

    /// Sets how far ahead of the wall clock a peer's stamp may move this node's clock, ms.
    pub fn with_max_skew(mut self, max_skew_ms: u64) -> Self {
        self.max_skew_ms = max_skew_ms;
        self
    }

    /// Rebuilds a replica from stored records (their `seq` fields are kept) at wall time
    /// `now_ms`, with the default maximum skew; see [`Replica::with_records`].
    pub fn from_records(
        node: NodeId,
        records: impl IntoIterator<Item = FileRecord>,
        now_ms: u64,
    ) -> Self {
        Self::new(node).with_records(records, now_ms)
    }

    /// Loads stored records (their `seq` fields are kept) at wall time `now_ms`. The clock
    /// moves past the stored stamps within the skew bound only: a far-future stamp a peer sent
    /// before the restart must not pin the clock after it. That holds for this node's own
    /// records too, since a write over a far-future record carries that record's stamp plus
    /// one; new writes of such a path still move past it (see the module doc).
    pub fn with_records(
        mut self,
        records: impl IntoIterator<Item = FileRecord>,
        now_ms: u64,
    ) -> Self {
        self.now_ms = now_ms;
        for rec in records {
            self.seq = self.seq.max(rec.seq);
            self.observe_bounded(rec.stamp.hlc);
            self.insert(rec);
        }
        self
    }

    /// The greatest stamp value the clock may adopt at wall time `now_ms`.
    fn clock_bound(&self, now_ms: u64) -> u64 {
        Hlc::bound(now_ms, self.max_skew_ms)
    }

    /// Moves the clock past `seen` when it is within the skew bound of the latest wall time;
    /// a value beyond it leaves the clock alone. (Clamping it to the bound instead would
    /// still let every bad record push this node's stamps a full skew ahead of its clock.)
    fn observe_bounded(&mut self, seen: u64) {
        if seen <= self.clock_bound(self.now_ms) {
            self.hlc.observe(seen);
        }
    }

    /// A stamp for a new write by this node at `now_ms` that supersedes a record stamped
    /// `floor`: the clock's next value, or just past `floor` when that is ahead of the clock.
    fn stamp_after(&mut self, floor: u64, now_ms: u64) -> Stamp {
        self.now_ms = now_ms;
        Stamp {
            hlc: self.hlc.tick(now_ms).max(floor.saturating_add(1)),
            node: self.node,
        }
    }

    /// How far `remote` is ahead of the wall time `now_ms`, in ms, when its stamp or one of
    /// its version counters (counters count in HLC units too) is beyond the skew bound: such a
    /// record is applied without moving the clock. `None` when it is within the bound.
    pub fn ahead_of_clock(&self, remote: &FileRecord, now_ms: u64) -> Option<u64> {
        let top = remote
            .version
            .entries()
            .map(|(_, c)| c)
            .fold(remote.stamp.hlc, u64::max);
        (top > self.clock_bound(now_ms)).then(|| Hlc::millis(top).saturating_sub(now_ms))
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
        let floor = local.map_or(0, |l| l.stamp.hlc);
        let mut version = match (local, observed) {
            (None, None) => return None,
            (Some(l), None) if l.deleted => return None,
            (Some(l), Some(o)) if l.matches(o) => return None,
            (Some(l), _) => l.version.clone(),
            (None, Some(_)) => Default::default(),
        };
        let kind = local.map_or(Kind::File, |l| l.kind);
        let stamp = self.stamp_after(floor, now_ms);
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
            None => FileRecord {
                path: path.clone(),
                kind,
                deleted: true,
                size: 0,
                mode: 0,
                hash: None,
                version,
                stamp,
                seq: 0,
            },
        };
        Some(self.commit(record))
    }

    /// Decides what to do with a record received from a peer. Does not change the index
    /// (apart from moving the clock past the remote stamp, up to the skew bound); see
    /// [`Replica::commit`].
    pub fn receive(&mut self, remote: &FileRecord, now_ms: u64) -> Decision {
        self.now_ms = now_ms;
        self.observe_bounded(remote.stamp.hlc);
        let Some(local) = self.records.get(&remote.path) else {
            return Decision::Apply {
                record: remote.clone(),
                conflict_copy: false,
            };
        };
        match local.version.compare(&remote.version) {
            Causality::Equal | Causality::After => Decision::Ignore,
            // A record that dominates ours but is stamped before it breaks the rule the merge
            // relies on (a write is stamped after what it supersedes): no node stamps so, only
            // a forged record does. Taken as it is, nodes that had met our record in a merge
            // would keep other bytes than nodes that had not. Its content is taken as a new
            // write of this node instead, stamped and counted past both, which every node
            // then takes the ordinary way; several nodes doing so write identical content,
            // which merges without a conflict.
            Causality::Before if remote.stamp < local.stamp => {
                let mut record = remote.clone();
                let floor = local.stamp.hlc.max(remote.stamp.hlc);
                record.stamp = self.stamp_after(floor, now_ms);
                record.version.bump_past(self.node, record.stamp.hlc);
                Decision::Apply {
                    record,
                    conflict_copy: false,
                }
            }
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
                    let floor = local.stamp.hlc.max(remote.stamp.hlc);
                    record.stamp = self.stamp_after(floor, now_ms);
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
        self.observe_bounded(record.stamp.hlc);
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
