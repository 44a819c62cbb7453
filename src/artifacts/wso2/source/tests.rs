//! Tests of [`Wso2Source`] against WSO2's tables, as WSO2 writes them, on every backend.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};

use super::Wso2Source;
use super::query::{rows_query, stored_id};
use crate::artifacts::db::Backend;
use crate::artifacts::retriever::{Source, SourceError};
use crate::artifacts::wso2::testing::{Wso2Tables, gateway_api_json};
use crate::artifacts::wso2::{Routes, render};
use crate::artifacts::{Bundle, Event};

const API: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
const API2: &str = "0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f";
const PIZZA: &str = "admin--PizzaShackAPI:v1.0.0";

fn labels(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

/// Events as (id, artifact, label, instruction), for comparing.
pub(in crate::artifacts::wso2) fn summary(events: &[Event]) -> Vec<(i64, &str, &str, &str)> {
    events
        .iter()
        .map(|e| {
            (
                e.id,
                e.artifact_id.as_str(),
                e.label.as_str(),
                e.instruction.as_str(),
            )
        })
        .collect()
}

/// The source against real tables written as WSO2 writes them, on every backend.
async fn source_suite(backend: Backend) {
    // Long: one scenario on one database, each step starting from the rows the one before
    // left (publish, republish, remove, bad rows, index use, read-only sessions).
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(url) = crate::artifacts::db::testing::fresh_url(backend, dir.path()).await else {
        return;
    };
    let name = backend.name();
    let wso2 = Wso2Tables::create(&url)
        .await
        .expect("create WSO2's tables");
    let before = wso2.tables().await.expect("tables");
    wso2.publish(API, "L1", &gateway_api_json(API, PIZZA, "v1"))
        .await
        .expect("publish");
    wso2.publish(API2, "L2", &gateway_api_json(API2, "other", "v1"))
        .await
        .expect("publish");

    let source = Wso2Source::new(
        &url,
        Routes::super_tenant_only("synapse-configs"),
        Duration::from_millis(1),
    );
    let start = source.last_event_id().await.expect("primes");
    let current = source.current(&labels(&["L1"])).await.expect("current");
    assert_eq!(current.len(), 1, "{name}: {current:?}");
    let meta = &current[0];
    assert_eq!(
        (meta.id.as_str(), meta.labels.clone()),
        (API, labels(&["L1"]))
    );
    assert_eq!(
        meta.name,
        format!("API-{}", &API[..8]),
        "{name}: details row"
    );
    let bundle = source.bundle(meta).await.expect("bundle");
    assert_eq!(
        bundle,
        render(&gateway_api_json(API, PIZZA, "v1")).expect("renders")
    );
    assert_eq!(
        source
            .get(API, &labels(&["L1"]))
            .await
            .expect("get")
            .as_ref(),
        Some(meta),
        "{name}"
    );
    assert_eq!(
        source.get(API, &labels(&["L2"])).await.expect("get"),
        None,
        "{name}: no row of the node's labels"
    );
    assert_eq!(
        source
            .get("00000000-0000-4000-8000-000000000000", &[])
            .await
            .expect("get"),
        None
    );
    assert!(
        source
            .events_after(start, 100)
            .await
            .expect("events")
            .is_empty()
    );

    // A new revision (in the same second as the first, on purpose), a Remove, a new row.
    wso2.publish(API, "L1", &gateway_api_json(API, PIZZA, "v2"))
        .await
        .expect("republish");
    let events = source.events_after(start, 100).await.expect("events");
    assert_eq!(
        summary(&events)
            .iter()
            .map(|e| (e.1, e.2, e.3))
            .collect::<Vec<_>>(),
        vec![(API, "L1", "publish")],
        "{name}: {events:?}"
    );
    let v2 = source
        .get(API, &labels(&["L1"]))
        .await
        .expect("get")
        .expect("exists");
    assert_ne!(v2.revision, meta.revision, "{name}");
    assert!(
        source.bundle(meta).await.is_err(),
        "{name}: the old revision is gone"
    );
    wso2.remove(API, "L1", b"{\"apiId\":\"x\"}")
        .await
        .expect("remove");
    wso2.publish(API, "L3", &gateway_api_json(API, PIZZA, "v3"))
        .await
        .expect("publish L3");
    let newer = source
        .events_after(events[0].id, 100)
        .await
        .expect("events");
    let mut got: Vec<(&str, &str)> = newer
        .iter()
        .map(|e| (e.label.as_str(), e.instruction.as_str()))
        .collect();
    got.sort();
    assert_eq!(got, vec![("L1", "remove"), ("L3", "publish")], "{name}");
    assert!(
        source
            .current(&labels(&["L1"]))
            .await
            .expect("current")
            .is_empty()
    );
    assert_eq!(
        source
            .get(API, &labels(&["L1", "L3"]))
            .await
            .expect("get")
            .map(|m| m.labels),
        Some(labels(&["L3"]))
    );
    assert!(source.last_event_id().await.expect("last") > start);

    // Bad rows: reported per artifact, never a panic; the other artifacts still deploy.
    wso2.put(API2, "L1", Some("Publish"), None)
        .await
        .expect("NULL blob");
    let listed = source
        .current(&labels(&["L1", "L2"]))
        .await
        .expect("current");
    let bundles = source.bundles(&listed).await.expect("bundles");
    assert_eq!(listed.len(), 1, "{name}");
    let e = bundles[0].as_ref().expect_err("NULL blob fails");
    assert!(
        e.to_string().contains("NULL") && e.to_string().contains(API2),
        "{e}"
    );

    // Lookups by id use WSO2's key (issue 14, item 8: `LOWER(API_ID)` used none).
    if backend == Backend::Postgres {
        // A label of some size, so the planner weighs the key's second column (ids that
        // are not UUIDs: the source skips them).
        use sqlx::Connection;
        let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect");
        for q in [
            "INSERT INTO AM_GW_PUBLISHED_API_DETAILS (API_ID) \
             SELECT 'filler-' || g FROM generate_series(1, 2000) g",
            "INSERT INTO AM_GW_API_ARTIFACTS (API_ID, GATEWAY_LABEL, GATEWAY_INSTRUCTION) \
             SELECT 'filler-' || g, 'L1', 'Publish' FROM generate_series(1, 2000) g",
            "ANALYZE",
        ] {
            sqlx::query(q)
                .execute(&mut conn)
                .await
                .expect("filler rows");
        }
    }
    let (by_label, label_binds) = rows_query(backend, &labels(&["L1"]), &[]);
    let label_only = plan_of(&url, backend, &by_label, &label_binds).await;
    let (q, binds) = rows_query(backend, &labels(&["L1"]), &[API.to_owned()]);
    let plan = plan_of(&url, backend, &q, &binds).await;
    assert!(
        id_in_key(backend, &plan, &label_only),
        "{name}: {q}\n{plan}"
    );
    let lowered = q.replace("a.API_ID IN", "LOWER(a.API_ID) IN");
    let plan = plan_of(&url, backend, &lowered, &binds).await;
    assert!(
        !id_in_key(backend, &plan, &label_only),
        "{name}: the check tells the old query apart: {plan}"
    );

    let (pool, _) = source.pool().await.expect("connected");
    let write = sqlx::query("DELETE FROM AM_GW_API_ARTIFACTS")
        .execute(&pool)
        .await;
    assert!(
        write.is_err(),
        "{name}: the source's sessions are read-only"
    );
    assert_eq!(
        wso2.tables().await.expect("tables"),
        before,
        "{name}: nothing created"
    );
    wso2.close().await;
    crate::artifacts::db::testing::drop_db(&url).await;
}

#[test]
fn api_ids_are_taken_as_wso2_writes_them() {
    assert_eq!(stored_id(API).as_deref(), Some(API));
    assert_eq!(stored_id(&API.to_uppercase()).as_deref(), Some(API));
    for bad in [
        "6F1C2A9E-3b1d-4c2e-9a8f-0d1e2f3a4b5c",
        " 6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c",
        "6f1c2a9e3b1d4c2e9a8f0d1e2f3a4b5c",
        "../../etc/passwd",
        "",
    ] {
        assert_eq!(stored_id(bad), None, "{bad:?}");
    }
    let (q, binds) = rows_query(Backend::Postgres, &[], &[API.to_owned()]);
    assert!(q.ends_with("WHERE a.API_ID IN ($1, $2)"), "{q}");
    assert_eq!(binds, vec![API.to_uppercase(), API.to_owned()]);
    assert!(!q.contains("LOWER"), "{q}");
}

/// The plan `backend` makes for `q` over `AM_GW_API_ARTIFACTS` (alias `a`), one line per
/// step. PostgreSQL plans with sequential scans discouraged, as it would on a table of
/// real size (a test table is small enough that a scan is cheapest).
async fn plan_of(url: &str, backend: Backend, q: &str, binds: &[String]) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::AnyConnection::connect(url).await.expect("connect");
    let explain = match backend {
        Backend::Sqlite => format!("EXPLAIN QUERY PLAN {q}"),
        Backend::Postgres => {
            sqlx::query("SET enable_seqscan = off")
                .execute(&mut conn)
                .await
                .expect("set");
            format!("EXPLAIN {q}")
        }
        Backend::MySql => format!("EXPLAIN {q}"),
    };
    let mut query = sqlx::query(AssertSqlSafe(explain));
    for b in binds {
        query = query.bind(b.as_str());
    }
    let rows = query.fetch_all(&mut conn).await.expect("explain");
    let text = |r: &AnyRow, column: &str| -> String {
        r.try_get::<Option<String>, _>(column)
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    rows.iter()
        .map(|r| match backend {
            Backend::Sqlite => text(r, "detail"),
            Backend::Postgres => text(r, "QUERY PLAN"),
            Backend::MySql => format!(
                "table={} type={} key={} key_len={}",
                text(r, "table"),
                text(r, "type"),
                text(r, "key"),
                text(r, "key_len")
            ),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `plan` finds rows of `AM_GW_API_ARTIFACTS` by `API_ID` in an index (not only by
/// `GATEWAY_LABEL`, as `label_only`, the plan of a lookup by label, does).
fn id_in_key(backend: Backend, plan: &str, label_only: &str) -> bool {
    match backend {
        Backend::Sqlite => plan
            .lines()
            .any(|l| l.starts_with("SEARCH a USING") && l.contains("API_ID=")),
        Backend::Postgres => plan.lines().any(|l| {
            l.contains("Index Cond:") && l.contains("gateway_label") && l.contains("(api_id)")
        }),
        Backend::MySql => {
            let key_len = |plan: &str| -> u64 {
                plan.lines()
                    .find(|l| l.starts_with("table=a "))
                    .and_then(|l| l.split("key_len=").nth(1))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            key_len(plan) > key_len(label_only)
        }
    }
}

#[tokio::test]
async fn source_suite_sqlite() {
    source_suite(Backend::Sqlite).await;
}

#[tokio::test]
async fn source_suite_postgres() {
    source_suite(Backend::Postgres).await;
}

#[tokio::test]
async fn source_suite_mysql() {
    source_suite(Backend::MySql).await;
}

/// Issue 14, item 8, on MariaDB: a large API written into a `BLOB` `ARTIFACT` arrives cut
/// at 65,535 bytes; it fails with the column fix in its reason, the other APIs deploy.
#[tokio::test]
async fn an_artifact_cut_by_a_mysql_blob_column_names_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(url) = crate::artifacts::db::testing::fresh_url(Backend::MySql, dir.path()).await
    else {
        return;
    };
    let wso2 = Wso2Tables::create_mysql_upgraded_from_3_0(&url)
        .await
        .expect("create WSO2's tables with a BLOB column");
    let big = gateway_api_json(API, PIZZA, &"x".repeat(70_000));
    assert!(big.len() > 65_535);
    wso2.publish(API, "L1", &big).await.expect("publish, cut");
    wso2.publish(API2, "L1", &gateway_api_json(API2, "small", "v1"))
        .await
        .expect("publish");
    let source = Wso2Source::new(
        &url,
        Routes::super_tenant_only("synapse-configs"),
        Duration::from_millis(1),
    );
    let mut listed = source.current(&labels(&["L1"])).await.expect("current");
    listed.sort_by(|a, b| a.id.cmp(&b.id));
    let bundles = source.bundles(&listed).await.expect("bundles");
    let by_id: BTreeMap<&str, &Result<Bundle, SourceError>> = listed
        .iter()
        .map(|m| m.id.as_str())
        .zip(bundles.iter())
        .collect();
    let e = by_id[API].as_ref().expect_err("cut").to_string();
    assert!(
        e.contains(API)
            && e.contains("65535 bytes")
            && e.contains("ALTER TABLE AM_GW_API_ARTIFACTS MODIFY ARTIFACT LONGBLOB"),
        "{e}"
    );
    assert!(by_id[API2].is_ok(), "{:?}", by_id[API2]);
    wso2.close().await;
    crate::artifacts::db::testing::drop_db(&url).await;
}

#[tokio::test]
async fn the_source_never_creates_or_writes_a_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wso2.db");
    let url = format!("sqlite://{}", path.display());
    let source = Wso2Source::new(
        &url,
        Routes::super_tenant_only("synapse-configs"),
        Duration::from_millis(1),
    );
    let e = source
        .current(&labels(&["L1"]))
        .await
        .expect_err("no database");
    assert!(matches!(e, SourceError::Unavailable(_)), "{e}");
    assert!(!path.exists(), "the SQLite file was created");
    // A database without WSO2's tables is unavailable, and gets none of artisync's.
    let empty = dir.path().join("empty.db");
    std::fs::File::create(&empty).expect("an empty SQLite file");
    let source = Wso2Source::new(
        &format!("sqlite://{}", empty.display()),
        Routes::super_tenant_only("synapse-configs"),
        Duration::from_millis(1),
    );
    let e = source.last_event_id().await.expect_err("no tables");
    assert!(e.to_string().contains("AM_GW_API_ARTIFACTS"), "{e}");
    assert_eq!(
        std::fs::metadata(&empty).expect("stat").len(),
        0,
        "written to"
    );
}
