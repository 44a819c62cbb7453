//! A proptest simulation of a small mesh of replicas over a network that reorders and
//! duplicates messages, with foreign records of any stamp and clocks that jump.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::sample::Index;

use super::{content, file};
use crate::model::*;

const PATHS: [&str; 3] = ["a", "dir/b", "c"];
/// Node ids deliberately not in index order, so ties do not favour the first node.
const IDS: [u64; 4] = [0x30, 0x10, 0x40, 0x20];
const DRAIN_LIMIT: usize = 10_000;
/// A small maximum skew, so stamps of nearby wall times fall on both sides of the bound.
const SKEW_MS: u64 = 50;
const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;
/// Node ids of the records a foreign (bad or hostile) peer injects: a new one each time.
const FOREIGN_IDS: u64 = 0x1000;

#[derive(Debug, Clone)]
pub enum Op {
    /// The user writes file content `content` at `path` on `node`.
    Write {
        node: Index,
        path: Index,
        content: u8,
    },
    /// The user deletes `path` on `node`.
    Delete { node: Index, path: Index },
    /// One in-flight message arrives; with `duplicate`, a copy stays in flight.
    Deliver { msg: Index, duplicate: bool },
    /// The wall clock of `node` jumps to `offset` ms ahead of the mesh's time (forward or
    /// back from where it was).
    Jump { node: Index, offset: u64 },
    /// A peer outside the mesh sends `to` a record of `path` with any stamp and counters.
    Foreign(Foreign),
}

#[derive(Debug, Clone)]
pub struct Foreign {
    to: Index,
    path: Index,
    /// `None`: a tombstone.
    content: Option<u8>,
    stamp: u64,
    /// The foreign writer's own counter.
    counter: u64,
    /// A counter claimed for the receiver's own id. (Claims for other nodes of the mesh are
    /// impersonation: a record could then carry the very version one of their writes gets,
    /// with other content. No clock rule can tell; that is the transport's job.)
    claim: Option<u64>,
    /// Built over the receiver's record of the path, so it dominates it (stamped anyhow,
    /// also before it: a forgery).
    over_local: bool,
}

/// A stamp or counter from a foreign peer: anywhere up to the cap, at the cap, or near the
/// mesh's wall time (on either side of the skew bound).
fn clock_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=MAX_CLOCK_VALUE,
        Just(MAX_CLOCK_VALUE),
        (0u64..1_000).prop_map(|ms| Hlc::bound(1_000 + ms, 0)),
    ]
}

fn foreign() -> impl Strategy<Value = Op> {
    (
        (any::<Index>(), any::<Index>(), prop::option::of(1u8..=4)),
        (clock_value(), 1..=MAX_CLOCK_VALUE),
        prop::option::of(clock_value()),
        any::<bool>(),
    )
        .prop_map(
            |((to, path, content), (stamp, counter), claim, over_local)| {
                Op::Foreign(Foreign {
                    to,
                    path,
                    content,
                    stamp,
                    counter,
                    claim,
                    over_local,
                })
            },
        )
}

fn jump() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![Just(0u64), 0u64..1_000, Just(YEAR_MS), 0u64..(1 << 40)];
    (any::<Index>(), offset).prop_map(|(node, offset)| Op::Jump { node, offset })
}

/// A user or network step; with `foreign`, also records from a peer outside the mesh.
fn op(foreign_weight: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<Index>(), any::<Index>(), 1u8..=4)
            .prop_map(|(node, path, content)| Op::Write { node, path, content }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(node, path)| Op::Delete { node, path }),
        6 => (any::<Index>(), prop::bool::weighted(0.2))
            .prop_map(|(msg, duplicate)| Op::Deliver { msg, duplicate }),
        1 => jump(),
        foreign_weight => foreign(),
    ]
}

#[derive(Debug, Clone)]
pub struct Script {
    /// Per-node wall-clock offset in ms (the clock advances 1 ms per step).
    pub skews: Vec<u64>,
    pub paths: usize,
    pub ops: Vec<Op>,
    /// Seeds the delivery order of the final drain.
    pub drain_seed: u64,
    /// Writes made after the network went quiet: (node, path, content or delete).
    pub later: Vec<(Index, Index, Option<u8>)>,
}

