//! WSO2 API-M 3.2 compatibility end to end (`[retriever] schema = "wso2-apim-3.2"`): the test
//! plays WSO2 API-M. It creates WSO2's `AM_GW_PUBLISHED_API_DETAILS` / `AM_GW_API_ARTIFACTS`
//! with plain SQL and writes rows as WSO2's `DBSaver` does (insert, then `ARTIFACT` and
//! `GATEWAY_INSTRUCTION` updated in place). Real agents read them: one from the database, one
//! through it as a hub subscriber without database credentials.
//!
//! One scenario per backend (`wso2_schema::sqlite`, `::postgres`, `::mysql`); PostgreSQL and
//! MariaDB skip with a printed reason when unreachable, except under `CI=true`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use artisync::artifacts::db::Backend;
use artisync::artifacts::db::testing::{drop_db, fresh_url};
use artisync::artifacts::wso2::testing::{
    Wso2Tables, api_xml, ga_config_xml, gateway_api_json, gson, rendered_files, tenant_api_json,
};
use serde_json::Value;

use crate::common::db::{RETRIEVE_TIMEOUT, per_backend, retriever_status, tree_is, wait_failing};
use crate::common::*;

const PIZZA: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
const WEATHER: &str = "0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f";
const STORE: &str = "d4b2f3a5-6c7e-4f8a-9b0c-1d2e3f4a5b6c";
const BROKEN: &str = "c3a1e2f4-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
const PIZZA_API: &str = "admin--PizzaShackAPI:v1.0.0";
const WEATHER_API: &str = "admin--WeatherAPI:v2.0.0";
const STORE_API: &str = "admin--StoreAPI:v1.0.0";
/// WSO2's default gateway label (with spaces: labels match exactly).
const LABEL: &str = "Production and Sandbox";
const OTHER_LABEL: &str = "Internal";
/// In a broken row: must never reach a log.
const SECRET: &str = "s3cret-in-a-broken-row";

per_backend!(wso2_shared_files, wso2_tenants, wso2_schema);

/// A fresh database with WSO2's tables, and the runtime its pool lives on; dropped (best
/// effort) at the end, after the nodes declared later have stopped.
struct Wso2Db {
    rt: tokio::runtime::Runtime,
    tables: Option<Wso2Tables>,
    url: String,
    _dir: tempfile::TempDir,
}

impl Wso2Db {
    /// `None` when the backend's server is unreachable off CI (the test is skipped).
    fn new(backend: Backend) -> Option<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::Builder::new()
            .prefix("artisync-it-wso2-")
            .tempdir()
            .expect("temp dir");
        let url = rt.block_on(fresh_url(backend, dir.path()))?;
        let tables = rt
            .block_on(Wso2Tables::create(&url))
            .unwrap_or_else(|e| panic!("create WSO2's tables on {}: {e}", backend.name()));
        Some(Self {
            rt,
            tables: Some(tables),
            url,
            _dir: dir,
        })
    }

    fn tables(&self) -> &Wso2Tables {
        self.tables.as_ref().expect("open until drop")
    }

    fn put(&self, api: &str, label: &str, instruction: &str, artifact: &[u8]) {
        self.rt
            .block_on(
                self.tables()
                    .put(api, label, Some(instruction), Some(artifact)),
            )
            .unwrap_or_else(|e| panic!("write the {instruction} row of {api} / {label}: {e}"));
    }

    fn publish(&self, api: &str, name: &str, label: &str, tag: &str) {
        self.put(api, label, "Publish", &gateway_api_json(api, name, tag));
    }

    /// A tenant's API: `tenantDomain` in its DTO and `TENANT_DOMAIN` in its details row.
    fn publish_tenant(&self, api: &str, name: &str, label: &str, tag: &str, tenant: &str) {
        self.put(
            api,
            label,
            "Publish",
            &tenant_api_json(api, name, tag, tenant),
        );
        self.rt
            .block_on(self.tables().set_tenant(api, tenant))
            .unwrap_or_else(|e| panic!("set the tenant of {api}: {e}"));
    }

    fn table_names(&self) -> Vec<String> {
        self.rt
            .block_on(self.tables().tables())
            .expect("list tables")
    }
}

