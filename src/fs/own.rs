//! What the folder engine writes itself, told to the folder's watcher so that the events our
//! own writes cause are not handed back as changes to look at.
//!
//! Only two kinds of event are recognised here; every other event of a path still leads to a
//! look, so a local edit right after one of our writes is never missed:
//! - the `create` that putting a new file in place causes (`linkat` of an unnamed temp file,
//!   whose stat key the index already holds);
//! - the events of an unnamed (`O_TMPFILE`) temp file itself, which inotify names `#<inode>`.
//!
//! (Renames of named temp files are recognised by the watcher alone: notify pairs their two
//! halves.) Both lists are bounded; an entry whose event never comes (a lost event, which
//! triggers a rescan anyway) ages out, and a rescan clears them.
//!
//! The other way round, the watcher tells the engine which paths a local program is writing
//! (written to, not closed yet): the engine neither looks at such a file nor replaces it, and
//! a peer's version of it waits for the writer's close, so no half-written local version is
//! recorded, shipped or kept as a conflict copy. A mark ends at the close, when the watcher
//! hands the path over anyway (`open_write_hold`), or at a rescan. A mark is set when the
//! watcher *reads* the event, which can lag behind the write; before it trusts the marks, the
//! engine puts a barrier through the watcher ([`OwnWrites::sync_with_watcher`]): it creates
//! and removes a file of its own and waits until the watcher has read that event, so every
//! event before it (inotify keeps one queue, in order) has set its mark.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::ignore::{TEMP_PREFIX, TEMP_SUFFIX};

/// The name of a barrier file (a temp name: never scanned, never synced).
const BARRIER: &str = "barrier-";

/// Entries kept per list; far more than one batch puts in place before its events arrive.
const KEPT: usize = 16_384;

/// A set that forgets its oldest entries beyond [`KEPT`].
#[derive(Debug)]
struct Recent<T> {
    set: HashSet<T>,
    order: VecDeque<T>,
}

impl<T: Hash + Eq + Clone> Recent<T> {
    fn new() -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    fn insert(&mut self, v: T) {
        if self.set.insert(v.clone()) {
            self.order.push_back(v);
            while self.order.len() > KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.set.clear();
        self.order.clear();
    }
}

#[derive(Debug)]
struct Inner {
    /// Absolute paths a new file of ours is about to be (or was just) linked at.
    created: Recent<PathBuf>,
    /// Inode numbers of our unnamed temp files.
    temps: Recent<u64>,
    /// Absolute paths a local program has written to and not closed yet.
    writing: Recent<PathBuf>,
}

/// Shared between one folder's engine (which writes) and its watcher (which reads).
#[derive(Debug)]
pub struct OwnWrites {
    inner: Mutex<Inner>,
    /// A watcher reads this folder's events (no barrier is waited for otherwise).
    watching: AtomicBool,
    /// The last barrier number handed out, and the last one the watcher has read.
    next_barrier: AtomicU64,
    barrier_seen: Mutex<u64>,
    barrier_cv: Condvar,
}

impl Default for OwnWrites {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                created: Recent::new(),
                temps: Recent::new(),
                writing: Recent::new(),
            }),
            watching: AtomicBool::new(false),
            next_barrier: AtomicU64::new(0),
            barrier_seen: Mutex::new(0),
            barrier_cv: Condvar::new(),
        }
    }
}

/// The number of a barrier file's name, if `path` names one.
pub fn barrier_number(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix(TEMP_PREFIX)?
        .strip_prefix(BARRIER)?
        .strip_suffix(TEMP_SUFFIX)?
        .parse()
        .ok()
}

