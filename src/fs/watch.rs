//! Watching a folder with inotify (via `notify`). The watcher is a hint, the scanner the truth:
//! every event only names a path for the engine to look at, and anything that may have lost
//! events (queue overflow, watcher error, the root itself moving) asks for a full rescan.
//!
//! A path is handed on when its writer closes it (close-after-write), or after a quiet period
//! when no close can be expected (create, rename, delete, chmod). A file that was written to
//! but not closed yet is held until its close, or until `open_write_hold` of quiet has passed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::RelPath;

use super::ignore::Ignore;
use super::own::OwnWrites;

/// Raw events buffered between the notify thread and the debouncer; past this, a rescan.
const RAW_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot watch {path}: the inotify watch limit is reached; raise fs.inotify.max_user_watches (sysctl) and restart"
    )]
    TooManyWatches { path: PathBuf },
    #[error("cannot watch {path}: {source}")]
    Notify {
        path: PathBuf,
        source: notify::Error,
    },
}

/// What the watcher hands to the folder engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Look at these paths.
    Paths(Vec<RelPath>),
    /// Events may have been lost, or the root changed: walk the whole folder.
    Rescan,
}

#[derive(Debug)]
enum Raw {
    /// A path changed; `written` when data was written, `closed` on close-after-write,
    /// `renamed_to` when something was renamed onto it.
    Path {
        path: PathBuf,
        written: bool,
        closed: bool,
        renamed_to: bool,
    },
    /// One of our own temp files was renamed onto `to`: the engine's own write, already in
    /// its index with the stat key of the temp file, so the `renamed_to` event it caused
    /// needs no look.
    OwnRename {
        to: PathBuf,
    },
    Rescan,
}

fn is_own_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(Ignore::is_temp)
}

/// Converts one notify event into raw items (unit-tested). Events on our own temp files, named
/// or unnamed, and the creation of a file the engine put in place itself are dropped here,
/// before they cost a queue slot.
fn convert(event: &notify::Event, own: &OwnWrites) -> Vec<Raw> {
    if event.need_rescan() || matches!(event.kind, EventKind::Other) {
        own.clear();
        return vec![Raw::Rescan];
    }
    if let [path] = &event.paths[..] {
        let unnamed_temp = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| own.is_own_temp_name(n));
        let own_create = matches!(
            event.kind,
            EventKind::Create(CreateKind::File | CreateKind::Any)
        ) && own.take_create(path);
        if unnamed_temp || own_create {
            return Vec::new();
        }
    }
    let (written, closed, renamed_to) = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => (false, true, false),
        // Opens and reads change nothing.
        EventKind::Access(_) => return Vec::new(),
        EventKind::Modify(ModifyKind::Data(_)) | EventKind::Modify(ModifyKind::Any) => {
            (true, false, false)
        }
        // A file just created by `open(O_CREAT)` is empty until its writer writes: it counts
        // as being written until its close (which always follows an open for writing). A
        // file created without an open (a hard link) waits for the open-write hold instead.
        EventKind::Create(CreateKind::File) => (true, false, false),
        // notify sends a rename as `From` and `To`, then `Both` when it could pair the two
        // halves. The halves name the paths; `Both` only tells whose temp file it was.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            return match &event.paths[..] {
                [from, to] if is_own_temp(from) && !is_own_temp(to) => {
                    vec![Raw::OwnRename { to: to.clone() }]
                }
                _ => Vec::new(),
            };
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => (false, false, true),
        _ => (false, false, false),
    };
    event
        .paths
        .iter()
        .filter(|p| !is_own_temp(p))
        .map(|p| Raw::Path {
            path: p.clone(),
            written,
            closed,
            renamed_to,
        })
        .collect()
}

