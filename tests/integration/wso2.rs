//! WSO2 API Manager 3.2 compatibility (`schema = "wso2-apim-3.2"`), end to end on every
//! database backend: the test plays API Manager (it creates `AM_GW_API_ARTIFACTS` and
//! `AM_GW_PUBLISHED_API_DETAILS` and writes their rows with plain SQL), and a real agent
//! renders the published APIs of its gateway label into `synapse-configs/default/...`,
//! follows new rows and `Remove` instructions, reports a bad row without letting it block the
//! others, and serves the rendered artifacts to a hub node that has no database credentials.
//!
//! PostgreSQL and MariaDB tests skip with a printed reason when their server is unreachable,
//! except in CI (`CI=true`), where they fail.

use std::collections::BTreeMap;
use std::time::Duration;

use artisync::artifacts::db::{Backend, placeholders};
use serde_json::Value;
use sqlx::{AnyPool, AssertSqlSafe};

use crate::common::db::{FreshDb, block_on, contents, per_backend};
use crate::common::*;

const LABEL: &str = "Production and Sandbox";
const PIZZA: &str = "2d6a1c8e-0f4b-4c1a-9e7d-3b5a6c7d8e9f";
const WEATHER: &str = "7e1b2c3d-4f5a-4b6c-8d9e-0f1a2b3c4d5e";
const STORE: &str = "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d";
const OTHER_LABEL_ONLY: &str = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9";
const BROKEN: &str = "5c4b3a29-1807-4f6e-9d8c-7b6a59483726";

/// Bound for the agent to deploy or undeploy what the test wrote.
const RETRIEVE_TIMEOUT: Duration = Duration::from_secs(30);

per_backend!(published_apis_are_rendered_and_followed);

/// A fresh database holding WSO2's two gateway tables.
struct Wso2Db {
    db: FreshDb,
}

impl Wso2Db {
    /// `None` when the backend's server is unreachable off CI (the test is skipped).
    fn new(backend: Backend) -> Option<Self> {
        let db = Self {
            db: FreshDb::new(backend)?,
        };
        let (blob, stamp) = match backend {
            Backend::Postgres => ("BYTEA", "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP"),
            Backend::MySql => (
                "LONGBLOB",
                "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP",
            ),
            Backend::Sqlite => ("BLOB", "TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP"),
        };
        db.exec(
            "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID VARCHAR(255) NOT NULL, \
             TENANT_DOMAIN VARCHAR(255), API_PROVIDER VARCHAR(255), API_NAME VARCHAR(255), \
             API_VERSION VARCHAR(255), PRIMARY KEY (API_ID))",
            &[],
        );
        db.exec(
            &format!(
                "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID VARCHAR(255) NOT NULL, ARTIFACT {blob}, \
                 GATEWAY_INSTRUCTION VARCHAR(20), GATEWAY_LABEL VARCHAR(255) NOT NULL, \
                 TIME_STAMP {stamp}, PRIMARY KEY (GATEWAY_LABEL, API_ID), \
                 FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID))"
            ),
            &[],
        );
        Some(db)
    }

    /// The URL the test itself uses (SQLite: creating the file).
    fn own_url(&self) -> String {
        match self.db.backend {
            Backend::Sqlite => format!("{}?mode=rwc", self.db.url),
            _ => self.db.url.clone(),
        }
    }

    /// Runs one statement; `args` are text, or bytes when they start with `<bytes>`.
    fn exec(&self, sql: &str, args: &[Arg]) {
        let sql = placeholders(self.db.backend, sql);
        let url = self.own_url();
        block_on(async {
            sqlx::any::install_default_drivers();
            let pool = AnyPool::connect(&url)
                .await
                .expect("connect to the test DB");
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for a in args {
                q = match a {
                    Arg::Text(t) => q.bind(t.clone()),
                    Arg::Bytes(b) => q.bind(b.clone()),
                };
            }
            q.execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            pool.close().await;
        });
    }

