//! `artisync cert`: a small private CA for the peers' mutual TLS. `ca` makes the CA; `node`
//! issues a node certificate (server and client auth) for the names and addresses peers use
//! to reach that node; `publisher` issues a client-only certificate for
//! `artisync artifact publish --hub https://...`. Keys are written with mode 0600.
//!
//! A certificate says who holds it (read back by [`crate::identity`]): its common name is the
//! node or publisher name, and a URI subject alternative name states the role,
//! `urn:artisync:node:<name>` or `urn:artisync:publisher:<name>`. Node certificates issued
//! before the URI existed carry only the common name and still count as node certificates.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0} already exists; remove it first to replace it")]
    Exists(PathBuf),
    #[error(
        "--name {0:?} must be 1-64 characters of letters, digits, '-', '_' or '.' (not . or ..)"
    )]
    Name(String),
}

/// URI SAN prefix marking a node (cluster) certificate; the node name follows.
pub const NODE_URI_PREFIX: &str = "urn:artisync:node:";
/// URI SAN prefix marking a publisher certificate; the publisher name follows.
pub const PUBLISHER_URI_PREFIX: &str = "urn:artisync:publisher:";

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                CertError::Exists(path.to_owned())
            } else {
                CertError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| CertError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Creates `dir/ca.pem` and `dir/ca.key`.
pub fn make_ca(dir: &Path) -> Result<PathBuf, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "artisync cluster CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let pem = dir.join("ca.pem");
    write_new(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write_new(&pem, &cert.pem(), 0o644)?;
    Ok(pem)
}

/// Issues `out/<name>.pem` and `out/<name>.key`, signed by the CA in `ca_dir`, valid for
/// `hosts` (DNS names or IP addresses peers use in their `address`), for server and client
/// auth. The common name and the `urn:artisync:node:<name>` URI name the node.
pub fn make_node(
    ca_dir: &Path,
    name: &str,
    hosts: &[String],
    out: &Path,
) -> Result<PathBuf, CertError> {
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    issue(ca_dir, name, NODE_URI_PREFIX, params, out)
}

/// Issues `out/<name>.pem` and `out/<name>.key` for a publisher: client auth only (it cannot
/// serve as a node), marked by the `urn:artisync:publisher:<name>` URI. An agent takes
/// publishes from it when its `[retriever] publishers` lists `name`.
pub fn make_publisher(ca_dir: &Path, name: &str, out: &Path) -> Result<PathBuf, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    issue(ca_dir, name, PUBLISHER_URI_PREFIX, params, out)
}

fn issue(
    ca_dir: &Path,
    name: &str,
    role_prefix: &str,
    mut params: CertificateParams,
    out: &Path,
) -> Result<PathBuf, CertError> {
    if !crate::config::valid_name(name) {
        return Err(CertError::Name(name.to_owned()));
    }
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|source| CertError::Io { path: p, source })
    };
    let ca_key = KeyPair::from_pem(&read(ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_dir.join("ca.pem"))?, ca_key)?;
    std::fs::create_dir_all(out).map_err(|source| CertError::Io {
        path: out.to_owned(),
        source,
    })?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .subject_alt_names
        .push(SanType::URI(format!("{role_prefix}{name}").try_into()?));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let pem = out.join(format!("{name}.pem"));
    write_new(
        &out.join(format!("{name}.key")),
        &key.serialize_pem(),
        0o600,
    )?;
    write_new(&pem, &cert.pem(), 0o644)?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_certs_are_written_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        make_ca(dir.path()).expect("ca");
        let pem = make_node(
            dir.path(),
            "gw1",
            &["localhost".into(), "127.0.0.1".into()],
            dir.path(),
        )
        .expect("node");
        assert!(
            std::fs::read_to_string(pem)
                .expect("read")
                .contains("BEGIN CERTIFICATE")
        );
        let mode = std::fs::metadata(dir.path().join("gw1.key")).expect("meta");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        assert!(matches!(make_ca(dir.path()), Err(CertError::Exists(_))));
        let pem = make_publisher(dir.path(), "ci-publisher", dir.path()).expect("publisher");
        assert!(pem.ends_with("ci-publisher.pem"));
        assert!(matches!(
            make_publisher(dir.path(), "ci-publisher", dir.path()),
            Err(CertError::Exists(_))
        ));
    }

    #[test]
    fn a_name_that_is_not_a_node_name_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        make_ca(dir.path()).expect("ca");
        let out = dir.path().join("out");
        for bad in ["", "../gw1", "gw 1", "a/b"] {
            assert!(matches!(
                make_publisher(dir.path(), bad, &out),
                Err(CertError::Name(_))
            ));
            assert!(matches!(
                make_node(dir.path(), bad, &["localhost".into()], &out),
                Err(CertError::Name(_))
            ));
        }
        assert!(!out.exists());
    }
}