impl Drop for Wso2Db {
    fn drop(&mut self) {
        if let Some(t) = self.tables.take() {
            self.rt.block_on(t.close());
        }
        self.rt.block_on(drop_db(&self.url));
    }
}

/// The files an API renders to, as (path below `synapse-configs`, bytes).
fn files(api: &str, name: &str, tag: &str) -> BTreeMap<String, Vec<u8>> {
    rendered_files(api, name, tag)
        .into_iter()
        .map(|(p, c)| (p, c.into_bytes()))
        .collect()
}

fn union(sets: &[BTreeMap<String, Vec<u8>>]) -> BTreeMap<String, Vec<u8>> {
    sets.iter().flat_map(|s| s.clone()).collect()
}

fn wait_tree(node: &Node, what: &str, want: &BTreeMap<String, Vec<u8>>) {
    wait_root(node, &node.synapse(), what, want);
}

fn wait_root(node: &Node, root: &std::path::Path, what: &str, want: &BTreeMap<String, Vec<u8>>) {
    wait_for(
        RETRIEVE_TIMEOUT,
        format!("node {}: {what}", node.name),
        || tree_is(root, want),
    );
}

fn deployed_ids(r: &Value) -> Vec<String> {
    let mut ids: Vec<String> = r["deployed"]
        .as_array()
        .unwrap_or_else(|| panic!("no deployed list in {r}"))
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    ids
}

fn retriever(extra: &str) -> String {
    format!(
        "\n[retriever]\ngateway_labels = [\"{LABEL}\"]\npoll_interval = 50\n\
         deployment_retry_duration = 200\nmax_retry_count = 20\n{extra}"
    )
}

/// A node without peers, with `retriever` appended to its config (not started).
fn lone_node(name: &str, retriever: &str) -> Node {
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    let node = Node::new(name, port, &[]);
    node.append_config(retriever);
    node
}