    /// What API Manager writes when it publishes an API to a label.
    fn publish(&self, api: &str, name: &str, label: &str, artifact: Vec<u8>) {
        self.exec(
            "INSERT INTO AM_GW_PUBLISHED_API_DETAILS (API_ID, TENANT_DOMAIN, API_PROVIDER, API_NAME, API_VERSION) \
             SELECT ?, 'carbon.super', 'admin', ?, '1.0.0' WHERE NOT EXISTS \
             (SELECT 1 FROM AM_GW_PUBLISHED_API_DETAILS WHERE API_ID = ?)",
            &[
                Arg::Text(api.into()),
                Arg::Text(name.into()),
                Arg::Text(api.into()),
            ],
        );
        self.exec(
            "INSERT INTO AM_GW_API_ARTIFACTS (API_ID, ARTIFACT, GATEWAY_INSTRUCTION, GATEWAY_LABEL) \
             VALUES (?, ?, 'Publish', ?)",
            &[
                Arg::Text(api.into()),
                Arg::Bytes(artifact),
                Arg::Text(label.into()),
            ],
        );
    }

    /// What API Manager writes when it undeploys an API from a label.
    fn remove(&self, api: &str, label: &str) {
        self.exec(
            "UPDATE AM_GW_API_ARTIFACTS SET GATEWAY_INSTRUCTION = 'Remove' \
             WHERE API_ID = ? AND GATEWAY_LABEL = ?",
            &[Arg::Text(api.into()), Arg::Text(label.into())],
        );
    }
}

enum Arg {
    Text(String),
    Bytes(Vec<u8>),
}

/// A GatewayAPIDTO as API Manager stores it: the API (Synapse name `admin--NAME:v1.0.0`),
/// an in-sequence and a production endpoint.
fn gateway_api(name: &str, backend_url: &str) -> Vec<u8> {
    serde_json::json!({
        "name": name,
        "version": "1.0.0",
        "provider": "admin",
        "apiId": "ignored",
        "tenantDomain": "carbon.super",
        "override": true,
        "apiDefinition": format!(
            "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--{name}:v1.0.0\" context=\"/{name}/1.0.0\"><resource methods=\"GET\" uri-template=\"/*\"/></api>"
        ),
        "sequenceToBeAdd": [
            {"name": format!("admin--{name}:v1.0.0--In"), "content": "<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"in\"><log/></sequence>"}
        ],
        "endpointEntriesToBeAdd": [
            {"name": format!("{name}--v1.0.0_APIproductionEndpoint"), "content": format!("<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"prod\"><address uri=\"{backend_url}\"/></endpoint>")}
        ],
        "localEntriesToBeAdd": [],
        "sequencesToBeRemove": [],
        "clientCertificatesToBeAdd": []
    })
    .to_string()
    .into_bytes()
}

/// The paths an API of [`gateway_api`] renders to.
fn rendered_paths(name: &str) -> Vec<String> {
    vec![
        format!("default/api/admin--{name}_v1.0.0.xml"),
        format!("default/endpoints/{name}--v1.0.0_APIproductionEndpoint.xml"),
        format!("default/sequences/admin--{name}_v1.0.0--In.xml"),
    ]
}

/// Waits until the node's synapse folder holds exactly the files of the APIs `names`.
fn wait_apis(node: &Node, names: &[&str]) -> BTreeMap<String, Vec<u8>> {
    let mut want: Vec<String> = names.iter().flat_map(|n| rendered_paths(n)).collect();
    want.sort();
    wait_for(
        RETRIEVE_TIMEOUT,
        format!("node {} to hold exactly the APIs {names:?}", node.name),
        || {
            let got = contents(&node.synapse());
            let paths: Vec<String> = got.keys().cloned().collect();
            if paths == want {
                Ok(got)
            } else {
                Err(format!("has {paths:?}"))
            }
        },
    )
}

fn retriever_status(node: &Node) -> Value {
    let status = node.status_json();
    status["retriever"].clone()
}

