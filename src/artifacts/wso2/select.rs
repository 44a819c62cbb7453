//! An API's rows in `AM_GW_API_ARTIFACTS` (one per gateway label) -> what a node with some
//! labels deploys of it: metadata, revision, digest and bundle. Pure.

use std::collections::BTreeMap;

use super::{RenderError, render_dto, shown};
use crate::artifacts::{ArtifactMeta, Bundle};
use crate::config::SUPER_TENANT;

/// The sizes at which MySQL's shorter blob types cut a value (`BLOB` 64 KiB, `MEDIUMBLOB`
/// 16 MiB, less one byte), with the type's name.
const MYSQL_BLOB_LIMITS: &[(usize, &str)] = &[(65_535, "BLOB"), (16_777_215, "MEDIUMBLOB")];

/// Renders an `ARTIFACT`; one that does not render at exactly a MySQL blob type's size was cut
/// by that column, and says so.
fn render_row(bytes: &[u8], label: &str) -> Result<super::Rendered, SelectError> {
    render_dto(bytes).map_err(|problem| {
        match MYSQL_BLOB_LIMITS
            .iter()
            .find(|(max, _)| bytes.len() == *max)
        {
            Some((len, column)) => SelectError::Truncated {
                label: label.to_owned(),
                len: *len,
                column,
                problem: Box::new(problem),
            },
            None => SelectError::Render(problem),
        }
    })
}

/// Longest name, version or tenant taken from a row into an artifact's metadata.
const MAX_FIELD: usize = 255;

/// What a `GATEWAY_INSTRUCTION` says (WSO2 writes `Publish` and `Remove`; case is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowInstruction {
    Publish,
    Remove,
    Unknown(String),
}

impl RowInstruction {
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some(v) if v.eq_ignore_ascii_case("publish") => Self::Publish,
            Some(v) if v.eq_ignore_ascii_case("remove") => Self::Remove,
            Some(v) => Self::Unknown(shown(v)),
            None => Self::Unknown("NULL".into()),
        }
    }
}

/// One row of `AM_GW_API_ARTIFACTS` with its API's details.
#[derive(Clone, PartialEq, Eq)]
pub struct ArtifactRow {
    /// Lower case canonical UUID.
    pub api_id: String,
    pub label: String,
    pub instruction: RowInstruction,
    /// Not read for `Remove` rows.
    pub artifact: Option<Vec<u8>>,
    pub name: Option<String>,
    pub version: Option<String>,
    pub tenant: Option<String>,
}

impl std::fmt::Debug for ArtifactRow {
    // The artifact may hold credentials: only its size is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ArtifactRow({}, {:?}, {:?}, {:?} bytes)",
            self.api_id,
            self.label,
            self.instruction,
            self.artifact.as_ref().map(Vec::len)
        )
    }
}

/// What a node deploys of one API: its metadata and its files (or why it cannot).
#[derive(Debug, Clone)]
pub struct Selected {
    pub meta: ArtifactMeta,
    pub bundle: Result<Bundle, SelectError>,
}

/// Why the row a node would deploy cannot be deployed. Never quotes the artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(
        "ARTIFACT of label {label:?} is {len} bytes, exactly what a MySQL {column} holds, and {problem}: the column cut it (a database upgraded from WSO2 API-M 3.0 has ARTIFACT as BLOB). Alter it: ALTER TABLE AM_GW_API_ARTIFACTS MODIFY ARTIFACT LONGBLOB; then save the API again in WSO2"
    )]
    Truncated {
        label: String,
        len: usize,
        column: &'static str,
        problem: Box<RenderError>,
    },
    #[error("ARTIFACT of label {label:?} is NULL")]
    NullArtifact { label: String },
    #[error("GATEWAY_INSTRUCTION {what:?} of label {label:?} is neither Publish nor Remove")]
    UnknownInstruction { what: String, label: String },
    #[error("removed")]
    Removed,
    #[error(
        "belongs to tenant {tenant:?}, which [retriever.tenants] maps to no folder: add `{tenant:?} = \"<folder id>\"` with a [[folder]] on repository/tenants/<tenant id>/synapse-configs (it is not deployed into the super tenant's folder)"
    )]
    Tenant { tenant: String },
    #[error(
        "names two tenants: {row:?} in AM_GW_PUBLISHED_API_DETAILS.TENANT_DOMAIN, {dto:?} in the GatewayAPIDTO's tenantDomain"
    )]
    TenantMismatch { row: String, dto: String },
    #[error("{what} {tenant:?} is not a tenant domain: it {problem}")]
    BadTenant {
        what: &'static str,
        tenant: String,
        problem: &'static str,
    },
}

