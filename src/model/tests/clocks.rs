//! Bounded clocks (issue 12: one bad clock stops replication for good): far-future stamps and
//! counters, clocks jumping both ways, restarts.

use super::*;

/// The wall time of the stamp a fresh path would get on `r` at `now_ms`: where its clock is.
fn clock_millis(r: &Replica, now_ms: u64) -> u64 {
    let stamp = r
        .clone()
        .observe_local(&path("probe/fresh"), Some(&file(9)), now_ms)
        .expect("new path")
        .stamp;
    Hlc::millis(stamp.hlc)
}

/// `rec` rewritten by `H` with content `b`, a stamp at the cap and counters at the cap for
/// `H` and for `over` (a hostile peer can claim any counter, also the receiver's own).
fn at_the_cap(rec: &FileRecord, b: u8, over: NodeId) -> FileRecord {
    let mut h = rec.clone();
    h.hash = Some([b; 32]);
    h.size = file(b).size;
    h.version = rec
        .version
        .merged(&vv(&[(H, MAX_CLOCK_VALUE), (over, MAX_CLOCK_VALUE)]));
    h.stamp = Stamp {
        hlc: MAX_CLOCK_VALUE,
        node: H,
    };
    h
}

#[test]
fn a_record_stamped_at_the_cap_is_applied_without_moving_the_clock_and_a_later_write_wins() {
    let p = path("x");
    let (_, mut b, base) = shared_base(&p);
    let hostile = at_the_cap(&base, 2, B);
    let d = b.receive(&hostile, 2000);
    assert_eq!(
        d,
        Decision::Apply {
            record: hostile.clone(),
            conflict_copy: false
        }
    );
    assert_eq!(
        b.ahead_of_clock(&hostile, 2000),
        Some(Hlc::millis(MAX_CLOCK_VALUE) - 2000)
    );
    carry_out(&mut b, d);
    assert_eq!(
        b.get(&p).and_then(content),
        Some(2),
        "the record is kept as sent"
    );
    assert!(
        clock_millis(&b, 2000) <= 2000 + DEFAULT_MAX_CLOCK_SKEW_MS,
        "the clock stays within the skew bound"
    );
    // B's next writes of the path go past the record: they dominate it and stamp later.
    let later = b.observe_local(&p, Some(&file(3)), 2001).expect("modified");
    assert_eq!(later.version.compare(&hostile.version), Causality::After);
    assert!(later.stamp > hostile.stamp);
    let again = b.observe_local(&p, Some(&file(4)), 2002).expect("modified");
    assert_eq!(again.version.compare(&later.version), Causality::After);
    assert!(again.stamp > later.stamp);
    // Another replica ends with the latest write whatever the order it gets them in.
    let orders = [
        [&hostile, &later, &again],
        [&again, &hostile, &later],
        [&later, &again, &hostile],
        [&hostile, &again, &later],
    ];
    for order in orders {
        let mut c = Replica::new(C);
        for r in order {
            let d = c.receive(r, 2003);
            carry_out(&mut c, d);
        }
        assert_eq!(c.get(&p).and_then(content), Some(4), "order {order:?}");
        assert!(clock_millis(&c, 2003) <= 2003 + DEFAULT_MAX_CLOCK_SKEW_MS);
    }
}

/// A counter at the cap for this node's own id (sent by a peer) does not stop its counters.
#[test]
fn own_counter_at_the_cap_still_lets_every_later_write_dominate() {
    let p = path("x");
    let (_, mut b, base) = shared_base(&p);
    let hostile = at_the_cap(&base, 2, B);
    let d = b.receive(&hostile, 2000);
    carry_out(&mut b, d);
    let mut prev = hostile;
    for i in 0..1000u64 {
        let rec = b
            .observe_local(&p, Some(&file(3 + (i % 2) as u8)), 2000 + i)
            .expect("modified");
        assert_eq!(rec.version.compare(&prev.version), Causality::After);
        assert!(rec.version.get(B) > prev.version.get(B));
        assert!(rec.stamp > prev.stamp);
        prev = rec;
    }
    assert!(prev.version.get(B) <= MAX_CLOCK_VALUE + 1000);
    assert!(clock_millis(&b, 3000) <= 3000 + DEFAULT_MAX_CLOCK_SKEW_MS);
}