fn wso2_schema(backend: Backend) {
    let Some(db) = Wso2Db::new(backend) else {
        return;
    };
    let wso2_tables = db.table_names();
    db.publish(PIZZA, PIZZA_API, LABEL, "v1");
    db.publish(WEATHER, WEATHER_API, OTHER_LABEL, "v1");

    // Sync start-up: SERVING means the start-up deploy is done, so the files are there now.
    let mut gw = lone_node(
        "gw",
        &retriever(&format!(
            "artifact_retriever = \"db\"\nschema = \"wso2-apim-3.2\"\n\
             database_url = \"{}\"\ndata_retrieval_mode = \"sync\"\n",
            db.url
        )),
    );
    gw.start();
    tree_is(&gw.synapse(), &files(PIZZA, PIZZA_API, "v1"))
        .unwrap_or_else(|e| panic!("start-up deploy of the label's API only: {e}"));
    let r = retriever_status(&gw);
    assert_eq!(deployed_ids(&r), vec![PIZZA.to_owned()], "{r}");
    assert_eq!(
        r["deployed"][0]["labels"],
        serde_json::json!([LABEL]),
        "{r}"
    );
    assert_eq!(r["failing"], serde_json::json!([]), "{r}");
    // Endpoint credentials are not installed: the operator is told which, never the secret.
    let warnings = r["deployed"][0]["warnings"].to_string();
    assert!(
        warnings.contains("secure vault") && warnings.contains("PizzaShackAPI--v1.0.0"),
        "{r}"
    );
    assert!(!r.to_string().contains("s3cret"), "{r}");
    let text = gw.cli(&["artifact", "deployed"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("WARNING") && text.contains("secure vault"),
        "{text}"
    );
    assert!(
        r["source"]
            .as_str()
            .is_some_and(|s| s.contains("wso2-apim-3.2")),
        "{r}"
    );

    // A hub subscriber gets the rendered files without database credentials; the hub refuses
    // to write WSO2's tables.
    let mut sub = lone_node(
        "sub",
        &retriever(&format!(
            "artifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:{}\"\n",
            gw.port
        )),
    );
    sub.start();
    wait_tree(
        &sub,
        "PizzaShackAPI through the hub",
        &files(PIZZA, PIZZA_API, "v1"),
    );
    let bundle = tempfile::tempdir().expect("temp dir");
    write(
        &bundle.path().join("default/api/x.xml"),
        "<api name=\"x\"/>",
    );
    let out = Command::new(BIN)
        .args(["artifact", "publish", "--hub"])
        .arg(format!("http://127.0.0.1:{}", gw.port))
        .args([
            "--id",
            STORE,
            "--name",
            "X",
            "--version",
            "1",
            "--label",
            LABEL,
            "--from",
        ])
        .arg(bundle.path())
        .stdin(Stdio::null())
        .output()
        .expect("run artisync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("WSO2"),
        "publishing through a WSO2 hub must be refused: {stderr}"
    );

    // While running: a row of another label (ignored), then a new Publish of the label.
    db.publish(WEATHER, WEATHER_API, LABEL, "v1");
    db.put(
        WEATHER,
        LABEL,
        "Remove",
        b"{\"apiId\":\"0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f\"}",
    );
    db.publish(STORE, STORE_API, OTHER_LABEL, "other-label");
    db.publish(STORE, STORE_API, LABEL, "v1");
    let pizza_and_store = union(&[files(PIZZA, PIZZA_API, "v1"), files(STORE, STORE_API, "v1")]);
    for node in [&gw, &sub] {
        wait_tree(
            node,
            "the new Publish of the label (nothing of other labels or removed rows)",
            &pizza_and_store,
        );
    }

    // A new revision of an API (WSO2 updates ARTIFACT in place), then a Remove.
    db.publish(PIZZA, PIZZA_API, LABEL, "v2");
    let want = union(&[files(PIZZA, PIZZA_API, "v2"), files(STORE, STORE_API, "v1")]);
    for node in [&gw, &sub] {
        wait_tree(node, "PizzaShackAPI's new revision", &want);
    }
    db.put(
        PIZZA,
        LABEL,
        "Remove",
        b"{\"apiId\":\"6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c\",\"sequencesToBeRemove\":[]}",
    );
    for node in [&gw, &sub] {
        wait_tree(
            node,
            "PizzaShackAPI removed",
            &files(STORE, STORE_API, "v1"),
        );
    }

    // A broken row fails that API alone, reported with its API_ID; the rest stays.
    let broken = format!("{{\"apiDefinition\": \"<api name=\\\"{SECRET}\\\"/>\", ");
    db.put(BROKEN, LABEL, "Publish", broken.as_bytes());
    let failing = wait_failing(&gw, BROKEN);
    let reason = failing["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not GatewayAPIDTO JSON"), "{failing}");
    tree_is(&gw.synapse(), &files(STORE, STORE_API, "v1"))
        .unwrap_or_else(|e| panic!("a broken row changes nothing: {e}"));
    assert_eq!(deployed_ids(&retriever_status(&gw)), vec![STORE.to_owned()]);
    let log = std::fs::read_to_string(gw.log_path()).expect("read log");
    assert!(log.contains(BROKEN), "the log names the failing API_ID");
    assert!(!log.contains(SECRET), "a log quotes an artifact's content");

    assert_eq!(
        db.table_names(),
        wso2_tables,
        "artisync created or dropped tables in WSO2's database"
    );
}

/// A tenant's API of WSO2 3.2 (same API name as the super tenant's, so every shared path
/// coincides).
const TENANT_PIZZA: &str = "7e8f9a0b-1c2d-4e3f-8a5b-6c7d8e9f0a1b";
/// An API of a tenant the node does not map.
const UNMAPPED: &str = "8f9a0b1c-2d3e-4f5a-9b6c-7d8e9f0a1b2c";
const TENANT: &str = "wso2.com";
const TENANT_FOLDER: &str = "tenant-1-synapse";