/// Where a node deploys each tenant's APIs: the super tenant's into `default` (the
/// retriever's `folder`), another tenant's into the folder `[retriever.tenants]` maps it to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routes {
    default: String,
    /// Lower-case tenant domain -> folder id.
    tenants: BTreeMap<String, String>,
}

impl Routes {
    /// `tenants` as [`crate::config::RetrieverConfig::tenants`] holds them (lower case).
    pub fn new(default: &str, tenants: &BTreeMap<String, String>) -> Self {
        Self {
            default: default.to_owned(),
            tenants: tenants.clone(),
        }
    }

    /// The super tenant's folder.
    pub fn default_folder(&self) -> &str {
        &self.default
    }

    /// Every API into `default`; a tenant's API fails.
    pub fn super_tenant_only(default: &str) -> Self {
        Self::new(default, &BTreeMap::new())
    }

    /// The folder of an API of `tenant` (as [`tenant_of`] gives it), or why there is none.
    pub fn folder_of(&self, tenant: &str) -> Result<&str, SelectError> {
        if tenant == SUPER_TENANT {
            return Ok(&self.default);
        }
        self.tenants
            .get(tenant)
            .map(String::as_str)
            .ok_or_else(|| SelectError::Tenant {
                tenant: tenant.to_owned(),
            })
    }
}

/// The tenant of an API, lower case (WSO2 keeps tenant domains lower case), from its details
/// row (`TENANT_DOMAIN`) and its DTO (`tenantDomain`): the one they name, [`SUPER_TENANT`]
/// when neither does. Both are database values: a value that is no tenant domain, or two that
/// differ, fail the API rather than pick a folder.
pub fn tenant_of(row: Option<&str>, dto: Option<&str>) -> Result<String, SelectError> {
    let check = |what: &'static str, value: Option<&str>| -> Result<Option<String>, SelectError> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        crate::config::check_tenant_domain(v).map_err(|problem| SelectError::BadTenant {
            what,
            tenant: shown(v),
            problem,
        })?;
        Ok(Some(v.to_ascii_lowercase()))
    };
    let row = check("TENANT_DOMAIN", row)?;
    let dto = check("tenantDomain", dto)?;
    match (row, dto) {
        (Some(row), Some(dto)) if row != dto => Err(SelectError::TenantMismatch { row, dto }),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Ok(SUPER_TENANT.to_owned()),
    }
}

/// A name or version from a database row, as shown in status: at most 255 bytes, control
/// characters replaced.
fn field(value: Option<&str>) -> String {
    let mut out = String::new();
    for c in value.unwrap_or_default().chars() {
        if out.len() + c.len_utf8() > MAX_FIELD {
            break;
        }
        out.push(if c.is_control() { '\u{fffd}' } else { c });
    }
    out
}