impl OwnWrites {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        self.inner.lock().ok().map(|mut g| f(&mut g))
    }

    /// The engine is about to put a new file at `path`.
    pub fn expect_create(&self, path: &Path) {
        self.with(|i| i.created.insert(path.to_owned()));
    }

    /// Putting the file at `path` failed: its `create` will not come.
    pub fn forget_create(&self, path: &Path) {
        self.take_create(path);
    }

    /// The watcher saw `path` created: true (once) when that was the engine's own file.
    pub fn take_create(&self, path: &Path) -> bool {
        // The order list keeps the path until it ages out (at worst, a later entry for the
        // same path then ages out early: one extra look); only the set answers.
        self.with(|i| i.created.set.remove(path)).unwrap_or(false)
    }

    /// An unnamed temp file with inode `ino` is ours.
    pub fn note_temp(&self, ino: u64) {
        self.with(|i| i.temps.insert(ino));
    }

    /// True when `name` is how inotify names one of our unnamed temp files (`#<inode>`).
    pub fn is_own_temp_name(&self, name: &str) -> bool {
        let Some(ino) = name.strip_prefix('#').and_then(|n| n.parse::<u64>().ok()) else {
            return false;
        };
        self.with(|i| i.temps.set.contains(&ino)).unwrap_or(false)
    }

    /// A local program wrote to `path` and has not closed it yet.
    pub fn note_writing(&self, path: &Path) {
        self.with(|i| i.writing.insert(path.to_owned()));
    }

    /// The writer of `path` closed it, or the watcher hands it over anyway.
    pub fn end_writing(&self, path: &Path) {
        self.with(|i| i.writing.set.remove(path));
    }

    /// True while a local program is writing `path` (see [`OwnWrites::note_writing`]).
    pub fn is_writing(&self, path: &Path) -> bool {
        self.with(|i| i.writing.set.contains(path)).unwrap_or(false)
    }

    /// A watcher reads this folder's events from now on.
    pub fn watch_started(&self) {
        self.watching.store(true, Ordering::Release);
    }

    /// The watcher read the event of barrier `n` (and so every event before it).
    pub fn barrier_seen(&self, n: u64) {
        if let Ok(mut seen) = self.barrier_seen.lock() {
            *seen = (*seen).max(n);
            self.barrier_cv.notify_all();
        }
    }

    /// Makes the writing marks current: creates and removes a barrier file in `root` and
    /// waits (at most `timeout`) until the watcher has read its event. Blocking. True when
    /// the marks are current (also when no watcher runs); false when the barrier could not
    /// be made or did not come through in time (the marks are then only as current as the
    /// watcher is).
    pub fn sync_with_watcher(&self, root: &Path, timeout: Duration) -> bool {
        if !self.watching.load(Ordering::Acquire) {
            return true;
        }
        let n = self.next_barrier.fetch_add(1, Ordering::AcqRel) + 1;
        let path = root.join(format!("{TEMP_PREFIX}{BARRIER}{n}{TEMP_SUFFIX}"));
        let made = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map(drop);
        let _ = std::fs::remove_file(&path);
        if made.is_err() {
            return false;
        }
        let Ok(seen) = self.barrier_seen.lock() else {
            return false;
        };
        self.barrier_cv
            .wait_timeout_while(seen, timeout, |seen| *seen < n)
            .is_ok_and(|(seen, _)| *seen >= n)
    }

    /// The watcher rescans (its pending paths are dropped): no mark may outlive the look
    /// that would end it.
    pub fn end_all_writing(&self) {
        self.with(|i| i.writing.clear());
    }

    /// Events were lost (the watcher rescans): forget everything, so no stale entry can hide
    /// a later change.
    pub fn clear(&self) {
        self.with(|i| {
            i.created.clear();
            i.temps.clear();
            i.writing.clear();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_names_are_recognised() {
        assert_eq!(
            barrier_number(Path::new("/r/.artisync.barrier-42.tmp")),
            Some(42)
        );
        assert_eq!(barrier_number(Path::new("/r/.artisync.abc.tmp")), None);
        assert_eq!(barrier_number(Path::new("/r/barrier-42.tmp")), None);
        // Without a watcher there is nothing to wait for.
        let own = OwnWrites::default();
        assert!(own.sync_with_watcher(Path::new("/nonexistent"), Duration::from_millis(1)));
    }

    #[test]
    fn writing_marks_end_at_the_close_and_at_a_rescan() {
        let own = OwnWrites::default();
        own.note_writing(Path::new("/r/a.xml"));
        own.note_writing(Path::new("/r/b.xml"));
        assert!(own.is_writing(Path::new("/r/a.xml")));
        own.end_writing(Path::new("/r/a.xml"));
        assert!(!own.is_writing(Path::new("/r/a.xml")));
        assert!(own.is_writing(Path::new("/r/b.xml")));
        own.end_all_writing();
        assert!(!own.is_writing(Path::new("/r/b.xml")));
        own.note_writing(Path::new("/r/c.xml"));
        own.clear();
        assert!(!own.is_writing(Path::new("/r/c.xml")));
    }

    #[test]
    fn creates_are_taken_once_and_temps_recognised_by_inode() {
        let own = OwnWrites::default();
        own.expect_create(Path::new("/r/a.xml"));
        own.expect_create(Path::new("/r/b.xml"));
        own.forget_create(Path::new("/r/b.xml"));
        assert!(own.take_create(Path::new("/r/a.xml")));
        assert!(!own.take_create(Path::new("/r/a.xml")), "only once");
        assert!(!own.take_create(Path::new("/r/b.xml")), "forgotten");
        own.note_temp(4242);
        assert!(own.is_own_temp_name("#4242"));
        assert!(!own.is_own_temp_name("#4243"));
        assert!(!own.is_own_temp_name("4242"));
        assert!(!own.is_own_temp_name("#42x"));
        own.clear();
        assert!(!own.is_own_temp_name("#4242"));
    }

    #[test]
    fn old_entries_age_out() {
        let own = OwnWrites::default();
        for i in 0..(KEPT as u64 + 10) {
            own.note_temp(i);
        }
        assert!(!own.is_own_temp_name("#0"));
        assert!(own.is_own_temp_name(&format!("#{}", KEPT + 9)));
    }
}