/// Issue 14, item 2: APIs are routed by tenant. The super tenant's API lands in
/// `retriever.folder`, a mapped tenant's in its own `[[folder]]` (the same relative paths,
/// other files), an unmapped tenant's fails naming the tenant; removing the tenant's API
/// empties the tenant's folder only.
fn wso2_tenants(backend: Backend) {
    let Some(db) = Wso2Db::new(backend) else {
        return;
    };
    db.publish(PIZZA, PIZZA_API, LABEL, "v1");
    db.publish_tenant(TENANT_PIZZA, PIZZA_API, LABEL, "tenant", TENANT);
    db.publish_tenant(UNMAPPED, STORE_API, LABEL, "v1", "acme.org");
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    let mut gw = Node::new("gw", port, &[]);
    let tenant_root = gw.dir().join("tenants/1/synapse-configs");
    std::fs::create_dir_all(&tenant_root).expect("create the tenant's folder");
    gw.append_config(&format!(
        "\n[[folder]]\nid = \"{TENANT_FOLDER}\"\npath = \"{}\"\n{}\n[retriever.tenants]\n\"{TENANT}\" = \"{TENANT_FOLDER}\"\n",
        tenant_root.display(),
        retriever(&format!(
            "artifact_retriever = \"db\"\nschema = \"wso2-apim-3.2\"\n\
             database_url = \"{}\"\ndata_retrieval_mode = \"sync\"\n",
            db.url
        ))
    ));
    gw.start();
    let tenant_files = files(TENANT_PIZZA, PIZZA_API, "tenant");
    // Sync start-up: SERVING means both are deployed, each in its own folder.
    tree_is(&gw.synapse(), &files(PIZZA, PIZZA_API, "v1"))
        .unwrap_or_else(|e| panic!("the super tenant's folder holds its API only: {e}"));
    tree_is(&tenant_root, &tenant_files)
        .unwrap_or_else(|e| panic!("the tenant's folder holds the tenant's API: {e}"));
    let r = retriever_status(&gw);
    assert_eq!(
        r["conflicts"],
        serde_json::json!([]),
        "two folders, no conflict: {r}"
    );
    let folders: BTreeMap<String, String> = r["deployed"]
        .as_array()
        .unwrap_or_else(|| panic!("no deployed list in {r}"))
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap_or_default().to_owned(),
                d["folder"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        folders,
        BTreeMap::from([
            (PIZZA.to_owned(), SYNAPSE.to_owned()),
            (TENANT_PIZZA.to_owned(), TENANT_FOLDER.to_owned()),
        ]),
        "{r}"
    );
    let failing = wait_failing(&gw, UNMAPPED);
    let reason = failing["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("\"acme.org\"") && reason.contains("[retriever.tenants]"),
        "{failing}"
    );
    let out = gw.cli(&["artifact", "deployed"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("folder {TENANT_FOLDER}"))
            && text.contains(&format!("tenant \"{TENANT}\" -> folder {TENANT_FOLDER}"))
            && text.contains("acme.org"),
        "{text}"
    );

    // The tenant removes its API: its folder empties (ga-config-key included: the super
    // tenant's claim is on the other folder's file); the super tenant's folder is untouched.
    db.put(
        TENANT_PIZZA,
        LABEL,
        "Remove",
        b"{\"apiId\":\"7e8f9a0b-1c2d-4e3f-8a5b-6c7d8e9f0a1b\",\"tenantDomain\":\"wso2.com\"}",
    );
    wait_root(
        &gw,
        &tenant_root,
        "the tenant's API removed",
        &BTreeMap::new(),
    );
    holds_for(
        std::time::Duration::from_millis(300),
        "the super tenant's API stays",
        || tree_is(&gw.synapse(), &files(PIZZA, PIZZA_API, "v1")),
    );
    assert_eq!(deployed_ids(&retriever_status(&gw)), vec![PIZZA.to_owned()]);
}

/// A DTO whose only entry is a sequence named `sequence` holding `tag`.
fn sequence_only_json(api: &str, sequence: &str, tag: &str) -> Vec<u8> {
    gson(&serde_json::json!({
        "name": "Seq", "version": "1.0.0", "provider": "admin", "apiId": api,
        "tenantDomain": "carbon.super", "override": true,
        "sequenceToBeAdd": [{
            "name": sequence,
            "content": format!("<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{sequence}\"><log><property name=\"tag\" value=\"{tag}\"/></log></sequence>"),
        }],
    }))
}

