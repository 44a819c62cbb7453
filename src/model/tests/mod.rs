//! Tests of the replica state machine: unit tests of [`Replica::observe_local`] and
//! [`Replica::receive`], then a proptest simulation of a small mesh of replicas over a network
//! that reorders and duplicates messages.

use proptest::prelude::*;

use super::*;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const C: NodeId = NodeId(3);
/// A peer with a bad clock (or a hostile one).
const H: NodeId = NodeId(9);
const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

fn path(s: &str) -> RelPath {
    RelPath::new(s).expect("valid test path")
}

/// A regular file whose content is identified by one byte.
fn file(b: u8) -> Observed {
    Observed {
        kind: Kind::File,
        size: u64::from(b) + 1,
        mode: 0o644,
        hash: Some([b; 32]),
    }
}

fn vv(entries: &[(NodeId, u64)]) -> VersionVector {
    VersionVector::from_entries(entries.iter().copied())
}

/// The content byte of a live record, `None` for a tombstone.
fn content(r: &FileRecord) -> Option<u8> {
    if r.deleted {
        None
    } else {
        Some(r.hash.expect("a live file has a hash")[0])
    }
}

/// Carries out a decision the way the edge does (minus the disk) and returns the committed
/// record, if the index changed.
fn carry_out(r: &mut Replica, d: Decision) -> Option<FileRecord> {
    match d {
        Decision::Ignore => None,
        Decision::Store(rec) | Decision::Apply { record: rec, .. } => Some(r.commit(rec)),
    }
}

/// Two replicas that both hold `rec` (written by `A` with content 1 at t=1000).
fn shared_base(p: &RelPath) -> (Replica, Replica, FileRecord) {
    let mut a = Replica::new(A);
    let mut b = Replica::new(B);
    let rec = a.observe_local(p, Some(&file(1)), 1000).expect("new file");
    let d = b.receive(&rec, 1000);
    assert!(carry_out(&mut b, d).is_some());
    (a, b, rec)
}

// ---- observe_local ------------------------------------------------------------------------

#[test]
fn new_file_gets_first_version_stamp_and_seq() {
    let p = path("default/api/x.xml");
    let mut a = Replica::new(A);
    let rec = a.observe_local(&p, Some(&file(7)), 1234).expect("new file");
    assert_eq!(rec.path, p);
    assert_eq!(rec.kind, Kind::File);
    assert!(!rec.deleted);
    assert_eq!((rec.size, rec.mode, rec.hash), (8, 0o644, Some([7; 32])));
    // A node's own write counts as its stamp (see `VersionVector::bump_past`).
    assert_eq!(rec.version, vv(&[(A, rec.stamp.hlc)]));
    assert_eq!(rec.stamp.node, A);
    assert_eq!(Hlc::millis(rec.stamp.hlc), 1234);
    assert_eq!(rec.seq, 1);
    assert_eq!(a.seq(), 1);
    assert_eq!(a.get(&p), Some(&rec));
}

#[test]
fn identical_observation_changes_nothing() {
    let p = path("x");
    let mut a = Replica::new(A);
    let rec = a.observe_local(&p, Some(&file(1)), 1000).expect("new");
    assert_eq!(a.observe_local(&p, Some(&file(1)), 2000), None);
    assert_eq!(a.seq(), 1);
    assert_eq!(a.get(&p), Some(&rec));
    // Absent and unknown: nothing either.
    assert_eq!(a.observe_local(&path("y"), None, 2000), None);
    assert_eq!(a.get(&path("y")), None);
}

#[test]
fn modification_bumps_own_counter_and_stamp() {
    let p = path("x");
    let mut a = Replica::new(A);
    let first = a.observe_local(&p, Some(&file(1)), 1000).expect("new");
    let second = a.observe_local(&p, Some(&file(2)), 1000).expect("modified");
    assert_eq!(second.version, vv(&[(A, second.stamp.hlc)]));
    assert_eq!(second.version.compare(&first.version), Causality::After);
    assert!(second.stamp > first.stamp);
    assert_eq!(second.hash, Some([2; 32]));
    assert_eq!(second.seq, 2);
    // A mode change alone is a new version too.
    let mut chmod = file(2);
    chmod.mode = 0o600;
    let third = a
        .observe_local(&p, Some(&chmod), 999)
        .expect("mode changed");
    assert_eq!(third.version, vv(&[(A, third.stamp.hlc)]));
    assert!(
        third.stamp > second.stamp,
        "HLC never goes back with the wall clock"
    );
}

