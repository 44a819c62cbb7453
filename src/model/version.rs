//! Version vectors, node ids and modification stamps.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

/// Random, stable identity of a node (kept in `state_dir`). Ties between concurrent writes with
/// the same clock value are broken by the larger node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How two version vectors relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// `self` happened before `other` (other dominates).
    Before,
    /// `self` happened after `other` (self dominates).
    After,
    Concurrent,
}

/// Per-node counters of the writes a version has seen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VersionVector(BTreeMap<NodeId, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn from_entries(entries: impl IntoIterator<Item = (NodeId, u64)>) -> Self {
        Self(entries.into_iter().filter(|(_, c)| *c > 0).collect())
    }

    pub fn entries(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.0.iter().map(|(n, c)| (*n, *c))
    }

    pub fn get(&self, node: NodeId) -> u64 {
        self.0.get(&node).copied().unwrap_or(0)
    }

    /// Records one more write by `node`.
    pub fn bump(&mut self, node: NodeId) {
        let c = self.0.entry(node).or_insert(0);
        *c = c.saturating_add(1);
    }

    /// Records one more write by `node`, with a counter of at least `floor`. A node gives its
    /// own writes their HLC stamp as the floor, so its counters move past every counter it ever
    /// sent, even after a crash rolled its index back to an older counter (a repeated counter
    /// would make two different writes look equal, and peers would keep different bytes).
    pub fn bump_past(&mut self, node: NodeId, floor: u64) {
        let c = self.0.entry(node).or_insert(0);
        *c = c.saturating_add(1).max(floor);
    }

    /// Pointwise maximum: the result dominates (or equals) both.
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, counter) in &other.0 {
            let c = self.0.entry(*node).or_insert(0);
            *c = (*c).max(*counter);
        }
    }

    pub fn merged(&self, other: &VersionVector) -> VersionVector {
        let mut v = self.clone();
        v.merge(other);
        v
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut less = false;
        let mut greater = false;
        let nodes = self.0.keys().chain(other.0.keys());
        for node in nodes {
            match self.get(*node).cmp(&other.get(*node)) {
                Ordering::Less => less = true,
                Ordering::Greater => greater = true,
                Ordering::Equal => {}
            }
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }
}

impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(n, c)| format!("{n}:{c}")).collect();
        write!(f, "{{{}}}", parts.join(","))
    }
}

/// Modification stamp of a write: hybrid logical clock value and the writer. Totally ordered;
/// two different writes never share a stamp, so "later stamp wins" is deterministic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp {
    pub hlc: u64,
    pub node: NodeId,
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.hlc, self.node)
    }
}

/// Bits of an HLC value kept for the logical counter under the millisecond wall time.
const HLC_LOGICAL_BITS: u32 = 16;

/// The largest stamp or version counter accepted from a peer: about the year 4200 in HLC units
/// (milliseconds shifted left by 16 bits); the network edge refuses records above it. A node
/// adds one per write to the greatest value it holds, so the 3·2^62 of headroom above this cap
/// can never be used up: no counter or stamp reaches `u64::MAX`, where it would stop growing and
/// every later write would look equal to the one before.
pub const MAX_CLOCK_VALUE: u64 = 1 << 62;

/// Hybrid logical clock: never goes backwards, moves past every stamp it has seen, and tracks
/// wall time in milliseconds when clocks agree. The wall time is an input, never read here.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hlc {
    last: u64,
}

