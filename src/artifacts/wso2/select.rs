//! An API's rows in `AM_GW_API_ARTIFACTS` (one per gateway label) -> what a node with some
//! labels deploys of it: metadata, revision, digest and bundle. Pure.

use super::{RenderError, render_dto, shown};
use crate::artifacts::{ArtifactMeta, Bundle};

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
    #[error("ARTIFACT of label {label:?} is NULL")]
    NullArtifact { label: String },
    #[error("GATEWAY_INSTRUCTION {what:?} of label {label:?} is neither Publish nor Remove")]
    UnknownInstruction { what: String, label: String },
    #[error("removed")]
    Removed,
    #[error(
        "belongs to tenant {tenant:?}: tenant APIs are not deployed yet (only {SUPER_TENANT}'s go to this folder; a tenant's would land in the super tenant's default/)"
    )]
    Tenant { tenant: String },
}

/// WSO2's super tenant, whose APIs go to `synapse-configs/default/`.
pub const SUPER_TENANT: &str = "carbon.super";

/// The tenant of an API that is not the super tenant, from its details row or its DTO.
fn other_tenant(row: Option<&str>, dto: Option<&str>) -> Option<String> {
    [row, dto]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|t| !t.is_empty() && !t.eq_ignore_ascii_case(SUPER_TENANT))
        .map(shown)
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
pub fn select(
    api_id: &str,
    rows: &[ArtifactRow],
    labels: &[String],
    folder: &str,
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
            Some(bytes) => render_dto(bytes).map_err(SelectError::from),
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
    let (bundle, keep, warnings) = match rendered {
        Ok(r) => match other_tenant(chosen.tenant.as_deref(), r.tenant.as_deref()) {
            Some(tenant) => (Err(SelectError::Tenant { tenant }), Vec::new(), Vec::new()),
            None => (Ok(r.bundle), r.keep, r.warnings),
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
        name: chosen.name.clone().unwrap_or_default(),
        version: chosen.version.clone().unwrap_or_default(),
        tenant: chosen.tenant.clone().unwrap_or_default(),
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
        let both = select(API, &rows, &labels(&["Sandbox", "Production", "Old"]), "sc")
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

        let sandbox_only = select(API, &rows, &labels(&["Sandbox"]), "sc").expect("published");
        assert_eq!(sandbox_only.meta.labels, labels(&["Sandbox"]));
        assert_eq!(sandbox_only.bundle, Ok(render(&sand).expect("renders")));
        assert_ne!(sandbox_only.meta.revision, both.meta.revision);
        assert!(sandbox_only.meta.revision >= 0);

        let all = select(API, &rows, &[], "sc").expect("every label");
        assert_eq!(all.meta.revision, both.meta.revision);
        assert!(
            select(API, &rows, &labels(&["Old"]), "sc").is_none(),
            "removed"
        );
        assert!(select(API, &rows, &labels(&["Nobody"]), "sc").is_none());
        // Same content, same revision: a restart or another node agrees.
        let again = select(API, &rows.clone(), &labels(&["Production"]), "sc").expect("published");
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
            let s = select(API, &rows, &labels(&["A", "B"]), "sc").expect("listed, failing");
            let e = s.bundle.expect_err("fails").to_string();
            assert!(e.contains(problem), "{e}");
            assert_eq!(s.meta.digest, [0; 32]);
        }
        // A tenant's API (details row or DTO) fails, naming the tenant, rather than land in
        // the super tenant's default/.
        let mut tenant_row = row(API, "A", "Publish", Some(good.clone()));
        tenant_row.tenant = Some("wso2.com".into());
        let e = select(API, &[tenant_row], &labels(&["A"]), "sc")
            .expect("listed")
            .bundle
            .expect_err("fails");
        assert!(e.to_string().contains("\"wso2.com\""), "{e}");
        let dto_tenant = String::from_utf8(good.clone())
            .expect("utf-8")
            .replace("carbon.super", "wso2.com");
        let e = select(
            API,
            &[row(API, "A", "Publish", Some(dto_tenant.into_bytes()))],
            &labels(&["A"]),
            "sc",
        )
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
        assert!(select(API, &[upper], &labels(&["A"]), "sc").is_some_and(|s| s.bundle.is_ok()));
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
        assert!(select(API, &rows, &labels(&["A"]), "sc").is_some_and(|s| s.bundle.is_ok()));
    }
}
