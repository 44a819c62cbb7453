//! WSO2's side of the tables, for tests: creates them as WSO2 API-M 3.2's DDL does and writes
//! rows as its `DBSaver` does (insert, or update `ARTIFACT` and `GATEWAY_INSTRUCTION` in place).
//! Compiled for unit tests and with the `testing` feature only, never into the release binary.

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, AssertSqlSafe};

use super::*;
use crate::artifacts::db::{Backend, placeholders};

const SQLITE_DDL: &[&str] = &[
    "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID varchar(255) NOT NULL, \
     TENANT_DOMAIN varchar(255), API_PROVIDER varchar(255), API_NAME varchar(255), \
     API_VERSION varchar(255), PRIMARY KEY (API_ID))",
    "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID varchar(255) NOT NULL, ARTIFACT blob, \
     GATEWAY_INSTRUCTION varchar(20), GATEWAY_LABEL varchar(255), \
     TIME_STAMP TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
     PRIMARY KEY (GATEWAY_LABEL, API_ID), \
     FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID))",
];
const POSTGRES_DDL: &[&str] = &[
    "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID varchar(255) NOT NULL, \
     TENANT_DOMAIN varchar(255), API_PROVIDER varchar(255), API_NAME varchar(255), \
     API_VERSION varchar(255), PRIMARY KEY (API_ID))",
    "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID varchar(255) NOT NULL, ARTIFACT bytea, \
     GATEWAY_INSTRUCTION varchar(20), GATEWAY_LABEL varchar(255), \
     TIME_STAMP TIMESTAMP(0) NOT NULL DEFAULT CURRENT_TIMESTAMP, \
     PRIMARY KEY (GATEWAY_LABEL, API_ID), \
     FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID) \
     ON UPDATE CASCADE ON DELETE NO ACTION)",
];
const MYSQL_DDL: &[&str] = &[
    "CREATE TABLE AM_GW_PUBLISHED_API_DETAILS (API_ID varchar(255) NOT NULL, \
     TENANT_DOMAIN varchar(255), API_PROVIDER varchar(255), API_NAME varchar(255), \
     API_VERSION varchar(255), PRIMARY KEY (API_ID)) ENGINE=InnoDB",
    "CREATE TABLE AM_GW_API_ARTIFACTS (API_ID varchar(255) NOT NULL, ARTIFACT LONGBLOB, \
     GATEWAY_INSTRUCTION varchar(20), GATEWAY_LABEL varchar(255), \
     TIME_STAMP TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP, \
     PRIMARY KEY (GATEWAY_LABEL, API_ID), \
     FOREIGN KEY (API_ID) REFERENCES AM_GW_PUBLISHED_API_DETAILS(API_ID) \
     ON UPDATE CASCADE ON DELETE NO ACTION) ENGINE=InnoDB",
];

/// A connection to the database WSO2 API-M would write.
pub struct Wso2Tables {
    pool: AnyPool,
    backend: Backend,
}

impl Wso2Tables {
    /// Connects (creating an SQLite file) and creates WSO2's two tables.
    pub async fn create(url: &str) -> Result<Self, sqlx::Error> {
        Self::create_with(url, false).await
    }

    /// MySQL/MariaDB as WSO2 API-M 3.0's upgrade to 3.2 leaves it: `ARTIFACT` is a `BLOB`
    /// (64 KiB), and the writer's session is not strict, so a larger `ARTIFACT` is cut at
    /// 65,535 bytes (with a warning) rather than refused.
    pub async fn create_mysql_upgraded_from_3_0(url: &str) -> Result<Self, sqlx::Error> {
        Self::create_with(url, true).await
    }

