//! The DB-backed artifact saver and retriever: API artifacts stored as bundles in a database
//! with gateway labels, deployed by every agent that subscribes to one of those labels.
//!
//! - [`db`]: the store (SQLite, PostgreSQL, MySQL/MariaDB) and its transactions.
//! - [`retriever`]: deploys a node's labels from a source and follows its events.
//! - [`hub`]: serves a source to agents without database credentials, and is one.
//! - [`wso2`]: WSO2 API-M 3.2's own tables as a read-only source, rendered into Synapse files.
//! - [`source_for`]: the source a retriever reads, by its typed config, and the hub this
//!   node serves beside it.
//! - the types below: bundles, metadata, events, and the validation every bundle passes.

pub mod db;
pub mod hub;
pub mod owners;
pub mod retriever;
pub mod wso2;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{RetrieverConfig, RetrieverSource, Schema, TlsConfig};
use crate::model::RelPath;

/// The source a retriever with `config` reads, and the hub service this node serves beside
/// it to agents without database credentials: artisync's own store (hub and saver), WSO2's
/// tables (hub only, read only), or another agent's hub (nothing served).
pub async fn source_for(
    config: &RetrieverConfig,
    tls: Option<&TlsConfig>,
) -> Result<(Arc<dyn retriever::Source>, Option<hub::HubService>), crate::net::NetError> {
    let poll = Duration::from_millis(config.poll_interval);
    Ok(match &config.source {
        RetrieverSource::Hub { address } => (
            Arc::new(hub::HubSource::new(address, tls, poll).await?),
            None,
        ),
        RetrieverSource::Db {
            url,
            schema: Schema::Wso2Apim32,
        } => {
            // WSO2's own tables, read only: hub subscribers get the rendered bundles, and
            // publish/remove are refused (WSO2 API-M writes those tables).
            let routes = wso2::Routes::new(&config.folder, &config.tenants);
            let wso2 = Arc::new(wso2::Wso2Source::new(url, routes, poll));
            (wso2.clone(), Some(hub::HubService::read_only(wso2)))
        }
        RetrieverSource::Db {
            url,
            schema: Schema::Artisync,
        } => {
            let db = Arc::new(retriever::DbSource::new(url, poll));
            let hub = hub::HubService::new(db.clone()).with_publishers(&config.publishers);
            (db, Some(hub))
        }
    })
}

/// Longest name, version, tenant or label accepted.
const MAX_FIELD: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{field} {value:?}: {problem}")]
    Invalid {
        field: &'static str,
        value: String,
        problem: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn invalid(field: &'static str, value: &str, problem: impl Into<String>) -> ArtifactError {
    ArtifactError::Invalid {
        field,
        value: value.chars().take(80).collect(),
        problem: problem.into(),
    }
}

/// Checks an artifact id: a UUID in its canonical 8-4-4-4-12 form (lower case is stored).
pub fn parse_id(id: &str) -> Result<String, ArtifactError> {
    uuid::Uuid::parse_str(id)
        .ok()
        .filter(|_| id.len() == 36)
        .map(|u| u.hyphenated().to_string())
        .ok_or_else(|| {
            invalid(
                "--id",
                id,
                "is not a UUID like 6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c",
            )
        })
}

/// Checks a label, name, version or tenant: non-empty, printable, at most 255 bytes.
pub fn check_field(field: &'static str, value: &str) -> Result<(), ArtifactError> {
    if value.trim().is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_FIELD {
        return Err(invalid(
            field,
            value,
            format!("is longer than {MAX_FIELD} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, value, "contains control characters"));
    }
    Ok(())
}

/// publish or remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Instruction {
    Publish,
    Remove,
}

impl Instruction {
    pub fn as_str(self) -> &'static str {
        match self {
            Instruction::Publish => "publish",
            Instruction::Remove => "remove",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "publish" => Some(Instruction::Publish),
            "remove" => Some(Instruction::Remove),
            _ => None,
        }
    }
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Event {
    pub id: i64,
    pub artifact_id: String,
    pub label: String,
    pub instruction: Instruction,
    pub revision: i64,
}

/// An artifact's metadata as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArtifactMeta {
    pub id: String,
    pub name: String,
    pub version: String,
    pub tenant: String,
    /// Folder id (on the retrieving node) the files deploy into.
    pub folder: String,
    pub revision: i64,
    pub removed: bool,
    pub labels: Vec<String>,
    #[serde(skip)]
    pub digest: [u8; 32],
    pub size: u64,
    /// Paths of the bundle that never replace a file another artifact put there (WSO2's
    /// `ga-config-key`, and entries of a `GatewayAPIDTO` with `override: false`); see
    /// [`owners`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<String>,
    /// What the operator must provision by hand for this artifact (WSO2: endpoint credentials,
    /// client certificates); shown in status.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One file of a bundle: where it goes below the folder root, its mode and bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleFile {
    pub path: RelPath,
    pub mode: u32,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for BundleFile {
    // Contents may hold credentials: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BundleFile({}, {:o}, {} bytes)",
            self.path,
            self.mode,
            self.data.len()
        )
    }
}

/// The files of one artifact revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    pub files: Vec<BundleFile>,
}

