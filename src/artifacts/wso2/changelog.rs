//! WSO2 has no event table: successive snapshots of every row's cheap version
//! ([`Fingerprint`]) become the event log the retriever follows. Pure.
use std::collections::{BTreeMap, VecDeque};

use super::RowInstruction;
use crate::artifacts::{Event, Instruction};

/// Events kept for subscribers that poll behind (older ones are caught by reconcile).
const EVENT_LOG_CAP: usize = 10_000;
/// A row's cheap version, as the change scan reads it without reading `ARTIFACT` (except where
/// the backend offers nothing better).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub instruction: Option<String>,
    /// PostgreSQL: the row version's `xmin` (new on every write). MySQL/MariaDB: `TIME_STAMP`
    /// (`ON UPDATE CURRENT_TIMESTAMP` in WSO2's DDL). SQLite: `TIME_STAMP`.
    pub stamp: Option<String>,
    /// A content hash where the scan has one: MySQL/MariaDB for rows written in the last few
    /// seconds; SQLite for every row.
    pub hash: Option<String>,
}

impl Fingerprint {
    /// True when the row was written since `old` was taken. A hash that is present on one side
    /// only (a MySQL row that aged out of the recent window) is no change.
    fn differs_from(&self, old: &Fingerprint) -> bool {
        self.instruction != old.instruction
            || self.stamp != old.stamp
            || matches!((&self.hash, &old.hash), (Some(a), Some(b)) if a != b)
    }
}

/// (API id, gateway label) -> the row's fingerprint.
pub type Snapshot = BTreeMap<(String, String), Fingerprint>;

/// The event log of a table that has none: each [`ChangeLog::observe`] compares a snapshot
/// of every row's [`Fingerprint`] with the previous one and appends an event per (API, label)
/// row that appeared, changed or vanished. Event ids continue from `first_id`; the source
/// starts it at the wall clock (ms * 1000), so the ids of an agent restarted later are higher
/// and subscribers of a hub never see its log go backwards.
#[derive(Debug)]
pub struct ChangeLog {
    pub(super) known: Option<Snapshot>,
    events: VecDeque<Event>,
    last_id: i64,
}

impl ChangeLog {
    pub fn new(first_id: i64) -> Self {
        Self {
            known: None,
            events: VecDeque::new(),
            last_id: first_id,
        }
    }

    /// Takes a new snapshot. The first one only primes the log (the start-up deploy and every
    /// reconcile read the tables themselves). Returns the events appended.
    pub fn observe(&mut self, now: Snapshot) -> Vec<Event> {
        let Some(old) = self.known.take() else {
            self.known = Some(now);
            return Vec::new();
        };
        let mut appended = Vec::new();
        for (key, fp) in &now {
            if old.get(key).is_none_or(|o| fp.differs_from(o)) {
                let remove =
                    RowInstruction::parse(fp.instruction.as_deref()) == RowInstruction::Remove;
                appended.push((key, remove));
            }
        }
        for key in old.keys().filter(|k| !now.contains_key(*k)) {
            appended.push((key, true));
        }
        let appended: Vec<Event> = appended
            .into_iter()
            .map(|((api, label), remove)| {
                self.last_id += 1;
                Event {
                    id: self.last_id,
                    artifact_id: api.clone(),
                    label: label.clone(),
                    instruction: if remove {
                        Instruction::Remove
                    } else {
                        Instruction::Publish
                    },
                    revision: 0,
                }
            })
            .collect();
        self.events.extend(appended.iter().cloned());
        while self.events.len() > EVENT_LOG_CAP {
            self.events.pop_front();
        }
        self.known = Some(now);
        appended
    }

    /// Events with an id above `after`, oldest first, at most `limit`.
    pub fn after(&self, after: i64, limit: i64) -> Vec<Event> {
        self.events
            .iter()
            .filter(|e| e.id > after)
            .take(usize::try_from(limit.max(0)).unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    /// The newest event id (the first id when there is none).
    pub fn last_id(&self) -> i64 {
        self.last_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::wso2::source::tests::summary;

    const API: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    const API2: &str = "0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f";

    fn fp(instruction: &str, stamp: &str, hash: Option<&str>) -> Fingerprint {
        Fingerprint {
            instruction: Some(instruction.into()),
            stamp: Some(stamp.into()),
            hash: hash.map(str::to_owned),
        }
    }

    fn snap(entries: &[(&str, &str, Fingerprint)]) -> Snapshot {
        entries
            .iter()
            .map(|(a, l, f)| ((a.to_string(), l.to_string()), f.clone()))
            .collect()
    }

    #[test]
    fn the_change_log_turns_snapshots_into_events() {
        let mut log = ChangeLog::new(1000);
        let first = snap(&[(API, "L1", fp("Publish", "t1", None))]);
        assert!(
            log.observe(first.clone()).is_empty(),
            "the first snapshot primes"
        );
        assert_eq!(log.last_id(), 1000);
        assert!(log.observe(first).is_empty(), "nothing changed");

        // A new row, and a label's row that changed (new row version / time stamp).
        let second = snap(&[
            (API, "L1", fp("Publish", "t2", None)),
            (API2, "L2", fp("Publish", "t1", None)),
        ]);
        let got = log.observe(second);
        assert_eq!(
            summary(&got),
            vec![(1001, API2, "L2", "publish"), (1002, API, "L1", "publish")],
            "in (API, label) order"
        );
        // Publish -> Remove, and a row that vanished.
        let got = log.observe(snap(&[(API, "L1", fp("Remove", "t2", None))]));
        assert_eq!(
            summary(&got),
            vec![(1003, API, "L1", "remove"), (1004, API2, "L2", "remove")]
        );
        assert_eq!(log.last_id(), 1004);
        assert_eq!(summary(&log.after(1002, 10)), summary(&log.after(1002, 10)));
        assert_eq!(
            log.after(1001, 2).iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1002, 1003]
        );
        assert!(log.after(1004, 10).is_empty());
        assert_eq!(log.after(0, 100).len(), 4);
    }

    #[test]
    fn content_hashes_count_only_when_both_snapshots_have_one() {
        let mut log = ChangeLog::new(0);
        log.observe(snap(&[(API, "L", fp("Publish", "12:00:01", Some("h1")))]));
        // Rewritten within the same second: the time stamp is the same, the hash is not.
        let got = log.observe(snap(&[(API, "L", fp("Publish", "12:00:01", Some("h2")))]));
        assert_eq!(got.len(), 1);
        // The row ages out of the recent window: no hash any more, but no change either.
        assert!(
            log.observe(snap(&[(API, "L", fp("Publish", "12:00:01", None))]))
                .is_empty()
        );
    }

    #[test]
    fn the_change_log_keeps_a_bounded_tail() {
        let mut log = ChangeLog::new(0);
        log.observe(Snapshot::new());
        for i in 0..(EVENT_LOG_CAP + 10) {
            log.observe(snap(&[(API, "L", fp("Publish", &i.to_string(), None))]));
        }
        assert_eq!(log.after(0, i64::MAX).len(), EVENT_LOG_CAP);
        assert_eq!(log.last_id(), (EVENT_LOG_CAP + 10) as i64);
    }
}