    async fn create_with(url: &str, blob: bool) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let backend =
            Backend::of_url(url).map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
        let url = if backend == Backend::Sqlite {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(2)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if blob {
                        sqlx::query("SET SESSION sql_mode = ''")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        let ddl = match backend {
            Backend::Sqlite => SQLITE_DDL,
            Backend::Postgres => POSTGRES_DDL,
            Backend::MySql => MYSQL_DDL,
        };
        for statement in ddl {
            sqlx::query(*statement).execute(&pool).await?;
        }
        if blob {
            sqlx::query("ALTER TABLE AM_GW_API_ARTIFACTS MODIFY ARTIFACT BLOB")
                .execute(&pool)
                .await?;
        }
        Ok(Self { pool, backend })
    }

    /// Writes the row of (`api_id`, `label`) as WSO2's `DBSaver` does, with the API's
    /// details row first if it is missing.
    pub async fn put(
        &self,
        api_id: &str,
        label: &str,
        instruction: Option<&str>,
        artifact: Option<&[u8]>,
    ) -> Result<(), sqlx::Error> {
        let sql = |q: &str| AssertSqlSafe(placeholders(self.backend, q));
        let details: i64 = sqlx::query_scalar(sql(
            "SELECT COUNT(*) FROM AM_GW_PUBLISHED_API_DETAILS WHERE API_ID = ?",
        ))
        .bind(api_id)
        .fetch_one(&self.pool)
        .await?;
        if details == 0 {
            sqlx::query(sql(
                "INSERT INTO AM_GW_PUBLISHED_API_DETAILS (API_ID, API_NAME, API_VERSION, \
                 TENANT_DOMAIN, API_PROVIDER) VALUES (?, ?, ?, ?, ?)",
            ))
            .bind(api_id)
            .bind(format!("API-{}", &api_id[..8.min(api_id.len())]))
            .bind("1.0.0")
            .bind("carbon.super")
            .bind("admin")
            .execute(&self.pool)
            .await?;
        }
        let exists: i64 = sqlx::query_scalar(sql(
            "SELECT COUNT(*) FROM AM_GW_API_ARTIFACTS WHERE API_ID = ? AND GATEWAY_LABEL = ?",
        ))
        .bind(api_id)
        .bind(label)
        .fetch_one(&self.pool)
        .await?;
        let q = if exists == 0 {
            "INSERT INTO AM_GW_API_ARTIFACTS (ARTIFACT, GATEWAY_INSTRUCTION, API_ID, \
             GATEWAY_LABEL) VALUES (?, ?, ?, ?)"
        } else {
            "UPDATE AM_GW_API_ARTIFACTS SET ARTIFACT = ?, GATEWAY_INSTRUCTION = ? \
             WHERE API_ID = ? AND GATEWAY_LABEL = ?"
        };
        sqlx::query(sql(q))
            .bind(artifact.map(<[u8]>::to_vec))
            .bind(instruction)
            .bind(api_id)
            .bind(label)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets the `TENANT_DOMAIN` of an API's details row (WSO2 writes the API's tenant there).
    pub async fn set_tenant(&self, api_id: &str, tenant: &str) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(placeholders(
            self.backend,
            "UPDATE AM_GW_PUBLISHED_API_DETAILS SET TENANT_DOMAIN = ? WHERE API_ID = ?",
        )))
        .bind(tenant)
        .bind(api_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `Publish` of `artifact` for `label`.
    pub async fn publish(
        &self,
        api_id: &str,
        label: &str,
        artifact: &[u8],
    ) -> Result<(), sqlx::Error> {
        self.put(api_id, label, Some("Publish"), Some(artifact))
            .await
    }

    /// `Remove` for `label` (WSO2 writes the removal's DTO as the artifact).
    pub async fn remove(
        &self,
        api_id: &str,
        label: &str,
        artifact: &[u8],
    ) -> Result<(), sqlx::Error> {
        self.put(api_id, label, Some("Remove"), Some(artifact))
            .await
    }

    /// Every table name in the database (lower case), to show nothing else was created.
    pub async fn tables(&self) -> Result<Vec<String>, sqlx::Error> {
        let q = match self.backend {
            Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table'",
            Backend::Postgres => {
                "SELECT CAST(table_name AS TEXT) FROM information_schema.tables \
                 WHERE table_schema = 'public'"
            }
            Backend::MySql => {
                "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
                 WHERE table_schema = DATABASE()"
            }
        };
        let mut names: Vec<String> = sqlx::query_scalar::<_, String>(q)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|n| n.to_lowercase())
            .collect();
        names.sort();
        Ok(names)
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

/// The `ga-config-key` local entry every HTTP API of WSO2 API-M 3.2 carries (the same in
/// every API of a tenant).
pub fn ga_config_xml() -> String {
    "<localEntry xmlns=\"http://ws.apache.org/ns/synapse\" key=\"ga-config-key\"><GoogleAnalyticsTracking xmlns=\"http://wso2.org/ns/apimgt/ga\"><Enabled>false</Enabled><TrackingID>UA-XXXXXXXX-X</TrackingID></GoogleAnalyticsTracking></localEntry>".to_owned()
}

/// JSON as Gson writes it: `<`, `>`, `=`, `&` and `'` inside strings as `\u003c` etc. (only
/// strings hold them in these documents).
pub fn gson(value: &serde_json::Value) -> Vec<u8> {
    value
        .to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('=', "\\u003d")
        .replace('&', "\\u0026")
        .replace('\'', "\\u0027")
        .into_bytes()
}

/// A `GatewayAPIDTO` JSON as WSO2 API-M 3.2 writes it (Gson-escaped), for API `name` (the
/// Synapse API name, e.g. `admin--PizzaShackAPI:v1.0.0`) with one in-sequence, one endpoint
/// and one local entry whose bodies carry `tag`, the shared `ga-config-key` local entry, plus
/// endpoint credentials that are never deployed.
pub fn gateway_api_json(api_id: &str, name: &str, tag: &str) -> Vec<u8> {
    gson(&serde_json::json!({
        "name": "PizzaShackAPI",
        "version": "1.0.0",
        "provider": "admin",
        "apiId": api_id,
        "tenantDomain": "carbon.super",
        "override": true,
        "apiDefinition": api_xml(name, tag),
        "sequenceToBeAdd": [{
            "name": format!("{name}--In"),
            "content": format!("<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--In\"><log level=\"custom\"><property name=\"tag\" value=\"{tag}\"/></log></sequence>"),
        }],
        "endpointEntriesToBeAdd": [{
            "name": format!("{name}_APIproductionEndpoint"),
            "content": format!("<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}_APIproductionEndpoint\"><http uri-template=\"https://backend.example/{tag}\"/></endpoint>"),
        }],
        "localEntriesToBeAdd": [{
            "name": api_id,
            "content": format!("<localEntry xmlns=\"http://ws.apache.org/ns/synapse\" key=\"{api_id}\">{tag}</localEntry>"),
        }, {
            "name": "ga-config-key",
            "content": ga_config_xml(),
        }],
        "sequencesToBeRemove": [format!("{name}--In")],
        "endpointEntriesToBeRemove": [format!("{name}_APIproductionEndpoint")],
        "localEntriesToBeRemove": [api_id],
        "clientCertificatesToBeAdd": [],
        "credentialsToBeAdd": [{"alias": "PizzaShackAPI--v1.0.0", "password": "s3cret-endpoint-password"}],
        "credentialsToBeRemove": [],
    }))
}

/// [`gateway_api_json`] as a tenant's API: `tenantDomain` is `tenant`.
pub fn tenant_api_json(api_id: &str, name: &str, tag: &str, tenant: &str) -> Vec<u8> {
    String::from_utf8_lossy(&gateway_api_json(api_id, name, tag))
        .replace(
            "\"tenantDomain\":\"carbon.super\"",
            &format!("\"tenantDomain\":{tenant:?}"),
        )
        .into_bytes()
}

/// The Synapse API definition [`gateway_api_json`] carries.
pub fn api_xml(name: &str, tag: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}\" context=\"/pizzashack/1.0.0\" version=\"1.0.0\" version-type=\"context\"><resource methods=\"GET\" uri-template=\"/menu\"><inSequence><property name=\"tag\" value=\"{tag}\"/></inSequence></resource></api>\n"
    )
}