/// Watches `root` until `cancel`, sending batches of changed paths to `out`.
pub struct FolderWatcher {
    _watcher: RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl FolderWatcher {
    pub fn start(
        root: &Path,
        ignore: Ignore,
        own: Arc<OwnWrites>,
        quiet: Duration,
        open_write_hold: Duration,
        out: mpsc::Sender<Change>,
        cancel: CancellationToken,
    ) -> Result<Self, WatchError> {
        let (tx, rx) = mpsc::channel::<Raw>(RAW_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let flag = overflow.clone();
        let mut burst = Burst::default();
        let marks = own.clone();
        own.watch_started();
        let handler = move |res: notify::Result<notify::Event>| {
            burst.pace();
            if let Ok(event) = &res {
                for n in event
                    .paths
                    .iter()
                    .filter_map(|p| super::own::barrier_number(p))
                {
                    own.barrier_seen(n);
                }
            }
            let items = match res {
                Ok(event) => convert(&event, &own),
                Err(_) => {
                    own.clear();
                    vec![Raw::Rescan]
                }
            };
            for item in items {
                // Marked here, as the event is read, not when the debouncer gets to it: the
                // engine must know of a writer as early as this node can.
                if let Raw::Path {
                    path,
                    written,
                    closed,
                    ..
                } = &item
                {
                    if *closed {
                        own.end_writing(path);
                    } else if *written {
                        own.note_writing(path);
                    }
                }
                if tx.try_send(item).is_err() {
                    // Lost: the debouncer rescans; nothing we remember may hide a change.
                    own.clear();
                    flag.store(true, Ordering::Release);
                }
            }
        };
        // Symlinks are never followed: not by the scan, and not by the watcher either.
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut watcher =
            RecommendedWatcher::new(handler, config).map_err(|source| watch_error(root, source))?;
        watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|source| watch_error(root, source))?;
        let debouncer = Debouncer {
            root: root.to_owned(),
            ignore,
            quiet,
            open_write_hold,
            pending: HashMap::new(),
            overflow,
            own: marks,
        };
        let task = tokio::spawn(debouncer.run(rx, out, cancel));
        Ok(Self {
            _watcher: watcher,
            task,
        })
    }

    /// Waits for the debouncer to stop (after cancel).
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "watcher task failed");
        }
    }
}

/// Events closer together than this belong to one burst.
const BURST_GAP: std::time::Duration = std::time::Duration::from_millis(5);
/// A burst this long (in events) is read in slices instead of event by event.
const BURST_EVENTS: u32 = 64;
/// How long the notify thread pauses, at most once per pause length, during a long burst.
const BURST_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// Paces the notify thread during a long burst of events (a peer's batch of thousands of new
/// files, a large local copy). Waking the thread for each event costs the writer more than
/// writing the file (measured: a third more time for 7,000 new files); pausing it now and
/// then lets the events queue up in the kernel and be read many at a time. A short run of
/// events (one file written) is never paused, so a single change is not delayed.
#[derive(Default)]
struct Burst {
    last_event: Option<std::time::Instant>,
    events: u32,
    last_pause: Option<std::time::Instant>,
}

impl Burst {
    fn pace(&mut self) {
        if self.pause_due(std::time::Instant::now()) {
            std::thread::sleep(BURST_PAUSE);
            self.last_pause = Some(std::time::Instant::now());
        }
    }

    /// Notes an event seen at `now`; true when the thread should pause now.
    fn pause_due(&mut self, now: std::time::Instant) -> bool {
        let in_burst = self
            .last_event
            .is_some_and(|t| now.duration_since(t) < BURST_GAP);
        self.events = if in_burst {
            self.events.saturating_add(1)
        } else {
            0
        };
        self.last_event = Some(now);
        let paused_lately = self
            .last_pause
            .is_some_and(|t| now.duration_since(t) < BURST_PAUSE);
        self.events >= BURST_EVENTS && !paused_lately
    }
}

fn watch_error(root: &Path, source: notify::Error) -> WatchError {
    let no_space = matches!(&source.kind, notify::ErrorKind::Io(e) if e.raw_os_error() == Some(nix::libc::ENOSPC))
        || matches!(source.kind, notify::ErrorKind::MaxFilesWatch);
    if no_space {
        WatchError::TooManyWatches {
            path: root.to_owned(),
        }
    } else {
        WatchError::Notify {
            path: root.to_owned(),
            source,
        }
    }
}

struct Pending {
    due: Instant,
    /// Only a rename onto the path has been seen so far (it may turn out to be our own).
    rename_only: bool,
}

struct Debouncer {
    root: PathBuf,
    ignore: Ignore,
    quiet: Duration,
    open_write_hold: Duration,
    pending: HashMap<RelPath, Pending>,
    overflow: Arc<AtomicBool>,
    /// Where the writing marks end (see [`OwnWrites::note_writing`]).
    own: Arc<OwnWrites>,
}