/// A script of honest nodes (whose wall clocks may jump), or with `foreign`, also records
/// from outside the mesh with any stamps and counters up to the cap.
pub fn script(foreign: bool) -> impl Strategy<Value = Script> {
    let foreign_weight = if foreign { 2 } else { 0 };
    (2usize..=4, 2usize..=3)
        .prop_flat_map(move |(nodes, paths)| {
            (
                prop::collection::vec(0u64..40, nodes),
                Just(paths),
                prop::collection::vec(op(foreign_weight), 0..80),
                any::<u64>(),
                prop::collection::vec(
                    (any::<Index>(), any::<Index>(), prop::option::of(5u8..=6)),
                    1..4,
                ),
            )
        })
        .prop_map(|(skews, paths, ops, drain_seed, later)| Script {
            skews,
            paths,
            ops,
            drain_seed,
            later,
        })
}

struct Node {
    replica: Replica,
    /// path -> content byte of the file on disk (absent: no file).
    disk: BTreeMap<RelPath, u8>,
    /// Conflict copies made on this node: (path, content of the losing file).
    conflicts: Vec<(RelPath, u8)>,
}

/// A user action at `step`: a write of `content` (`None`: delete) replacing `replaced`.
struct UserOp {
    path: RelPath,
    step: u64,
    content: Option<u8>,
    replaced: Option<u8>,
    version: VersionVector,
}

pub struct Sim {
    nodes: Vec<Node>,
    skews: Vec<u64>,
    /// Per-node clock jump (see [`Op::Jump`]).
    jumps: Vec<u64>,
    /// Per-node latest wall time given to the replica so far.
    max_now: Vec<u64>,
    foreign_records: u64,
    paths: Vec<RelPath>,
    step: u64,
    in_flight: Vec<(usize, FileRecord)>,
    user_ops: Vec<UserOp>,
}

impl Sim {
    pub fn new(script: &Script) -> Self {
        let nodes = (0..script.skews.len())
            .map(|i| Node {
                replica: Replica::new(NodeId(IDS[i])).with_max_skew(SKEW_MS),
                disk: BTreeMap::new(),
                conflicts: Vec::new(),
            })
            .collect();
        Self {
            nodes,
            skews: script.skews.clone(),
            jumps: vec![0; script.skews.len()],
            max_now: vec![0; script.skews.len()],
            foreign_records: 0,
            paths: PATHS[..script.paths]
                .iter()
                .map(|p| RelPath::new(p).expect("valid"))
                .collect(),
            step: 0,
            in_flight: Vec::new(),
            user_ops: Vec::new(),
        }
    }

    fn now(&mut self, node: usize) -> u64 {
        let now = 1_000 + self.step + self.skews[node] + self.jumps[node];
        self.max_now[node] = self.max_now[node].max(now);
        now
    }

    /// Relay: every record a node commits goes to every other node.
    fn broadcast(&mut self, from: usize, record: &FileRecord) {
        for to in (0..self.nodes.len()).filter(|&to| to != from) {
            self.in_flight.push((to, record.clone()));
        }
    }

    pub fn run(&mut self, op: &Op) {
        self.step += 1;
        match op {
            Op::Write {
                node,
                path,
                content,
            } => self.user(
                node.index(self.nodes.len()),
                path.index(self.paths.len()),
                Some(*content),
            ),
            Op::Delete { node, path } => self.user(
                node.index(self.nodes.len()),
                path.index(self.paths.len()),
                None,
            ),
            Op::Deliver { msg, duplicate } => {
                if self.in_flight.is_empty() {
                    return;
                }
                let i = msg.index(self.in_flight.len());
                let (to, record) = if *duplicate {
                    self.in_flight[i].clone()
                } else {
                    self.in_flight.swap_remove(i)
                };
                self.deliver(to, &record);
            }
            Op::Jump { node, offset } => {
                let node = node.index(self.nodes.len());
                self.jumps[node] = *offset;
            }
            Op::Foreign(f) => self.foreign(f),
        }
        self.check_disks_match_indexes();
    }