#[test]
fn delete_leaves_a_versioned_tombstone() {
    let p = path("x");
    let mut a = Replica::new(A);
    let live = a.observe_local(&p, Some(&file(1)), 1000).expect("new");
    let tomb = a.observe_local(&p, None, 2000).expect("deleted");
    assert!(tomb.deleted);
    assert_eq!(tomb.kind, Kind::File);
    assert_eq!((tomb.size, tomb.mode, tomb.hash), (0, 0, None));
    assert_eq!(tomb.version, vv(&[(A, tomb.stamp.hlc)]));
    assert!(tomb.stamp > live.stamp);
    assert_eq!(a.get(&p), Some(&tomb));
    // Still absent: nothing new. Re-created: a new version on top of the tombstone.
    assert_eq!(a.observe_local(&p, None, 3000), None);
    let again = a
        .observe_local(&p, Some(&file(1)), 3000)
        .expect("re-created");
    assert_eq!(again.version, vv(&[(A, again.stamp.hlc)]));
    assert_eq!(again.version.compare(&tomb.version), Causality::After);
    assert!(!again.deleted);
}

/// Regression: a crash can roll a node's index back past versions it had already sent (WAL
/// with `synchronous = NORMAL` loses the last commits on power loss). Its next write of that
/// path used to get the same counter again, with other bytes: peers took the two writes for
/// one and kept different files for good.
#[test]
fn a_write_after_an_index_rollback_never_repeats_a_sent_version() {
    let p = path("x");
    let (mut a, mut b, base) = shared_base(&p);
    // A writes content 2 and B gets it; then A's index loses that write.
    let sent = a.observe_local(&p, Some(&file(2)), 2000).expect("modified");
    let d = b.receive(&sent, 2000);
    assert!(carry_out(&mut b, d).is_some());
    let mut a = Replica::from_records(A, [base.clone()], 5000);
    // Back up (the wall clock moved on), A writes other bytes over what its index knows.
    let next = a.observe_local(&p, Some(&file(3)), 5000).expect("modified");
    assert_ne!(next.version, sent.version, "a sent version is never reused");
    assert_eq!(next.version.compare(&sent.version), Causality::After);
    // B takes A's newer write instead of keeping content 2 for good.
    assert_eq!(
        b.receive(&next, 5000),
        Decision::Apply {
            record: next.clone(),
            conflict_copy: false
        }
    );
}

#[test]
fn since_lists_changes_in_sequence_order() {
    let mut a = Replica::new(A);
    a.observe_local(&path("b"), Some(&file(1)), 1000);
    a.observe_local(&path("a"), Some(&file(1)), 1000);
    a.observe_local(&path("b"), Some(&file(2)), 1000);
    let all: Vec<(String, u64)> = a
        .since(0)
        .iter()
        .map(|r| (r.path.to_string(), r.seq))
        .collect();
    assert_eq!(all, vec![("a".to_owned(), 2), ("b".to_owned(), 3)]);
    assert_eq!(a.since(2).len(), 1);
    assert!(a.since(3).is_empty());
}

#[test]
fn from_records_moves_the_clock_past_stored_stamps() {
    let p = path("x");
    let mut a = Replica::new(A);
    let rec = a.observe_local(&p, Some(&file(1)), 5000).expect("new");
    let mut back = Replica::from_records(A, a.records().cloned(), 1000);
    assert_eq!(back.seq(), rec.seq);
    let next = back
        .observe_local(&p, Some(&file(2)), 1000)
        .expect("modified");
    assert!(next.stamp > rec.stamp);
    assert_eq!(next.seq, rec.seq + 1);
}