impl Debouncer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Raw>,
        out: mpsc::Sender<Change>,
        cancel: CancellationToken,
    ) {
        loop {
            let next_due = self.pending.values().map(|p| p.due).min();
            let sleep = async {
                match next_due {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                item = rx.recv() => {
                    let Some(item) = item else { return };
                    let mut rescan = matches!(item, Raw::Rescan);
                    self.take(item, &mut rescan);
                    // Drain what is already queued so a burst becomes one batch.
                    while let Ok(item) = rx.try_recv() {
                        if matches!(item, Raw::Rescan) { rescan = true; }
                        self.take(item, &mut rescan);
                    }
                    if self.overflow.swap(false, Ordering::AcqRel) {
                        tracing::warn!(root = %self.root.display(), "watch queue overflowed; rescanning");
                        rescan = true;
                    }
                    if rescan {
                        self.pending.clear();
                        self.own.end_all_writing();
                        if out.send(Change::Rescan).await.is_err() { return; }
                    }
                }
                _ = sleep => {}
            }
            let now = Instant::now();
            let mut ready: Vec<RelPath> = self
                .pending
                .iter()
                .filter(|(_, p)| p.due <= now)
                .map(|(k, _)| k.clone())
                .collect();
            if !ready.is_empty() {
                for k in &ready {
                    self.pending.remove(k);
                    // Handed over: a writer that never closed has had its hold.
                    self.own.end_writing(&self.root.join(k.as_str()));
                }
                ready.sort();
                if out.send(Change::Paths(ready)).await.is_err() {
                    return;
                }
            }
        }
    }

    fn relative(&self, path: &Path, rescan: &mut bool) -> Option<RelPath> {
        let rel = path.strip_prefix(&self.root).ok()?;
        if rel.as_os_str().is_empty() {
            // The root itself was deleted, moved or changed: only a full look can tell.
            *rescan = true;
            return None;
        }
        match rel.to_str().map(RelPath::new) {
            Some(Ok(r)) => Some(r),
            _ => {
                tracing::warn!(path = %path.display(), "skipping a path that is not valid UTF-8 or not a valid relative path");
                None
            }
        }
    }

    fn take(&mut self, item: Raw, rescan: &mut bool) {
        let (path, written, closed, renamed_to) = match item {
            Raw::Rescan => return,
            Raw::OwnRename { to } => {
                // The engine's own write: drop the look its rename scheduled, unless another
                // event (someone writing right after us) asked for one too.
                if let Some(rel) = self.relative(&to, rescan) {
                    if self.pending.get(&rel).is_some_and(|p| p.rename_only) {
                        self.pending.remove(&rel);
                    }
                }
                return;
            }
            Raw::Path {
                path,
                written,
                closed,
                renamed_to,
            } => (path, written, closed, renamed_to),
        };
        let Some(rel) = self.relative(&path, rescan) else {
            return;
        };
        if self.ignore.is_ignored(&rel) {
            return;
        }
        let now = Instant::now();
        let due = if closed {
            now
        } else if written {
            now + self.open_write_hold
        } else {
            now + self.quiet
        };
        match self.pending.get_mut(&rel) {
            // A close makes it ready now; otherwise a newer event can only push the deadline
            // (a write extends a pending quiet period to the open-write hold).
            Some(p) => {
                p.due = if closed { now } else { p.due.max(due) };
                p.rename_only &= renamed_to;
            }
            None => {
                self.pending.insert(
                    rel,
                    Pending {
                        due,
                        rename_only: renamed_to,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Through inotify: a file written and not closed yet is marked as being written as
    /// soon as its event is read; the close ends the mark.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_open_for_writing_is_marked_until_its_close() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let own = Arc::new(OwnWrites::default());
        let (tx, _rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let watcher = super::FolderWatcher::start(
            &root,
            Ignore::new(&[]).expect("ignore"),
            own.clone(),
            Duration::from_millis(25),
            Duration::from_secs(60),
            tx,
            cancel.clone(),
        )
        .expect("watch");
        let path = root.join("x.xml");
        // Created and still empty: already being written.
        let mut f = std::fs::File::create(&path).expect("create");
        let until = |want: bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while own.is_writing(&path) != want {
                assert!(
                    std::time::Instant::now() < deadline,
                    "is_writing never became {want}"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        until(true);
        assert!(
            own.sync_with_watcher(&root, Duration::from_secs(10)),
            "a barrier comes through the watcher"
        );
        f.write_all(b"<half").expect("write");
        drop(f);
        until(false);
        cancel.cancel();
        watcher.join().await;
    }

    #[test]
    fn only_a_long_burst_of_events_pauses_the_notify_thread() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut b = super::Burst::default();
        // One file written: a handful of events, never a pause.
        assert!((0..8).all(|i| !b.pause_due(at(i * 10))));
        // A quiet gap ends the burst; a long one pauses once its run is long enough, then
        // at most once per pause length.
        let mut pauses = Vec::new();
        for i in 0..400u64 {
            let now = at(100_000 + i * 10);
            if b.pause_due(now) {
                b.last_pause = Some(now);
                pauses.push(i);
            }
        }
        assert_eq!(pauses.first(), Some(&u64::from(super::BURST_EVENTS)));
        assert!(
            pauses.windows(2).all(|w| (w[1] - w[0]) * 10 >= 1000),
            "{pauses:?}"
        );
        assert!(pauses.len() >= 3, "{pauses:?}");
    }

    use super::*;
    use notify::event::DataChange;

    fn convert_fresh(event: &notify::Event) -> Vec<Raw> {
        convert(event, &OwnWrites::default())
    }

    #[test]
    fn creations_and_unnamed_temps_of_the_engine_are_dropped() {
        let own = OwnWrites::default();
        own.expect_create(Path::new("/r/api/new.xml"));
        own.note_temp(991);
        let create = ev(EventKind::Create(CreateKind::File), "/r/api/new.xml");
        assert!(convert(&create, &own).is_empty(), "our own creation");
        assert_eq!(
            convert(&create, &own).len(),
            1,
            "a second creation is someone else's"
        );
        for kind in [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
        ] {
            assert!(convert(&ev(kind, "/r/api/#991"), &own).is_empty());
            assert_eq!(convert(&ev(kind, "/r/api/#992"), &own).len(), 1);
        }
        // A lost event clears what is remembered.
        own.expect_create(Path::new("/r/x.xml"));
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(matches!(&convert(&overflow, &own)[..], [Raw::Rescan]));
        assert!(!own.take_create(Path::new("/r/x.xml")));
    }

    fn ev(kind: EventKind, p: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(p))
    }

    #[test]
    fn convert_classifies_events() {
        let close = convert_fresh(&ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "/r/a",
        ));
        assert!(matches!(
            &close[..],
            [Raw::Path {
                closed: true,
                written: false,
                ..
            }]
        ));
        let write = convert_fresh(&ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            "/r/a",
        ));
        assert!(matches!(
            &write[..],
            [Raw::Path {
                closed: false,
                written: true,
                ..
            }]
        ));
        // A new file is empty until its writer writes: it is being written until its close.
        let create = convert_fresh(&ev(EventKind::Create(CreateKind::File), "/r/a"));
        assert!(matches!(
            &create[..],
            [Raw::Path {
                closed: false,
                written: true,
                ..
            }]
        ));
        let mkdir = convert_fresh(&ev(EventKind::Create(CreateKind::Folder), "/r/d"));
        assert!(matches!(
            &mkdir[..],
            [Raw::Path {
                closed: false,
                written: false,
                ..
            }]
        ));
        assert!(
            convert_fresh(&ev(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/r/a"
            ))
            .is_empty()
        );
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(matches!(&convert_fresh(&overflow)[..], [Raw::Rescan]));
    }

    fn rename(mode: RenameMode, paths: &[&str]) -> notify::Event {
        paths.iter().fold(
            notify::Event::new(EventKind::Modify(ModifyKind::Name(mode))),
            |e, p| e.add_path(PathBuf::from(p)),
        )
    }

    #[test]
    fn own_temp_files_are_dropped_and_their_renames_recognised() {
        let temp = "/r/api/.artisync.00ff00ff00ff00ff.tmp";
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert!(
                convert_fresh(&ev(kind, temp)).is_empty(),
                "{kind:?} on a temp file"
            );
        }
        assert!(convert_fresh(&rename(RenameMode::From, &[temp])).is_empty());
        assert!(matches!(
            &convert_fresh(&rename(RenameMode::To, &["/r/api/a.xml"]))[..],
            [Raw::Path {
                renamed_to: true,
                ..
            }]
        ));
        match &convert_fresh(&rename(RenameMode::Both, &[temp, "/r/api/a.xml"]))[..] {
            [Raw::OwnRename { to }] => assert_eq!(to, &PathBuf::from("/r/api/a.xml")),
            other => panic!("own rename not recognised: {other:?}"),
        }
        // Someone else's rename is only reported through its two halves.
        assert!(convert_fresh(&rename(RenameMode::Both, &["/r/old.xml", "/r/new.xml"])).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn own_renames_need_no_look_but_a_write_after_them_does() {
        let (tx, rx) = mpsc::channel(16);
        let (out_tx, mut out) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(debouncer("/r").run(rx, out_tx, cancel.clone()));
        let to = |p: &str| Raw::Path {
            path: PathBuf::from(p),
            written: false,
            closed: false,
            renamed_to: true,
        };
        let own = |p: &str| Raw::OwnRename {
            to: PathBuf::from(p),
        };
        // Ours, twice in a row: nothing to look at.
        tx.send(to("/r/ours.xml")).await.expect("send");
        tx.send(own("/r/ours.xml")).await.expect("send");
        // Ours, but a local writer closed the file right after: looked at.
        tx.send(to("/r/edited.xml")).await.expect("send");
        tx.send(own("/r/edited.xml")).await.expect("send");
        tx.send(Raw::Path {
            path: PathBuf::from("/r/edited.xml"),
            written: false,
            closed: true,
            renamed_to: false,
        })
        .await
        .expect("send");
        // Someone else's rename onto a path: looked at.
        tx.send(to("/r/moved-in.xml")).await.expect("send");
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match out.recv().await.expect("batch") {
                Change::Paths(p) => seen.extend(p),
                Change::Rescan => panic!("no rescan expected"),
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            vec![
                RelPath::new("edited.xml").expect("valid"),
                RelPath::new("moved-in.xml").expect("valid")
            ]
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(out.try_recv().is_err(), "our own rename was looked at");
        cancel.cancel();
        task.await.expect("join");
    }

    fn debouncer(root: &str) -> Debouncer {
        Debouncer {
            root: PathBuf::from(root),
            ignore: Ignore::new(&[]).expect("ignore"),
            quiet: Duration::from_millis(25),
            open_write_hold: Duration::from_secs(10),
            pending: HashMap::new(),
            overflow: Arc::new(AtomicBool::new(false)),
            own: Arc::new(OwnWrites::default()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_written_file_waits_for_its_close_and_a_quiet_one_for_the_quiet_period() {
        let (tx, rx) = mpsc::channel(16);
        let (out_tx, mut out) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(debouncer("/r").run(rx, out_tx, cancel.clone()));
        let raw = |p: &str, written, closed| Raw::Path {
            path: PathBuf::from(p),
            written,
            closed,
            renamed_to: false,
        };
        tx.send(raw("/r/slow.siddhiql", true, false))
            .await
            .expect("send");
        tx.send(raw("/r/created", false, false))
            .await
            .expect("send");
        tx.send(raw("/r/x.swp", true, true)).await.expect("send");
        // The quiet one comes after 25 ms; the open one is still held.
        let first = out.recv().await.expect("batch");
        assert_eq!(
            first,
            Change::Paths(vec![RelPath::new("created").expect("valid")])
        );
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        tx.send(raw("/r/slow.siddhiql", false, true))
            .await
            .expect("send");
        let second = out.recv().await.expect("batch");
        assert_eq!(
            second,
            Change::Paths(vec![RelPath::new("slow.siddhiql").expect("valid")])
        );
        assert!(
            Instant::now() - t0 < Duration::from_secs(6),
            "released at its close, not at the hold"
        );
        tx.send(Raw::Rescan).await.expect("send");
        assert_eq!(out.recv().await, Some(Change::Rescan));
        tx.send(raw("/r", false, false)).await.expect("send");
        assert_eq!(
            out.recv().await,
            Some(Change::Rescan),
            "an event on the root itself rescans"
        );
        cancel.cancel();
        task.await.expect("join");
    }

    /// A writer that never closes keeps its mark only until the watcher hands the path over
    /// at the end of the open-write hold; a rescan ends every mark.
    #[tokio::test(start_paused = true)]
    async fn writing_marks_end_when_the_path_is_handed_over_or_at_a_rescan() {
        let (tx, rx) = mpsc::channel(16);
        let (out_tx, mut out) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let d = debouncer("/r");
        let own = d.own.clone();
        let task = tokio::spawn(d.run(rx, out_tx, cancel.clone()));
        own.note_writing(Path::new("/r/open.xml"));
        tx.send(Raw::Path {
            path: PathBuf::from("/r/open.xml"),
            written: true,
            closed: false,
            renamed_to: false,
        })
        .await
        .expect("send");
        assert_eq!(
            out.recv().await,
            Some(Change::Paths(vec![
                RelPath::new("open.xml").expect("valid")
            ]))
        );
        assert!(!own.is_writing(Path::new("/r/open.xml")), "handed over");
        own.note_writing(Path::new("/r/other.xml"));
        tx.send(Raw::Rescan).await.expect("send");
        assert_eq!(out.recv().await, Some(Change::Rescan));
        assert!(!own.is_writing(Path::new("/r/other.xml")), "rescanned");
        cancel.cancel();
        task.await.expect("join");
    }
}