/// The files [`gateway_api_json`] renders to: (path below `synapse-configs`, content).
pub fn rendered_files(api_id: &str, name: &str, tag: &str) -> Vec<(String, String)> {
    let file = |n: &str| synapse_file_name(n).unwrap_or_default();
    let mut files = vec![
        (format!("{API_DIR}/{}", file(name)), api_xml(name, tag)),
        (
            format!("{SEQUENCES_DIR}/{}", file(&format!("{name}--In"))),
            format!(
                "<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}--In\"><log level=\"custom\"><property name=\"tag\" value=\"{tag}\"/></log></sequence>"
            ),
        ),
        (
            format!(
                "{ENDPOINTS_DIR}/{}",
                file(&format!("{name}_APIproductionEndpoint"))
            ),
            format!(
                "<endpoint xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{name}_APIproductionEndpoint\"><http uri-template=\"https://backend.example/{tag}\"/></endpoint>"
            ),
        ),
        (
            format!("{LOCAL_ENTRIES_DIR}/{}", file(api_id)),
            format!(
                "<localEntry xmlns=\"http://ws.apache.org/ns/synapse\" key=\"{api_id}\">{tag}</localEntry>"
            ),
        ),
        (
            format!("{LOCAL_ENTRIES_DIR}/ga-config-key.xml"),
            ga_config_xml(),
        ),
    ];
    files.sort();
    files
}