#[test]
fn purge_drops_only_old_tombstones() {
    let mut a = Replica::new(A);
    a.observe_local(&path("old"), Some(&file(1)), 1000);
    a.observe_local(&path("old"), None, 1000);
    a.observe_local(&path("live"), Some(&file(1)), 1000);
    a.observe_local(&path("new"), Some(&file(1)), 1000);
    a.observe_local(&path("new"), None, 9000);
    assert_eq!(a.purge_tombstones(5000), vec![path("old")]);
    assert_eq!(a.get(&path("old")), None);
    assert!(a.get(&path("live")).is_some());
    assert!(a.get(&path("new")).is_some_and(|r| r.deleted));
    let t = a.totals();
    assert_eq!((t.files, t.tombstones, t.bytes), (1, 1, file(1).size));
}

// ---- receive ------------------------------------------------------------------------------

#[test]
fn unknown_path_is_applied_as_is() {
    let p = path("x");
    let mut a = Replica::new(A);
    let mut b = Replica::new(B);
    let rec = a.observe_local(&p, Some(&file(1)), 1000).expect("new");
    assert_eq!(
        b.receive(&rec, 500),
        Decision::Apply {
            record: rec.clone(),
            conflict_copy: false
        }
    );
    // `receive` alone leaves the index alone; `commit` stores under the local seq.
    assert_eq!(b.get(&p), None);
    let stored = b.commit(rec.clone());
    assert!(stored.same_version(&rec));
    assert_eq!(stored.seq, 1);
    // The clock moved past the remote stamp although the local wall clock is behind.
    let own = b
        .observe_local(&path("y"), Some(&file(2)), 500)
        .expect("new");
    assert!(own.stamp.hlc > rec.stamp.hlc);
}

#[test]
fn dominating_remote_is_applied_without_conflict_copy() {
    let p = path("x");
    let (mut a, mut b, base) = shared_base(&p);
    let modified = b.observe_local(&p, Some(&file(2)), 500).expect("modified");
    assert_eq!(
        modified.version,
        vv(&[(A, base.stamp.hlc), (B, modified.stamp.hlc)])
    );
    assert!(modified.stamp > base.stamp, "B's clock saw A's stamp");
    assert_eq!(
        a.receive(&modified, 1000),
        Decision::Apply {
            record: modified.clone(),
            conflict_copy: false
        }
    );
    // A dominating delete is applied as a delete.
    let tomb = b.observe_local(&p, None, 600).expect("deleted");
    assert_eq!(
        a.receive(&tomb, 1000),
        Decision::Apply {
            record: tomb,
            conflict_copy: false
        }
    );
}

#[test]
fn equal_or_older_remote_is_ignored() {
    let p = path("x");
    let (mut a, b, base) = shared_base(&p);
    // Equal (a duplicate, and the echo of our own write).
    assert_eq!(a.receive(&base, 2000), Decision::Ignore);
    let echo = b.get(&p).cloned().expect("stored");
    assert_eq!(a.receive(&echo, 2000), Decision::Ignore);
    // Older: local dominates.
    let newer = a.observe_local(&p, Some(&file(2)), 2000).expect("modified");
    assert_eq!(a.receive(&base, 3000), Decision::Ignore);
    let tomb = a.observe_local(&p, None, 3000).expect("deleted");
    assert_eq!(a.receive(&newer, 4000), Decision::Ignore);
    assert_eq!(a.get(&p), Some(&tomb));
}