/// Revision of a row's content: the first 63 bits of BLAKE3 over instruction and `ARTIFACT`.
/// Content-addressed: the same bytes give the same revision on every node and after every
/// restart, whatever `TIME_STAMP` says.
fn revision_of(instruction: &RowInstruction, artifact: Option<&[u8]>) -> i64 {
    let mut h = blake3::Hasher::new();
    h.update(format!("{instruction:?}").as_bytes());
    match artifact {
        Some(a) => {
            h.update(&[1]);
            h.update(a);
        }
        None => {
            h.update(&[0]);
        }
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    (u64::from_le_bytes(first) >> 1) as i64
}

/// What a node with `labels` (empty: every label) deploys of API `api_id`, from its rows (any
/// labels, any order; rows of other APIs are skipped). `None` when no row of those labels
/// publishes it.
///
/// Every row of those labels that is not `Remove` counts; the API carries those labels. WSO2
/// renders an API per gateway environment, so two labels can hold different content: the row
/// of the first label (in byte order) is the one deployed, so every node with the same labels
/// deploys the same bytes. A row with an unknown instruction or a NULL `ARTIFACT`, or one that
/// does not render, makes the API fail (reported, retried) rather than deploy something else.
///
/// The API deploys into its tenant's folder by `routes` (see [`tenant_of`]); an API of a
/// tenant `routes` does not map fails, naming the tenant (its metadata names the default
/// folder then).
pub fn select(
    api_id: &str,
    rows: &[ArtifactRow],
    labels: &[String],
    routes: &Routes,
) -> Option<Selected> {
    let mut candidates: Vec<&ArtifactRow> = rows
        .iter()
        .filter(|r| r.api_id == api_id)
        .filter(|r| labels.is_empty() || labels.contains(&r.label))
        .filter(|r| r.instruction != RowInstruction::Remove)
        .collect();
    candidates.sort_by(|a, b| a.label.cmp(&b.label));
    candidates.dedup_by(|a, b| a.label == b.label);
    let chosen = *candidates.first()?;
    let rendered = match &chosen.instruction {
        RowInstruction::Publish => match &chosen.artifact {
            Some(bytes) => render_row(bytes, &chosen.label),
            None => Err(SelectError::NullArtifact {
                label: chosen.label.clone(),
            }),
        },
        RowInstruction::Unknown(what) => Err(SelectError::UnknownInstruction {
            what: what.clone(),
            label: chosen.label.clone(),
        }),
        RowInstruction::Remove => Err(SelectError::Removed),
    };
    let mut tenant = field(chosen.tenant.as_deref());
    let mut folder = routes.default.as_str();
    let (bundle, keep, warnings) = match rendered {
        Ok(r) => match tenant_of(chosen.tenant.as_deref(), r.tenant.as_deref())
            .and_then(|t| Ok((routes.folder_of(&t)?, t)))
        {
            Ok((f, t)) => {
                (folder, tenant) = (f, t);
                (Ok(r.bundle), r.keep, r.warnings)
            }
            Err(e) => (Err(e), Vec::new(), Vec::new()),
        },
        Err(e) => (Err(e), Vec::new(), Vec::new()),
    };
    let (digest, size) = match &bundle {
        Ok(b) => (b.digest(), b.size()),
        Err(_) => (
            [0; 32],
            chosen.artifact.as_ref().map_or(0, |a| a.len() as u64),
        ),
    };
    let meta = ArtifactMeta {
        id: api_id.to_owned(),
        name: field(chosen.name.as_deref()),
        version: field(chosen.version.as_deref()),
        tenant,
        folder: folder.to_owned(),
        revision: revision_of(&chosen.instruction, chosen.artifact.as_deref()),
        removed: false,
        labels: candidates.iter().map(|r| r.label.clone()).collect(),
        digest,
        size,
        keep,
        warnings,
    };
    Some(Selected { meta, bundle })
}

#[cfg(test)]
mod tests {
    use super::super::render;
    use super::super::testing::*;
    use super::*;

    const API: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    const API2: &str = "0b6f7d4e-1c2a-4f3b-8e9d-5a6b7c8d9e0f";
    const PIZZA: &str = "admin--PizzaShackAPI:v1.0.0";

    fn row(api: &str, label: &str, instruction: &str, artifact: Option<Vec<u8>>) -> ArtifactRow {
        ArtifactRow {
            api_id: api.into(),
            label: label.into(),
            instruction: RowInstruction::parse(Some(instruction)),
            artifact,
            name: Some("PizzaShackAPI".into()),
            version: Some("1.0.0".into()),
            tenant: Some("carbon.super".into()),
        }
    }

    fn sc() -> Routes {
        Routes::super_tenant_only("sc")
    }

    fn labels(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn select_takes_the_first_label_that_publishes_and_skips_removes() {
        let prod = gateway_api_json(API, PIZZA, "prod");
        let sand = gateway_api_json(API, PIZZA, "sandbox");
        let rows = vec![
            row(API, "Sandbox", "Publish", Some(sand.clone())),
            row(API, "Production", "Publish", Some(prod.clone())),
            row(API, "Old", "Remove", None),
            row(
                API2,
                "Production",
                "Publish",
                Some(gateway_api_json(API2, "x", "y")),
            ),
        ];
        let both = select(
            API,
            &rows,
            &labels(&["Sandbox", "Production", "Old"]),
            &sc(),
        )
        .expect("published");
        assert_eq!(both.meta.labels, labels(&["Production", "Sandbox"]));
        assert_eq!(both.meta.folder, "sc");
        assert_eq!(both.meta.name, "PizzaShackAPI");
        let bundle = both.bundle.expect("renders");
        assert_eq!(bundle, render(&prod).expect("renders"), "first label wins");
        assert_eq!(
            (both.meta.digest, both.meta.size),
            (bundle.digest(), bundle.size())
        );

        let sandbox_only = select(API, &rows, &labels(&["Sandbox"]), &sc()).expect("published");
        assert_eq!(sandbox_only.meta.labels, labels(&["Sandbox"]));
        assert_eq!(sandbox_only.bundle, Ok(render(&sand).expect("renders")));
        assert_ne!(sandbox_only.meta.revision, both.meta.revision);
        assert!(sandbox_only.meta.revision >= 0);

        let all = select(API, &rows, &[], &sc()).expect("every label");
        assert_eq!(all.meta.revision, both.meta.revision);
        assert!(
            select(API, &rows, &labels(&["Old"]), &sc()).is_none(),
            "removed"
        );
        assert!(select(API, &rows, &labels(&["Nobody"]), &sc()).is_none());
        // Same content, same revision: a restart or another node agrees.
        let again = select(API, &rows.clone(), &labels(&["Production"]), &sc()).expect("published");
        assert_eq!(again.meta.revision, both.meta.revision);
    }

    #[test]
    fn select_fails_bad_rows_instead_of_deploying_something_else() {
        let good = gateway_api_json(API, PIZZA, "good");
        for (rows, problem) in [
            (
                vec![
                    row(API, "A", "Publish", None),
                    row(API, "B", "Publish", Some(good.clone())),
                ],
                "NULL",
            ),
            (
                vec![row(API, "A", "Deploy", Some(good.clone()))],
                "neither Publish nor Remove",
            ),
            (
                vec![row(API, "A", "Publish", Some(b"{oops".to_vec()))],
                "not GatewayAPIDTO JSON",
            ),
        ] {
            let s = select(API, &rows, &labels(&["A", "B"]), &sc()).expect("listed, failing");
            let e = s.bundle.expect_err("fails").to_string();
            assert!(e.contains(problem), "{e}");
            assert_eq!(s.meta.digest, [0; 32]);
        }
        // A tenant's API (details row or DTO) fails, naming the tenant, rather than land in
        // the super tenant's default/.
        let mut tenant_row = row(API, "A", "Publish", Some(good.clone()));
        tenant_row.tenant = Some("wso2.com".into());
        let e = select(API, &[tenant_row], &labels(&["A"]), &sc())
            .expect("listed")
            .bundle
            .expect_err("fails");
        assert!(e.to_string().contains("\"wso2.com\""), "{e}");
        let dto_tenant = String::from_utf8(good.clone())
            .expect("utf-8")
            .replace("carbon.super", "wso2.com");
        let mut no_details = row(API, "A", "Publish", Some(dto_tenant.into_bytes()));
        no_details.tenant = None;
        let e = select(API, &[no_details], &labels(&["A"]), &sc())
            .expect("listed")
            .bundle
            .expect_err("fails");
        assert_eq!(
            e,
            SelectError::Tenant {
                tenant: "wso2.com".into()
            }
        );
        let mut upper = row(API, "A", "Publish", Some(good.clone()));
        upper.tenant = Some("CARBON.SUPER".into());
        assert!(select(API, &[upper], &labels(&["A"]), &sc()).is_some_and(|s| s.bundle.is_ok()));
        // Case is not significant in GATEWAY_INSTRUCTION; NULL is unknown.
        assert_eq!(
            RowInstruction::parse(Some("PUBLISH")),
            RowInstruction::Publish
        );
        assert_eq!(
            RowInstruction::parse(Some("remove ")),
            RowInstruction::Remove
        );
        assert!(matches!(
            RowInstruction::parse(None),
            RowInstruction::Unknown(_)
        ));
        let rows = vec![row(API, "A", "publish", Some(good))];
        assert!(select(API, &rows, &labels(&["A"]), &sc()).is_some_and(|s| s.bundle.is_ok()));
    }

    #[test]
    fn apis_are_routed_to_their_tenant_folder() {
        let routes = Routes::new(
            "synapse-configs",
            &BTreeMap::from([("wso2.com".to_owned(), "tenant-1".to_owned())]),
        );
        let tenant_dto = |tenant: &str| {
            String::from_utf8(gateway_api_json(API, PIZZA, "t"))
                .expect("utf-8")
                .replace("carbon.super", tenant)
                .into_bytes()
        };
        let routed = |row_tenant: Option<&str>, dto_tenant: &str| {
            let mut r = row(API, "A", "Publish", Some(tenant_dto(dto_tenant)));
            r.tenant = row_tenant.map(str::to_owned);
            select(API, &[r], &labels(&["A"]), &routes).expect("listed")
        };
        // The tenant's API: into its folder, whichever of row and DTO names it, any case.
        for (row_tenant, dto_tenant) in [
            (Some("wso2.com"), "wso2.com"),
            (None, "wso2.com"),
            (Some("WSO2.com"), ""),
            (Some(" wso2.com "), "Wso2.Com"),
        ] {
            let s = routed(row_tenant, dto_tenant);
            assert_eq!(
                (s.meta.folder.as_str(), s.meta.tenant.as_str()),
                ("tenant-1", "wso2.com"),
                "{row_tenant:?} / {dto_tenant:?}"
            );
            assert!(s.bundle.is_ok(), "{:?}", s.bundle);
        }
        // The super tenant's (or none named): the default folder.
        for (row_tenant, dto_tenant) in [
            (Some("carbon.super"), "carbon.super"),
            (None, ""),
            (Some("CARBON.SUPER"), "carbon.super"),
        ] {
            let s = routed(row_tenant, dto_tenant);
            assert_eq!(
                (s.meta.folder.as_str(), s.meta.tenant.as_str()),
                ("synapse-configs", "carbon.super")
            );
            assert!(s.bundle.is_ok());
        }
        // An unmapped tenant fails naming it, and its metadata names no tenant folder.
        let s = routed(Some("acme.org"), "acme.org");
        assert_eq!(s.meta.folder, "synapse-configs");
        let e = s.bundle.expect_err("unmapped").to_string();
        assert!(
            e.contains("\"acme.org\"") && e.contains("[retriever.tenants]"),
            "{e}"
        );
        // Hostile values: two tenants, a huge or control-character domain; never a folder.
        let e = routed(Some("carbon.super"), "wso2.com")
            .bundle
            .expect_err("two tenants");
        assert_eq!(
            e,
            SelectError::TenantMismatch {
                row: "carbon.super".into(),
                dto: "wso2.com".into()
            }
        );
        for bad in ["wso2.com\nx", "a\u{0}b", &"x".repeat(10_000), "wso2 .com"] {
            let mut r = row(API, "A", "Publish", Some(tenant_dto("wso2.com")));
            r.tenant = Some(bad.to_owned());
            let s = select(API, &[r], &labels(&["A"]), &routes).expect("listed");
            assert_eq!(s.meta.folder, "synapse-configs", "{bad:?}");
            assert!(s.meta.tenant.len() <= 255);
            let e = s.bundle.expect_err("bad tenant").to_string();
            assert!(e.contains("TENANT_DOMAIN") && e.len() < 400, "{e}");
        }
        // Names and versions from rows are bounded and printable too.
        let mut r = row(API, "A", "Publish", Some(tenant_dto("wso2.com")));
        r.name = Some(format!("a\u{1b}[31m{}", "n".repeat(1000)));
        let s = select(API, &[r], &labels(&["A"]), &routes).expect("listed");
        assert!(s.meta.name.len() <= 255 && !s.meta.name.contains('\u{1b}'));
    }

    /// Issue 14, item 8: MySQL's 3.0 -> 3.2 upgrade leaves ARTIFACT a BLOB, which cuts a large
    /// API at 65,535 bytes; the reason says how to fix the column.
    #[test]
    fn an_artifact_cut_at_a_blob_size_names_the_column_fix() {
        let big = gateway_api_json(API, PIZZA, &"x".repeat(70_000));
        let cut_at = |len: usize| {
            let r = row(API, "A", "Publish", Some(big[..len].to_vec()));
            select(API, &[r], &labels(&["A"]), &sc())
                .expect("listed")
                .bundle
                .expect_err("cut JSON fails")
                .to_string()
        };
        let e = cut_at(65_535);
        assert!(
            e.contains("65535 bytes")
                && e.contains("MySQL BLOB")
                && e.contains("ALTER TABLE AM_GW_API_ARTIFACTS MODIFY ARTIFACT LONGBLOB")
                && e.contains("\"A\""),
            "{e}"
        );
        assert!(!e.contains("xxxx"), "never quotes the artifact: {e}");
        let e = cut_at(65_534);
        assert!(
            !e.contains("LONGBLOB"),
            "another size is another problem: {e}"
        );
        // A whole DTO of exactly that size deploys: only one that does not parse was cut.
        let mut exact = gateway_api_json(API, PIZZA, "t");
        exact.resize(65_535, b' ');
        let r = row(API, "A", "Publish", Some(exact));
        assert!(select(API, &[r], &labels(&["A"]), &sc()).is_some_and(|s| s.bundle.is_ok()));
        // MEDIUMBLOB's limit too.
        let mut huge = b"{\"apiDefinition\": \"".to_vec();
        huge.resize(16_777_215, b'y');
        let r = row(API, "A", "Publish", Some(huge));
        let e = select(API, &[r], &labels(&["A"]), &sc())
            .expect("listed")
            .bundle
            .expect_err("cut")
            .to_string();
        assert!(e.contains("MEDIUMBLOB") && e.contains("LONGBLOB"), "{e}");
    }
}