/// Issue 14, item 1: the WSO2 names `a:b` and `a_b` map to one file, `a_b.xml`. Across two
/// APIs that is a reported conflict the ownership rule resolves (the lower API_ID wins,
/// whatever the order they deployed in), never a silent overwrite; when the winner goes, the
/// file holds the other API's content.
#[test]
fn wso2_names_mapping_to_one_file_across_apis_are_a_resolved_conflict() {
    let Some(db) = Wso2Db::new(Backend::Sqlite) else {
        return;
    };
    // STORE (d4b2...) deploys first, then WEATHER (0b6f..., the lower id) claims the file.
    db.put(
        STORE,
        LABEL,
        "Publish",
        &sequence_only_json(STORE, "a_b", "store"),
    );
    let mut gw = lone_node(
        "gw",
        &retriever(&format!(
            "artifact_retriever = \"db\"\nschema = \"wso2-apim-3.2\"\n\
             database_url = \"{}\"\ndata_retrieval_mode = \"sync\"\n",
            db.url
        )),
    );
    gw.start();
    let seq = |name: &str, tag: &str| {
        BTreeMap::from([(
            "default/sequences/a_b.xml".to_owned(),
            format!("<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\"><log><property name=\"tag\" value=\"{tag}\"/></log></sequence>").into_bytes(),
        )])
    };
    tree_is(&gw.synapse(), &seq("a_b", "store")).unwrap_or_else(|e| panic!("{e}"));
    db.put(
        WEATHER,
        LABEL,
        "Publish",
        &sequence_only_json(WEATHER, "a:b", "weather"),
    );
    wait_tree(
        &gw,
        "the lower API_ID's a:b wins a_b.xml",
        &seq("a:b", "weather"),
    );
    wait_for(RETRIEVE_TIMEOUT, "the conflict is reported", || {
        let r = retriever_status(&gw);
        let listed = r["conflicts"].as_array().is_some_and(|l| {
            l.iter().any(|c| {
                c["path"] == "default/sequences/a_b.xml"
                    && c["folder"] == SYNAPSE
                    && c["winner"] == WEATHER
                    && c["losers"] == serde_json::json!([STORE])
            })
        });
        if listed {
            Ok(())
        } else {
            Err(format!("conflicts {}", r["conflicts"]))
        }
    });
    assert_eq!(
        deployed_ids(&retriever_status(&gw)),
        vec![WEATHER.to_owned(), STORE.to_owned()],
        "both stay deployed"
    );
    // The winner goes: the file now holds the other API's content, the conflict is gone.
    db.put(WEATHER, LABEL, "Remove", b"{}");
    wait_tree(&gw, "the remaining API's a_b", &seq("a_b", "store"));
    wait_for(RETRIEVE_TIMEOUT, "no conflict left", || {
        let r = retriever_status(&gw);
        if r["conflicts"] == serde_json::json!([]) {
            Ok(())
        } else {
            Err(format!("conflicts {}", r["conflicts"]))
        }
    });
}

#[test]
fn wso2_tenant_config_mistakes_are_named_by_check_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    for d in ["sc", "t1"] {
        std::fs::create_dir(dir.path().join(d)).expect("mkdir");
    }
    let base = format!(
        "node = \"gw1\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"{}\"\n\n\
         [[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n\n\
         [[folder]]\nid = \"{TENANT_FOLDER}\"\npath = \"{}\"\n\n\
         [retriever]\nschema = \"wso2-apim-3.2\"\ndatabase_url = \"sqlite://{}\"\n\n\
         [retriever.tenants]\n",
        dir.path().join("state").display(),
        dir.path().join("sc").display(),
        dir.path().join("t1").display(),
        dir.path().join("wso2.db").display(),
    );
    let check = |tenants: &str| {
        let path = dir.path().join("artisync.toml");
        std::fs::write(&path, format!("{base}{tenants}\n")).expect("write config");
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run artisync");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = check(&format!("\"{TENANT}\" = \"{TENANT_FOLDER}\""));
    assert!(ok, "{stderr}");
    for (tenants, needles) in [
        (
            format!("\"{TENANT}\" = \"tenant-9\""),
            ["retriever.tenants.\"wso2.com\"", "\"tenant-9\""],
        ),
        (
            "\"carbon.super\" = \"tenant-1-synapse\"".to_owned(),
            ["retriever.tenants.\"carbon.super\"", "retriever.folder"],
        ),
    ] {
        let (ok, stderr) = check(&tenants);
        assert!(!ok, "{tenants}: accepted");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{tenants}: {needle:?} not in {stderr}"
            );
        }
    }
}