#[test]
fn concurrent_same_content_merges_without_conflict_copy() {
    let p = path("x");
    let mut a = Replica::new(A);
    let mut b = Replica::new(B);
    let ra = a.observe_local(&p, Some(&file(3)), 1000).expect("new");
    let rb = b.observe_local(&p, Some(&file(3)), 2000).expect("new");
    let merged = vv(&[(A, ra.stamp.hlc), (B, rb.stamp.hlc)]);
    for (node, remote) in [(&mut a, &rb), (&mut b, &ra)] {
        let d = node.receive(remote, 3000);
        match &d {
            Decision::Store(r) | Decision::Apply { record: r, .. } => {
                assert_eq!(r.version, merged);
                assert_eq!(r.stamp, rb.stamp, "the later stamp is kept");
                assert_eq!(content(r), Some(3));
            }
            Decision::Ignore => panic!("a concurrent version must be merged, got {d:?}"),
        }
        assert!(!matches!(
            d,
            Decision::Apply {
                conflict_copy: true,
                ..
            }
        ));
        carry_out(node, d);
    }
    let (fa, fb) = (a.get(&p).expect("a"), b.get(&p).expect("b"));
    assert!(fa.same_version(fb), "{fa:?} vs {fb:?}");
}

/// Runs the concurrent-different-content exchange between `x` (content 1, written at `tx`)
/// and `y` (content 2, written at `ty`) and returns (x's decision, y's decision, final records).
fn concurrent_writes(
    x: NodeId,
    tx: u64,
    y: NodeId,
    ty: u64,
) -> (Decision, Decision, FileRecord, FileRecord) {
    let p = path("x");
    let mut rx = Replica::new(x);
    let mut ry = Replica::new(y);
    let wx = rx.observe_local(&p, Some(&file(1)), tx).expect("new");
    let wy = ry.observe_local(&p, Some(&file(2)), ty).expect("new");
    let dx = rx.receive(&wy, tx.max(ty));
    let dy = ry.receive(&wx, tx.max(ty));
    // Each side relays what it commits until both are quiet.
    let mut from_x: Vec<FileRecord> = carry_out(&mut rx, dx.clone()).into_iter().collect();
    let mut from_y: Vec<FileRecord> = carry_out(&mut ry, dy.clone()).into_iter().collect();
    for _ in 0..10 {
        let to_y = std::mem::take(&mut from_x);
        let to_x = std::mem::take(&mut from_y);
        for r in to_y {
            let d = ry.receive(&r, tx.max(ty));
            assert!(
                !matches!(
                    d,
                    Decision::Apply {
                        conflict_copy: true,
                        ..
                    }
                ),
                "only the first conflict needs a copy: {d:?}"
            );
            from_y.extend(carry_out(&mut ry, d));
        }
        for r in to_x {
            let d = rx.receive(&r, tx.max(ty));
            assert!(!matches!(
                d,
                Decision::Apply {
                    conflict_copy: true,
                    ..
                }
            ));
            from_x.extend(carry_out(&mut rx, d));
        }
    }
    assert!(from_x.is_empty() && from_y.is_empty(), "exchange settles");
    let fx = rx.get(&p).cloned().expect("x");
    let fy = ry.get(&p).cloned().expect("y");
    // The result dominates exactly the two writes, nothing more.
    assert_eq!(fx.version, wx.version.merged(&wy.version));
    (dx, dy, fx, fy)
}

/// Asserts that `loser`'s decision replaces its live file by the winner's content with a
/// conflict copy, that `winner` keeps its content, and that both end on the same record.
fn assert_winner(loser_d: &Decision, winner_d: &Decision, fx: &FileRecord, fy: &FileRecord) {
    let Decision::Apply {
        record,
        conflict_copy: true,
    } = loser_d
    else {
        panic!("the losing live file must be replaced with a conflict copy: {loser_d:?}");
    };
    let winning_content = content(record);
    match winner_d {
        Decision::Ignore => {}
        Decision::Store(r) => assert_eq!(content(r), winning_content),
        Decision::Apply { .. } => panic!("the winner must keep its content: {winner_d:?}"),
    }
    assert!(fx.same_version(fy), "{fx:?} vs {fy:?}");
    assert_eq!(content(fx), winning_content);
}

#[test]
fn concurrent_different_content_later_stamp_wins_on_both_sides() {
    // B writes later: B wins whatever the node order.
    let (da, db, fa, fb) = concurrent_writes(A, 1000, B, 2000);
    assert_winner(&da, &db, &fa, &fb);
    assert_eq!(content(&fa), Some(2));
    // A writes later: A wins although its id is smaller.
    let (da, db, fa, fb) = concurrent_writes(A, 3000, B, 2000);
    assert_winner(&db, &da, &fb, &fa);
    assert_eq!(content(&fa), Some(1));
}