impl Bundle {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.data.len() as u64).sum()
    }

    /// BLAKE3 over every file's path, mode and content, in order.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for f in &self.files {
            h.update(&(f.path.as_str().len() as u64).to_le_bytes());
            h.update(f.path.as_str().as_bytes());
            h.update(&f.mode.to_le_bytes());
            h.update(&(f.data.len() as u64).to_le_bytes());
            h.update(&f.data);
        }
        *h.finalize().as_bytes()
    }

    /// Reads every regular file under `dir` (paths relative to it, sorted). Symlinks and
    /// special files are refused rather than followed; artisync's temp files and editor
    /// leftovers are skipped.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, ArtifactError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |path: &std::path::Path, source| ArtifactError::Io {
            path: path.to_owned(),
            source,
        };
        let ignore = crate::fs::ignore::Ignore::new(&[])
            .map_err(|e| invalid("--from", &dir.display().to_string(), e.to_string()))?;
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(dir)
            .follow_links(false)
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry =
                entry.map_err(|e| invalid("--from", &dir.display().to_string(), e.to_string()))?;
            let rel = entry
                .path()
                .strip_prefix(dir)
                .ok()
                .and_then(|p| p.to_str())
                .ok_or_else(|| {
                    invalid(
                        "--from",
                        &entry.path().display().to_string(),
                        "path is not valid UTF-8",
                    )
                })?;
            let rel = RelPath::new(rel).map_err(|e| invalid("--from", rel, e.to_string()))?;
            if ignore.is_ignored(&rel) {
                continue;
            }
            let ft = entry.file_type();
            if ft.is_dir() {
                continue;
            }
            if !ft.is_file() {
                return Err(invalid(
                    "--from",
                    rel.as_str(),
                    "is a symlink or special file; bundles hold regular files only",
                ));
            }
            let meta = entry
                .metadata()
                .map_err(|e| invalid("--from", rel.as_str(), e.to_string()))?;
            let data = std::fs::read(entry.path()).map_err(|e| io(entry.path(), e))?;
            files.push(BundleFile {
                path: rel,
                mode: meta.permissions().mode() & 0o7777,
                data,
            });
        }
        if files.is_empty() {
            return Err(invalid(
                "--from",
                &dir.display().to_string(),
                "holds no files",
            ));
        }
        Ok(Self { files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_uuids() {
        assert_eq!(
            parse_id("6F1C2A9E-3B1D-4C2E-9A8F-0D1E2F3A4B5C").expect("valid"),
            "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c"
        );
        for bad in [
            "",
            "abc",
            "6f1c2a9e3b1d4c2e9a8f0d1e2f3a4b5c",
            "../../etc/passwd",
        ] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fields_are_checked() {
        assert!(check_field("--label", "Production and Sandbox").is_ok());
        assert!(check_field("--label", " ").is_err());
        assert!(check_field("--label", "a\nb").is_err());
        assert!(check_field("--name", &"x".repeat(300)).is_err());
    }

    #[test]
    fn bundle_from_dir_reads_files_and_refuses_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("default/api")).expect("mkdir");
        std::fs::write(dir.path().join("default/api/a.xml"), b"<api/>").expect("write");
        std::fs::write(dir.path().join("default/api/a.xml.swp"), b"x").expect("write");
        let b = Bundle::from_dir(dir.path()).expect("bundle");
        assert_eq!(b.files.len(), 1);
        assert_eq!(b.files[0].path.as_str(), "default/api/a.xml");
        let d1 = b.digest();
        let mut b2 = b.clone();
        b2.files[0].mode ^= 0o1;
        assert_ne!(d1, b2.digest(), "mode is part of the digest");
        assert!(
            !format!("{b:?}").contains("<api/>"),
            "contents are never printed"
        );
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("default/api/link.xml"))
            .expect("symlink");
        assert!(Bundle::from_dir(dir.path()).is_err());
    }
}
