//! Helpers of the database-backed tests (artifact store, WSO2 schema): one scenario function
//! per backend, a runtime for the few async calls, and a folder's files with their bytes.

use std::collections::BTreeMap;
use std::path::Path;

use std::time::Duration;

use artisync::artifacts::db::Backend;
use artisync::artifacts::db::testing::{drop_db, fresh_url};
use serde_json::Value;

use super::{Node, wait_for};

/// Bound for a retriever to deploy, undeploy or report what the test wrote.
pub const RETRIEVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Makes three tests of each scenario function taking a `Backend`:
/// `<scenario>::sqlite`, `::postgres` and `::mysql`.
macro_rules! per_backend {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use artisync::artifacts::db::Backend;
            #[test]
            fn sqlite() {
                super::$scenario(Backend::Sqlite);
            }
            #[test]
            fn postgres() {
                super::$scenario(Backend::Postgres);
            }
            #[test]
            fn mysql() {
                super::$scenario(Backend::MySql);
            }
        }
    )*};
}
pub(crate) use per_backend;

/// Runs `f` to completion on a new current-thread runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

/// Every file below `root` with its bytes (artisync's temp files excluded).
pub fn contents(root: &Path) -> BTreeMap<String, Vec<u8>> {
    artisync::demo::tree_map(root, |p| std::fs::read(p).ok())
}

/// `Ok` when the files below `root` are exactly `want`, byte for byte; else what differs.
pub fn tree_is(root: &Path, want: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
    let got = contents(root);
    if &got == want {
        return Ok(());
    }
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<&String> = want
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, _)| k)
        .collect();
    Err(format!(
        "missing {missing:?}; unexpected {extra:?}; content differs {differ:?}"
    ))
}

/// A fresh, empty database for one test (and a temp dir for SQLite files and anything else
/// the test keeps); dropped at the end (best effort), after the nodes declared later have
/// stopped.
pub struct FreshDb {
    pub backend: Backend,
    pub url: String,
    dir: tempfile::TempDir,
}

impl FreshDb {
    /// `None` when the backend's server is unreachable off CI (the test is skipped).
    pub fn new(backend: Backend) -> Option<Self> {
        let dir = tempfile::Builder::new()
            .prefix("artisync-it-db-")
            .tempdir()
            .expect("temp dir");
        let url = block_on(fresh_url(backend, dir.path()))?;
        Some(Self { backend, url, dir })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(drop_db(&self.url));
        }
    }
}

/// The `retriever` part of `artisync status --json`.
pub fn retriever_status(node: &Node) -> Value {
    let status = node.status_json();
    let r = status["retriever"].clone();
    assert!(
        r.is_object(),
        "status of {} has no retriever: {status}",
        node.name
    );
    r
}

/// Waits until the node's retriever lists artifact `id` under `failing`; returns that entry.
pub fn wait_failing(node: &Node, id: &str) -> Value {
    wait_for(
        RETRIEVE_TIMEOUT,
        format!(
            "node {}: artifact {id} reported under retriever.failing",
            node.name
        ),
        || {
            let r = retriever_status(node);
            let failing = r["failing"].as_array().cloned().unwrap_or_default();
            match failing.iter().find(|f| f["id"] == id) {
                Some(f) => Ok(f.clone()),
                None => Err(format!("failing: {}", r["failing"])),
            }
        },
    )
}