#[test]
fn concurrent_equal_clock_tie_goes_to_larger_node_id() {
    let (da, db, fa, fb) = concurrent_writes(A, 1000, B, 1000);
    assert_eq!(fa.stamp.hlc, Hlc::default().tick(1000));
    assert_winner(&da, &db, &fa, &fb);
    assert_eq!(fa.stamp.node, B);
    assert_eq!(content(&fa), Some(2));
    // Same with the roles of the contents swapped.
    let (db, da, fb, fa) = concurrent_writes(B, 1000, A, 1000);
    assert_winner(&da, &db, &fa, &fb);
    assert_eq!(content(&fb), Some(1), "B's content (1 here) wins");
}

#[test]
fn losing_tombstone_gets_no_conflict_copy() {
    let p = path("x");
    let (mut a, mut b, _) = shared_base(&p);
    let tomb = a.observe_local(&p, None, 1000).expect("deleted");
    let live = b.observe_local(&p, Some(&file(2)), 5000).expect("modified");
    // A's tombstone loses to the later live write: applied, nothing to copy.
    assert_eq!(
        a.receive(&live, 5000),
        Decision::Apply {
            record: FileRecord {
                version: tomb.version.merged(&live.version),
                ..live.clone()
            },
            conflict_copy: false
        }
    );
}

#[test]
fn delete_vs_modify_later_delete_loses_to_the_modification() {
    let p = path("x");
    let (mut a, mut b, _) = shared_base(&p);
    let modified = a.observe_local(&p, Some(&file(2)), 2000).expect("modified");
    let tomb = b.observe_local(&p, None, 3000).expect("deleted");
    assert!(tomb.stamp > modified.stamp);
    let both = modified.version.merged(&tomb.version);

    // A holds the modification and sees the later delete: it keeps its file as a new write.
    let da = a.receive(&tomb, 2100);
    let Decision::Store(ra) = &da else {
        panic!("the modification stays on disk: {da:?}");
    };
    assert_eq!(content(ra), Some(2));
    assert_eq!(ra.version.compare(&both), Causality::After);
    assert_eq!(ra.stamp.node, A);
    assert!(ra.stamp > tomb.stamp);

    // B holds the delete and sees the earlier modification: it re-creates the file.
    let db = b.receive(&modified, 3100);
    let Decision::Apply {
        record: rb,
        conflict_copy: false,
    } = &db
    else {
        panic!("the modification is re-created: {db:?}");
    };
    assert_eq!(content(rb), Some(2));
    assert_eq!(rb.version.compare(&both), Causality::After);
    assert_eq!(rb.stamp.node, B);
    assert!(rb.stamp > tomb.stamp);

    // The two re-writes carry the same content and merge without a conflict.
    let ra = carry_out(&mut a, da).expect("stored");
    let rb = carry_out(&mut b, db).expect("applied");
    let (d1, d2) = (a.receive(&rb, 4000), b.receive(&ra, 4000));
    for d in [&d1, &d2] {
        assert!(
            !matches!(
                d,
                Decision::Apply {
                    conflict_copy: true,
                    ..
                }
            ),
            "{d:?}"
        );
    }
    carry_out(&mut a, d1);
    carry_out(&mut b, d2);
    let (fa, fb) = (a.get(&p).expect("a"), b.get(&p).expect("b"));
    assert!(fa.same_version(fb), "{fa:?} vs {fb:?}");
    assert_eq!(content(fa), Some(2));
}