#[test]
fn wso2_schema_config_mistakes_are_named_and_the_cli_does_not_write_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sc")).expect("mkdir");
    let db = dir.path().join("wso2.db");
    let base = format!(
        "node = \"gw1\"\nlisten = \"127.0.0.1:1\"\nstate_dir = \"{}\"\n\n\
         [[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n\n[retriever]\n",
        dir.path().join("state").display(),
        dir.path().join("sc").display()
    );
    let run = |args: &[&str], text: &str| {
        let path = dir.path().join("artisync.toml");
        std::fs::write(&path, text).expect("write config");
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .output()
            .expect("run artisync");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let wso2 = format!(
        "{base}schema = \"wso2-apim-3.2\"\ndatabase_url = \"sqlite://{}\"\n",
        db.display()
    );
    let (ok, stderr) = run(&["check-config"], &wso2);
    assert!(ok, "a valid WSO2 config: {stderr}");
    for (text, needle) in [
        (
            wso2.replace("wso2-apim-3.2", "wso2-apim-4.2"),
            "retriever.schema",
        ),
        (
            format!(
                "{base}schema = \"wso2-apim-3.2\"\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:7702\"\n"
            ),
            "retriever.schema",
        ),
    ] {
        let (ok, stderr) = run(&["check-config"], &text);
        assert!(!ok && stderr.contains(needle), "{text}\n{stderr}");
    }
    let (ok, stderr) = run(&["artifact", "list"], &wso2);
    assert!(
        !ok && stderr.contains("never"),
        "the CLI must not open WSO2's database as an artisync store: {stderr}"
    );
    assert!(!db.exists(), "a database file was created");
}

/// An API Product (id sorts before PizzaShackAPI's) as WSO2 3.2 writes it: `override: false`,
/// its own API definition, PizzaShackAPI's production endpoint under the same name with other
/// content, and the shared `ga-config-key`.
const PRODUCT: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const PRODUCT_API: &str = "admin--PizzaProduct:v1.0.0";

fn product_json() -> Vec<u8> {
    gson(&serde_json::json!({
        "name": "PizzaProduct",
        "version": "1.0.0",
        "provider": "admin",
        "apiId": PRODUCT,
        "tenantDomain": "carbon.super",
        "override": false,
        "apiDefinition": api_xml(PRODUCT_API, "product"),
        "endpointEntriesToBeAdd": [{
            "name": format!("{PIZZA_API}_APIproductionEndpoint"),
            "content": format!("<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{PIZZA_API}_APIproductionEndpoint\"><http uri-template=\"https://product.example\"/></endpoint>"),
        }],
        "localEntriesToBeAdd": [{"name": "ga-config-key", "content": ga_config_xml()}],
    }))
}