#[test]
fn a_clock_jumping_forward_and_back_loses_no_write_and_drags_no_other_clock() {
    let p = path("x");
    let (mut a, b, _) = shared_base(&p);
    // A's wall clock jumps a year ahead (a VM restored with a future date), then comes back.
    let ahead = a
        .observe_local(&p, Some(&file(2)), 1000 + YEAR_MS)
        .expect("modified");
    let back = a.observe_local(&p, Some(&file(3)), 1001).expect("modified");
    let last = a.observe_local(&p, Some(&file(4)), 1002).expect("modified");
    for (x, y) in [(&ahead, &back), (&back, &last)] {
        assert_eq!(y.version.compare(&x.version), Causality::After);
        assert!(y.stamp > x.stamp);
    }
    // B gets them in any order: it ends with A's last write, and its clock stays its own.
    let orders = [
        [&ahead, &back, &last],
        [&last, &back, &ahead],
        [&back, &ahead, &last],
    ];
    for order in orders {
        let mut b = b.clone();
        for r in order {
            let d = b.receive(r, 1003);
            carry_out(&mut b, d);
        }
        assert_eq!(b.get(&p).and_then(content), Some(4), "order {order:?}");
        assert!(
            clock_millis(&b, 1003) <= 1003 + DEFAULT_MAX_CLOCK_SKEW_MS,
            "A's year ahead did not move B's clock"
        );
        // B's next write of the path beats A's year-ahead stamps and wins on A.
        let later = b.observe_local(&p, Some(&file(5)), 1004).expect("modified");
        assert_eq!(later.version.compare(&last.version), Causality::After);
        assert!(later.stamp > last.stamp);
        let mut a = a.clone();
        assert_eq!(
            a.receive(&later, 1005),
            Decision::Apply {
                record: later.clone(),
                conflict_copy: false
            }
        );
    }
    // After a restart with the clock back, A's next write still goes past its own.
    let mut a = Replica::from_records(A, a.records().cloned(), 1006);
    assert!(clock_millis(&a, 1006) <= 1006 + DEFAULT_MAX_CLOCK_SKEW_MS);
    let next = a.observe_local(&p, Some(&file(6)), 1006).expect("modified");
    assert_eq!(next.version.compare(&last.version), Causality::After);
    assert!(next.stamp > last.stamp);
}

#[test]
fn a_restart_with_a_stored_far_future_stamp_does_not_pin_the_clock() {
    let p = path("x");
    let (_, mut b, base) = shared_base(&p);
    let hostile = at_the_cap(&base, 2, H);
    let d = b.receive(&hostile, 2000);
    carry_out(&mut b, d);
    // B also writes over it once: its own record now carries a stamp at the cap too.
    b.observe_local(&path("y"), Some(&file(1)), 2000);
    let y = at_the_cap(b.get(&path("y")).expect("y"), 1, H);
    let d = b.receive(&y, 2000);
    carry_out(&mut b, d);
    let own = b
        .observe_local(&path("y"), Some(&file(3)), 2001)
        .expect("y");
    assert!(own.stamp.hlc > MAX_CLOCK_VALUE);
    let mut back = Replica::from_records(B, b.records().cloned(), 5000);
    assert_eq!(back.seq(), b.seq());
    assert_eq!(
        clock_millis(&back, 5000),
        5000,
        "the clock is this node's own"
    );
    let later = back.observe_local(&p, Some(&file(4)), 5000).expect("x");
    assert_eq!(later.version.compare(&hostile.version), Causality::After);
    assert!(later.stamp > hostile.stamp);
    let later_y = back.observe_local(&path("y"), None, 5000).expect("y");
    assert_eq!(later_y.version.compare(&own.version), Causality::After);
    assert!(later_y.stamp > own.stamp);
}

#[test]
fn a_stamp_within_the_skew_moves_the_clock_and_one_beyond_does_not() {
    let mut a = Replica::new(A).with_max_skew(10);
    let mut near = Replica::new(B)
        .observe_local(&path("x"), Some(&file(1)), 1008)
        .expect("new");
    assert_eq!(a.ahead_of_clock(&near, 1000), None);
    let d = a.receive(&near, 1000);
    carry_out(&mut a, d);
    assert_eq!(clock_millis(&a, 1000), 1008, "a small skew is followed");
    let far = Replica::new(B)
        .observe_local(&path("y"), Some(&file(1)), 1050)
        .expect("new");
    assert_eq!(a.ahead_of_clock(&far, 1000), Some(50));
    let d = a.receive(&far, 1000);
    carry_out(&mut a, d);
    assert_eq!(clock_millis(&a, 1000), 1008, "a large one is not");
    // A version counter far ahead is reported as well, by the largest counter.
    near.version = vv(&[(H, Hlc::bound(1200, 0))]);
    assert_eq!(a.ahead_of_clock(&near, 1000), Some(200));
}