    /// A record from outside the mesh: a new writer each time, so two of them never claim
    /// the same version for different content.
    fn foreign(&mut self, f: &Foreign) {
        let to = f.to.index(self.nodes.len());
        let p = self.paths[f.path.index(self.paths.len())].clone();
        self.foreign_records += 1;
        let writer = NodeId(FOREIGN_IDS + self.foreign_records);
        let mut version = VersionVector::from_entries([(writer, f.counter)]);
        if let Some(counter) = f.claim {
            version.merge(&VersionVector::from_entries([(NodeId(IDS[to]), counter)]));
        }
        // A peer's clock may be anything, and so may the stamp of a record built over the
        // receiver's: an honest writer stamps after the record it supersedes, a forged one
        // may stamp before it (the receiver then takes its content as a write of its own).
        let stamp = f.stamp;
        if f.over_local {
            if let Some(local) = self.nodes[to].replica.get(&p) {
                version.merge(&local.version);
            }
        }
        let live = f.content.map(file);
        let record = FileRecord {
            path: p,
            kind: Kind::File,
            deleted: live.is_none(),
            size: live.as_ref().map_or(0, |o| o.size),
            mode: live.as_ref().map_or(0, |o| o.mode),
            hash: live.and_then(|o| o.hash),
            version,
            stamp: Stamp {
                hlc: stamp,
                node: writer,
            },
            seq: 0,
        };
        self.deliver(to, &record);
    }

    /// A write made after the network went quiet (every node has seen everything). Returns
    /// what the writer's disk then holds at the path.
    pub fn later_write(
        &mut self,
        node: &Index,
        path: &Index,
        new: Option<u8>,
    ) -> (RelPath, Option<u8>) {
        self.step += 1;
        let node = node.index(self.nodes.len());
        let path = path.index(self.paths.len());
        self.user(node, path, new);
        let p = self.paths[path].clone();
        (p.clone(), self.nodes[node].disk.get(&p).copied())
    }

    /// Every node's disk holds `content` at `p`.
    pub fn check_everyone_holds(&self, p: &RelPath, content: Option<u8>) {
        for (i, n) in self.nodes.iter().enumerate() {
            assert_eq!(
                n.disk.get(p).copied(),
                content,
                "node {i} path {p}: a later write did not win"
            );
        }
    }

    /// No node's clock went further ahead than the skew past the latest wall time it was
    /// given: no record, however stamped, moved it beyond.
    pub fn check_clocks_bounded(&mut self) {
        for i in 0..self.nodes.len() {
            let now = self.now(i);
            let probe = RelPath::new("probe").expect("valid");
            let stamp = self.nodes[i]
                .replica
                .clone()
                .observe_local(&probe, Some(&file(1)), now)
                .expect("a new path")
                .stamp;
            assert!(
                Hlc::millis(stamp.hlc) <= self.max_now[i] + SKEW_MS + 1,
                "node {i}: clock at {} ms, latest wall time {} ms",
                Hlc::millis(stamp.hlc),
                self.max_now[i]
            );
        }
    }

    fn user(&mut self, node: usize, path: usize, new: Option<u8>) {
        let now = self.now(node);
        let p = self.paths[path].clone();
        let n = &mut self.nodes[node];
        let old = n.disk.get(&p).copied();
        match new {
            Some(c) => n.disk.insert(p.clone(), c),
            None => n.disk.remove(&p),
        };
        let rec = n.replica.observe_local(&p, new.map(file).as_ref(), now);
        match rec {
            None => assert_eq!(old, new, "an unchanged disk is no new record"),
            Some(rec) => {
                assert_ne!(old, new, "a new record needs a change on disk");
                assert_eq!(content(&rec), new);
                self.user_ops.push(UserOp {
                    path: p,
                    step: self.step,
                    content: new,
                    replaced: old,
                    version: rec.version.clone(),
                });
                self.broadcast(node, &rec);
            }
        }
    }

    fn deliver(&mut self, to: usize, remote: &FileRecord) {
        let now = self.now(to);
        let n = &mut self.nodes[to];
        let on_disk = n.disk.get(&remote.path).copied();
        let local_version = n.replica.get(&remote.path).map(|l| l.version.clone());
        let decision = n.replica.receive(remote, now);
        let committed = match decision {
            Decision::Ignore => return,
            Decision::Store(record) => {
                assert_eq!(content(&record), on_disk, "Store must not change content");
                n.replica.commit(record)
            }
            Decision::Apply {
                record,
                conflict_copy,
            } => {
                if record.deleted && on_disk.is_some() {
                    // Delete vs modify: a live file only goes when the delete saw it.
                    assert_eq!(
                        local_version.map(|v| v.compare(&remote.version)),
                        Some(Causality::Before),
                        "a live file must not lose to a concurrent delete"
                    );
                }
                if conflict_copy {
                    let lost = on_disk.expect("a conflict copy needs a live local file");
                    assert_ne!(Some(lost), content(&record), "copy of identical content");
                    n.conflicts.push((record.path.clone(), lost));
                }
                match content(&record) {
                    Some(c) => n.disk.insert(record.path.clone(), c),
                    None => n.disk.remove(&record.path),
                };
                n.replica.commit(record)
            }
        };
        self.broadcast(to, &committed);
    }