/// Shared files on a two-node mesh: undeploying one of two APIs that share `ga-config-key`
/// leaves it on both nodes; an API Product with `override: false` never replaces the
/// endpoint its API deployed (a reported conflict), and gets the path once the API goes.
fn wso2_shared_files(backend: Backend) {
    let Some(db) = Wso2Db::new(backend) else {
        return;
    };
    db.publish(PIZZA, PIZZA_API, LABEL, "v1");
    db.publish(STORE, STORE_API, LABEL, "v1");
    let mut cluster = Cluster::new(&[&[1], &[0]]);
    for node in &cluster.nodes {
        node.append_config(&retriever(&format!(
            "artifact_retriever = \"db\"\nschema = \"wso2-apim-3.2\"\n\
             database_url = \"{}\"\nreconcile_interval = 1\n",
            db.url
        )));
    }
    cluster.start_all();
    let both = union(&[files(PIZZA, PIZZA_API, "v1"), files(STORE, STORE_API, "v1")]);
    for node in &cluster.nodes {
        wait_tree(node, "two APIs sharing ga-config-key", &both);
    }

    // The product: its API file lands; PizzaShackAPI's endpoint stays (override=false).
    db.put(PRODUCT, LABEL, "Publish", &product_json());
    let product_api = format!("default/api/{}", PRODUCT_API.replace(':', "_") + ".xml");
    let endpoint = format!(
        "default/endpoints/{}_APIproductionEndpoint.xml",
        PIZZA_API.replace(':', "_")
    );
    let mut with_product = both.clone();
    with_product.insert(
        product_api.clone(),
        api_xml(PRODUCT_API, "product").into_bytes(),
    );
    for node in &cluster.nodes {
        wait_tree(node, "the product beside its API", &with_product);
        wait_for(
            RETRIEVE_TIMEOUT,
            "the endpoint conflict is reported",
            || {
                let r = retriever_status(node);
                let c = &r["conflicts"];
                let listed = c.as_array().is_some_and(|l| {
                    l.iter().any(|c| {
                        c["path"] == serde_json::json!(endpoint)
                            && c["winner"] == serde_json::json!(PIZZA)
                            && c["losers"] == serde_json::json!([PRODUCT])
                    })
                });
                if listed {
                    Ok(())
                } else {
                    Err(format!("conflicts {c}"))
                }
            },
        );
    }

    // PizzaShackAPI removed: ga-config-key stays for StoreAPI and the product, on both nodes;
    // the endpoint now holds what the product wants.
    db.put(
        PIZZA,
        LABEL,
        "Remove",
        b"{\"apiId\":\"6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c\"}",
    );
    let mut after = files(STORE, STORE_API, "v1");
    after.insert(product_api, api_xml(PRODUCT_API, "product").into_bytes());
    after.insert(
        endpoint,
        format!("<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{PIZZA_API}_APIproductionEndpoint\"><http uri-template=\"https://product.example\"/></endpoint>").into_bytes(),
    );
    for node in &cluster.nodes {
        wait_tree(node, "PizzaShackAPI removed, shared files kept", &after);
    }
    holds_for(
        std::time::Duration::from_millis(500),
        "the shared files stay on every node",
        || {
            for node in &cluster.nodes {
                tree_is(&node.synapse(), &after)?;
            }
            Ok(())
        },
    );
}

/// Sync mode with one broken row: WSO2's gateway skips a failing API at start-up, and so does
/// the node: SERVING once the good API is deployed and the broken one has had its start-up
/// attempts (3, 0.5 s then 1 s apart), not after its normal retries (here a minute apart).
#[test]
fn sync_start_serves_once_the_failing_api_used_its_startup_attempts() {
    let Some(db) = Wso2Db::new(Backend::Sqlite) else {
        return;
    };
    db.publish(PIZZA, PIZZA_API, LABEL, "v1");
    db.put(
        BROKEN,
        LABEL,
        "Publish",
        b"{\"apiDefinition\": \"<api name=",
    );
    let mut gw = lone_node(
        "gw",
        &format!(
            "\n[retriever]\ngateway_labels = [\"{LABEL}\"]\npoll_interval = 50\n\
             deployment_retry_duration = 60000\nmax_retry_count = 5\n\
             artifact_retriever = \"db\"\nschema = \"wso2-apim-3.2\"\n\
             database_url = \"{}\"\ndata_retrieval_mode = \"sync\"\n",
            db.url
        ),
    );
    let started = std::time::Instant::now();
    gw.start_no_wait();
    wait_for(
        std::time::Duration::from_secs(20),
        "SERVING within the start-up bound despite the broken API",
        || match gw.health() {
            Ok(HealthStatus::Serving) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let took = started.elapsed();
    tree_is(&gw.synapse(), &files(PIZZA, PIZZA_API, "v1"))
        .unwrap_or_else(|e| panic!("SERVING before the good API was deployed: {e}"));
    let r = retriever_status(&gw);
    assert_eq!(r["startup_done"], true, "{r}");
    let failing = r["failing"].as_array().cloned().unwrap_or_default();
    assert!(
        matches!(failing.as_slice(), [f] if f["id"] == BROKEN && f["attempts"] == 3 && f["gave_up"] == false),
        "the broken API is listed after its 3 start-up attempts, still retrying: {r} (took {took:?})"
    );
    let text = gw.cli(&["artifact", "deployed"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("FAILING") && text.contains(BROKEN), "{text}");

    // Fixed in WSO2: the next event deploys it, without waiting for its minute-long retry.
    db.publish(BROKEN, STORE_API, LABEL, "fixed");
    wait_tree(
        &gw,
        "the fixed API deployed",
        &union(&[
            files(PIZZA, PIZZA_API, "v1"),
            files(BROKEN, STORE_API, "fixed"),
        ]),
    );
}
