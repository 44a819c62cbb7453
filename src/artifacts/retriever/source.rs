//! Where artifacts come from, as the retriever sees it: the [`Source`] trait, its errors, and
//! [`DbSource`] (this node reads the database itself).

use std::sync::Arc;
use std::time::Duration;

use crate::artifacts::db::{ArtifactDb, DbError};
use crate::artifacts::{ArtifactMeta, Bundle, Event};

#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// The database (or hub) cannot be reached: retry everything later.
    #[error("artifact source unavailable: {0}")]
    Unavailable(#[from] Unavailable),
    /// One artifact cannot be used (corrupt bundle, bad path, ...): skip it, report it.
    #[error("artifact {id}: {problem}")]
    Artifact { id: String, problem: String },
}

/// Why a source cannot be reached (or trusted) right now. Sources are behind `Arc` so the
/// error stays `Clone`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Db(Arc<DbError>),
    #[error("WSO2 database ({backend}): {source}")]
    Wso2 {
        backend: &'static str,
        source: Arc<sqlx::Error>,
    },
    /// The hub's status text: all a gRPC status carries.
    #[error("hub: {0}")]
    Hub(String),
    #[error(
        "the artifact event log went back from id {from} to {to} (database replaced or restored?); keeping deployed artifacts; restart the agent to accept this database"
    )]
    EventLogBackwards { from: i64, to: i64 },
}

impl From<DbError> for SourceError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Artifact { id, problem } => SourceError::Artifact { id, problem },
            DbError::NotFound(id) => SourceError::Artifact {
                id,
                problem: "does not exist".into(),
            },
            other => Unavailable::Db(Arc::new(other)).into(),
        }
    }
}

/// Where artifacts come from.
#[tonic::async_trait]
pub trait Source: Send + Sync {
    fn describe(&self) -> String;
    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError>;
    /// One artifact as a node with `labels` sees it (empty: every label). Its `labels` may
    /// still list others; the caller filters. With WSO2's tables the content (so revision and
    /// digest) depends on the labels, since WSO2 renders an API per gateway environment.
    async fn get(&self, id: &str, labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError>;
    /// The files of `meta`'s revision, for `meta.labels`.
    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError>;
    /// Several bundles at once (one result each, in order); an outage fails the whole call.
    async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, SourceError>>, SourceError> {
        let mut out = Vec::with_capacity(metas.len());
        for m in metas {
            match self.bundle(m).await {
                Err(SourceError::Unavailable(e)) => return Err(SourceError::Unavailable(e)),
                other => out.push(other),
            }
        }
        Ok(out)
    }
    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError>;
    async fn last_event_id(&self) -> Result<i64, SourceError>;
    /// Returns when new events may be there (a notification, or `max` elapsed).
    async fn wait(&self, max: Duration);
    /// Queries (or hub calls) issued so far, for status and benchmarks.
    fn queries(&self) -> u64 {
        0
    }
}

/// The database as a source. Connects lazily, so a database that is down at start-up is
/// retried like any other failure.
pub struct DbSource {
    url: String,
    queries: std::sync::atomic::AtomicU64,
    db: tokio::sync::Mutex<Option<ArtifactDb>>,
    listener: tokio::sync::Mutex<Option<sqlx::postgres::PgListener>>,
    poll: Duration,
}

impl DbSource {
    pub fn new(url: &str, poll: Duration) -> Self {
        Self {
            url: url.to_owned(),
            queries: std::sync::atomic::AtomicU64::new(0),
            db: tokio::sync::Mutex::new(None),
            listener: tokio::sync::Mutex::new(None),
            poll,
        }
    }

    /// A shared handle on the connected database (the hub serves from the same pool).
    /// Every call stands for one query issued with it.
    pub async fn db(&self) -> Result<ArtifactDb, SourceError> {
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut guard = self.db.lock().await;
        if let Some(db) = guard.as_ref() {
            return Ok(db.clone());
        }
        let db = ArtifactDb::connect_with(&self.url, Duration::from_secs(3)).await?;
        *guard = Some(db.clone());
        Ok(db)
    }
}

#[tonic::async_trait]
impl Source for DbSource {
    fn describe(&self) -> String {
        crate::artifacts::db::redact(&self.url)
    }

    fn queries(&self) -> u64 {
        self.queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn current(&self, labels: &[String]) -> Result<Vec<ArtifactMeta>, SourceError> {
        Ok(self.db().await?.current_for_labels(labels).await?)
    }

    async fn get(&self, id: &str, _labels: &[String]) -> Result<Option<ArtifactMeta>, SourceError> {
        // A revision is the same for every label here: the caller filters the labels.
        Ok(self.db().await?.get(id).await?)
    }

    async fn bundle(&self, meta: &ArtifactMeta) -> Result<Bundle, SourceError> {
        Ok(self.db().await?.bundle(meta).await?)
    }

    async fn bundles(
        &self,
        metas: &[ArtifactMeta],
    ) -> Result<Vec<Result<Bundle, SourceError>>, SourceError> {
        let results = self.db().await?.bundles(metas).await?;
        Ok(results
            .into_iter()
            .map(|r| r.map_err(SourceError::from))
            .collect())
    }

    async fn events_after(&self, after: i64, limit: i64) -> Result<Vec<Event>, SourceError> {
        Ok(self.db().await?.events_after(after, limit).await?)
    }

    async fn last_event_id(&self) -> Result<i64, SourceError> {
        Ok(self.db().await?.last_event_id().await?)
    }

    async fn wait(&self, max: Duration) {
        let is_pg = self.url.starts_with("postgres");
        if !is_pg {
            tokio::time::sleep(self.poll.min(max)).await;
            return;
        }
        // PostgreSQL: LISTEN wakes us at once; the poll interval stays as the safety net.
        let mut guard = self.listener.lock().await;
        if guard.is_none() {
            // Bounded: a server that is down must not hold up polling (the safety net).
            let connect = tokio::time::timeout(
                Duration::from_secs(3),
                sqlx::postgres::PgListener::connect(&self.url),
            );
            if let Ok(Ok(mut l)) = connect.await {
                if l.listen("artisync_artifacts").await.is_ok() {
                    *guard = Some(l);
                }
            }
        }
        match guard.as_mut() {
            Some(l) => match tokio::time::timeout(self.poll.min(max), l.recv()).await {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => *guard = None,
            },
            None => tokio::time::sleep(self.poll.min(max)).await,
        }
    }
}