fn wso2_node(name: &str, url: &str) -> Node {
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    let node = Node::new(name, port, &[]);
    node.append_config(&format!(
        "\n[retriever]\nartifact_retriever = \"db\"\nschema = \"wso2-apim-3.2\"\n\
         database_url = \"{url}\"\ngateway_labels = [\"{LABEL}\"]\npoll_interval = 50\n\
         event_waiting_time = 1\ndeployment_retry_duration = 200\nmax_retry_count = 2\n"
    ));
    node
}

fn published_apis_are_rendered_and_followed(backend: Backend) {
    let Some(db) = Wso2Db::new(backend) else {
        return;
    };
    db.publish(
        PIZZA,
        "PizzaShackAPI",
        LABEL,
        gateway_api("PizzaShackAPI", "https://pizza.example/v1"),
    );
    db.publish(
        PIZZA,
        "PizzaShackAPI",
        "Internal",
        gateway_api("PizzaShackAPI", "https://pizza.example/v1"),
    );
    db.publish(
        OTHER_LABEL_ONLY,
        "OtherAPI",
        "Internal",
        gateway_api("OtherAPI", "https://other.example"),
    );
    db.publish(
        BROKEN,
        "BrokenAPI",
        LABEL,
        b"{\"name\": \"BrokenAPI\", \"apiDefinition\": \"<api".to_vec(),
    );

    let mut gw = wso2_node("gw", &db.db.url);
    gw.start();
    // Start-up deploy: this label's APIs only, rendered with Synapse's names; the broken row
    // is reported, and does not hold up the others.
    let files = wait_apis(&gw, &["PizzaShackAPI"]);
    let endpoint = &files["default/endpoints/PizzaShackAPI--v1.0.0_APIproductionEndpoint.xml"];
    assert!(
        String::from_utf8_lossy(endpoint).contains("https://pizza.example/v1"),
        "{}",
        String::from_utf8_lossy(endpoint)
    );
    let r = wait_for(RETRIEVE_TIMEOUT, "the broken API reported", || {
        let r = retriever_status(&gw);
        let failing = r["failing"].as_array().cloned().unwrap_or_default();
        if failing.iter().any(|f| f["id"] == BROKEN) {
            Ok(r)
        } else {
            Err(format!("{r}"))
        }
    });
    assert!(
        r["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("wso2-apim-3.2")),
        "{r}"
    );
    assert_eq!(r["source_available"], true, "{r}");

    // API Manager publishes another API to the label: it follows.
    db.publish(
        WEATHER,
        "WeatherAPI",
        LABEL,
        gateway_api("WeatherAPI", "https://weather.example"),
    );
    wait_apis(&gw, &["PizzaShackAPI", "WeatherAPI"]);
    // It undeploys one from the label (the row stays, with Remove): its files go.
    db.remove(PIZZA, LABEL);
    wait_apis(&gw, &["WeatherAPI"]);

    // A node without database credentials gets the same rendered files from this agent.
    let hub_port = gw.port;
    let port = artisync::demo::free_ports(1).expect("reserve a loopback port")[0];
    let mut edge = Node::new("edge", port, &[]);
    edge.append_config(&format!(
        "\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:{hub_port}\"\n\
         gateway_labels = [\"{LABEL}\"]\npoll_interval = 50\nevent_waiting_time = 1\n\
         deployment_retry_duration = 200\nmax_retry_count = 2\n"
    ));
    edge.start();
    let on_edge = wait_apis(&edge, &["WeatherAPI"]);
    assert_eq!(
        on_edge,
        contents(&gw.synapse()),
        "hub node and WSO2 node differ"
    );
    db.publish(
        STORE,
        "StoreAPI",
        LABEL,
        gateway_api("StoreAPI", "https://store.example"),
    );
    wait_apis(&gw, &["StoreAPI", "WeatherAPI"]);
    wait_apis(&edge, &["StoreAPI", "WeatherAPI"]);
    edge.stop();
    gw.stop();
}