    /// Delivers everything still in flight, in a seeded pseudo-random order, without
    /// duplication. Returns false when the network did not go quiet within the limit.
    pub fn drain(&mut self, seed: u64) -> bool {
        let mut state = seed | 1;
        for _ in 0..DRAIN_LIMIT {
            if self.in_flight.is_empty() {
                return true;
            }
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = usize::try_from(state % self.in_flight.len() as u64).expect("fits");
            let (to, record) = self.in_flight.swap_remove(i);
            self.step += 1;
            self.deliver(to, &record);
            self.check_disks_match_indexes();
        }
        self.in_flight.is_empty()
    }

    /// (b) The disk holds what the index says: live -> that content, tombstone or
    /// unknown -> no file.
    fn check_disks_match_indexes(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            for p in &self.paths {
                let indexed = n.replica.get(p).and_then(content);
                assert_eq!(
                    n.disk.get(p).copied(),
                    indexed,
                    "node {i} path {p}: disk differs from index"
                );
            }
            assert_eq!(
                n.replica.totals(),
                Self::recount(&n.replica),
                "node {i}: counted totals drift from the records"
            );
        }
    }

    fn recount(r: &Replica) -> Totals {
        let mut t = Totals::default();
        for rec in r.records() {
            match (rec.deleted, rec.kind) {
                (true, _) => t.tombstones += 1,
                (false, Kind::Dir) => t.dirs += 1,
                (false, Kind::File) => {
                    t.files += 1;
                    t.bytes += rec.size;
                }
            }
        }
        t
    }

    /// (a) All replicas hold the same records (seq aside) and the same disks.
    pub fn check_converged(&self) {
        let first = &self.nodes[0];
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            for p in &self.paths {
                match (first.replica.get(p), n.replica.get(p)) {
                    (None, None) => {}
                    (Some(x), Some(y)) => {
                        assert!(x.same_version(y), "{p}: node 0 {x:?} vs node {i} {y:?}")
                    }
                    (x, y) => panic!("{p}: node 0 {x:?} vs node {i} {y:?}"),
                }
            }
            assert_eq!(first.disk, n.disk, "disks of node 0 and node {i}");
        }
    }

    /// Every user op is part of the final version of its path (nothing was dropped by
    /// the merge), and (c) no written content silently vanished.
    ///
    /// A write W of content c at path p is accounted for when, at the end:
    /// - c is the content of p, or
    /// - some node kept c for p as a conflict copy, or
    /// - a user later replaced c on p on some node (the user saw c and overwrote or
    ///   deleted it: a knowing overwrite).
    ///
    /// Contents are compared by value (a few values are shared by many writes), so this
    /// can only miss a loss, never report a false one. A replacement of c by a dominating
    /// remote record is deliberately *not* an excuse: it is only legitimate when the
    /// dominating write was made over c (a user op, covered above) or c lost a concurrent
    /// conflict somewhere with a conflict copy (covered above).
    pub fn check_no_lost_write(&self) {
        let disk = &self.nodes[0].disk;
        for w in &self.user_ops {
            let final_record = self.nodes[0]
                .replica
                .get(&w.path)
                .expect("a path with user ops has a record");
            assert!(
                matches!(
                    final_record.version.compare(&w.version),
                    Causality::After | Causality::Equal
                ),
                "final version of {} does not include the op at step {}",
                w.path,
                w.step
            );
            let Some(c) = w.content else { continue };
            let kept = disk.get(&w.path) == Some(&c)
                || self
                    .nodes
                    .iter()
                    .any(|n| n.conflicts.contains(&(w.path.clone(), c)))
                || self.user_ops.iter().any(|later| {
                    later.path == w.path && later.step > w.step && later.replaced == Some(c)
                });
            assert!(
                kept,
                "write of {c} to {} at step {} was lost: final {:?}, conflict copies {:?}",
                w.path,
                w.step,
                disk.get(&w.path),
                self.nodes.iter().map(|n| &n.conflicts).collect::<Vec<_>>()
            );
        }
    }
}