#[test]
fn delete_vs_modify_later_modification_wins_plainly() {
    let p = path("x");
    let (mut a, mut b, _) = shared_base(&p);
    let tomb = a.observe_local(&p, None, 2000).expect("deleted");
    let modified = b.observe_local(&p, Some(&file(2)), 3000).expect("modified");
    let both = modified.version.merged(&tomb.version);

    // B holds the later modification: it only records that it has seen the delete.
    let db = b.receive(&tomb, 3100);
    match &db {
        Decision::Store(r) => {
            assert_eq!(content(r), Some(2));
            assert_eq!(r.version, both);
        }
        Decision::Ignore => {}
        Decision::Apply { .. } => panic!("B keeps its modification: {db:?}"),
    }
    // A holds the earlier delete: the modification comes back, nothing to copy.
    let da = a.receive(&modified, 3100);
    assert_eq!(
        da,
        Decision::Apply {
            record: FileRecord {
                version: both.clone(),
                ..modified.clone()
            },
            conflict_copy: false
        }
    );
    carry_out(&mut a, da);
    if let Some(rb) = carry_out(&mut b, db) {
        let d = a.receive(&rb, 4000);
        carry_out(&mut a, d);
    }
    let ra = a.get(&p).cloned().expect("a");
    let d = b.receive(&ra, 4000);
    carry_out(&mut b, d);
    let (fa, fb) = (a.get(&p).expect("a"), b.get(&p).expect("b"));
    assert!(fa.same_version(fb), "{fa:?} vs {fb:?}");
    assert_eq!(content(fa), Some(2));
}

/// Regression: A writes 1, B writes 2 later (concurrently). If B absorbed A's version while
/// keeping its own content, the record B relays would dominate A's write, and A (or any node
/// holding 1) would replace 1 by 2 without a conflict copy: write 1 lost everywhere.
#[test]
fn winner_does_not_absorb_a_concurrent_write_it_does_not_hold() {
    let p = path("x");
    let mut a = Replica::new(A);
    let mut b = Replica::new(B);
    let wa = a.observe_local(&p, Some(&file(1)), 1000).expect("new");
    let wb = b.observe_local(&p, Some(&file(2)), 2000).expect("new");
    let db = b.receive(&wa, 2000);
    let mut copies = 0;
    // A gets whatever B relays first, then B's original write.
    for remote in carry_out(&mut b, db).into_iter().chain([wb]) {
        let d = a.receive(&remote, 2000);
        if let Decision::Apply {
            conflict_copy: true,
            ..
        } = d
        {
            copies += 1;
        }
        carry_out(&mut a, d);
    }
    assert_eq!(
        copies, 1,
        "A's losing write 1 must be kept as a conflict copy"
    );
    assert_eq!(a.get(&p).and_then(content), Some(2));
}

// ---- bounded clocks: clocks.rs; the mesh simulation: sim.rs -----------------------------

mod clocks;
mod sim;

proptest! {
    /// A mesh of 2-4 replicas under random user writes/deletes and a network that reorders
    /// and duplicates messages converges once drained, keeps each disk in line with its
    /// index, and never loses a write silently.
    #[test]
    fn mesh_converges_without_losing_writes(script in sim::script(false)) {
        let mut s = sim::Sim::new(&script);
        for op in &script.ops {
            s.run(op);
        }
        prop_assert!(s.drain(script.drain_seed), "network did not go quiet");
        s.check_converged();
        s.check_no_lost_write();
        s.check_clocks_bounded();
    }

    /// Issue 12: records from outside the mesh with any stamps and counters up to the cap,
    /// and wall clocks that jump forward and back, never stop a later write from winning:
    /// once the network is quiet, a write made on any node ends up on every node.
    #[test]
    fn a_later_write_wins_everywhere_whatever_the_peers_stamps(script in sim::script(true)) {
        let mut s = sim::Sim::new(&script);
        for op in &script.ops {
            s.run(op);
        }
        prop_assert!(s.drain(script.drain_seed), "network did not go quiet");
        s.check_converged();
        s.check_clocks_bounded();
        for (i, (node, path, content)) in script.later.iter().enumerate() {
            let (p, written) = s.later_write(node, path, *content);
            prop_assert!(s.drain(script.drain_seed ^ i as u64), "network did not go quiet");
            s.check_everyone_holds(&p, written);
            s.check_converged();
            s.check_clocks_bounded();
        }
    }
}