impl Hlc {
    /// A stamp value for a new local event at wall time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        let physical = now_ms.saturating_mul(1 << HLC_LOGICAL_BITS);
        // Saturates: a peer's stamp at the top of the range must not wrap the clock to zero.
        self.last = physical.max(self.last.saturating_add(1));
        self.last
    }

    /// Moves the clock past a value seen from elsewhere.
    pub fn observe(&mut self, seen: u64) {
        self.last = self.last.max(seen);
    }

    /// Wall-clock milliseconds of a stamp value (for display).
    pub fn millis(value: u64) -> u64 {
        value >> HLC_LOGICAL_BITS
    }

    /// The greatest HLC value of wall time `now_ms + max_skew_ms`: what a clock at `now_ms` may
    /// adopt from elsewhere. Saturates instead of wrapping.
    pub fn bound(now_ms: u64, max_skew_ms: u64) -> u64 {
        let ms = now_ms.saturating_add(max_skew_ms);
        if ms > u64::MAX >> HLC_LOGICAL_BITS {
            return u64::MAX;
        }
        (ms << HLC_LOGICAL_BITS) | ((1 << HLC_LOGICAL_BITS) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        VersionVector::from_entries(entries.iter().map(|(n, c)| (NodeId(*n), *c)))
    }

    #[test]
    fn compare_covers_all_four_relations() {
        assert_eq!(vv(&[(1, 1)]).compare(&vv(&[(1, 1)])), Causality::Equal);
        assert_eq!(vv(&[(1, 1)]).compare(&vv(&[(1, 2)])), Causality::Before);
        assert_eq!(
            vv(&[(1, 2), (2, 1)]).compare(&vv(&[(1, 2)])),
            Causality::After
        );
        assert_eq!(vv(&[(1, 1)]).compare(&vv(&[(2, 1)])), Causality::Concurrent);
        assert_eq!(vv(&[]).compare(&vv(&[(2, 1)])), Causality::Before);
    }

    #[test]
    fn merge_dominates_both_sides() {
        let a = vv(&[(1, 3), (2, 1)]);
        let b = vv(&[(2, 4), (3, 1)]);
        let m = a.merged(&b);
        assert_eq!(m, vv(&[(1, 3), (2, 4), (3, 1)]));
        assert!(matches!(m.compare(&a), Causality::After));
        assert!(matches!(m.compare(&b), Causality::After));
    }

    #[test]
    fn hlc_is_monotonic_even_when_wall_clock_goes_back() {
        let mut c = Hlc::default();
        let a = c.tick(1000);
        let b = c.tick(999);
        assert!(b > a);
        c.observe(u64::from(u32::MAX) << 20);
        assert!(c.tick(1001) > u64::from(u32::MAX) << 20);
        assert_eq!(Hlc::millis(Hlc::default().tick(1234)), 1234);
    }

    #[test]
    fn counters_and_clock_at_the_top_of_the_range_saturate_instead_of_wrapping() {
        // A peer's record can carry any value: no overflow panic, nothing goes back to zero.
        let mut c = Hlc::default();
        c.observe(u64::MAX);
        assert_eq!(c.tick(1000), u64::MAX);
        let mut v = vv(&[(7, u64::MAX)]);
        v.bump(NodeId(7));
        v.bump_past(NodeId(7), 5);
        assert_eq!(v.get(NodeId(7)), u64::MAX);
    }

    #[test]
    fn bound_is_the_last_value_of_the_skewed_millisecond_and_saturates() {
        assert_eq!(Hlc::millis(Hlc::bound(1000, 500)), 1500);
        assert_eq!(Hlc::bound(1000, 500) + 1, Hlc::default().tick(1501));
        assert_eq!(Hlc::bound(u64::MAX >> 16, 1), u64::MAX);
        assert_eq!(Hlc::bound(u64::MAX, u64::MAX), u64::MAX);
        assert!(
            Hlc::bound(1 << 45, 0) < MAX_CLOCK_VALUE,
            "year 3000 is below the cap"
        );
    }

    /// Issue 12: a peer may send our own node a counter at the cap. Each later write still
    /// counts one more, far from saturation.
    #[test]
    fn a_counter_at_the_cap_keeps_growing_write_after_write() {
        let mut v = vv(&[(1, MAX_CLOCK_VALUE), (2, MAX_CLOCK_VALUE)]);
        for i in 0..1000u64 {
            let before = v.clone();
            v.bump_past(NodeId(1), 5000 + i);
            assert_eq!(v.compare(&before), Causality::After);
            assert_eq!(v.get(NodeId(1)), MAX_CLOCK_VALUE + i + 1);
        }
    }

    #[test]
    fn bump_past_counts_one_more_write_and_jumps_to_the_floor() {
        let mut v = vv(&[(1, 3)]);
        v.bump_past(NodeId(1), 2);
        assert_eq!(v.get(NodeId(1)), 4, "an old floor still counts a write");
        v.bump_past(NodeId(1), 1 << 40);
        assert_eq!(v.get(NodeId(1)), 1 << 40);
        v.bump_past(NodeId(2), 9);
        assert_eq!(v.get(NodeId(2)), 9);
    }
}
