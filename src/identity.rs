//! Who is calling: the identity a gRPC caller proves with its client certificate, and the
//! rules each service applies to it. `net` (the `Peer` service) and `artifacts::hub` (the hub
//! and saver services) call the `authorize_*` functions first thing in a handler.
//!
//! With `[tls]` the server requires a client certificate of the cluster's CA (rustls checks
//! the chain); this module reads who the certificate names, as issued by [`crate::cert`]:
//! - a URI SAN `urn:artisync:node:<name>`, or no artisync URI at all (a node certificate
//!   issued before the URI existed): a cluster node called by its common name;
//! - a URI SAN `urn:artisync:publisher:<name>`: a publisher, which may only publish and
//!   remove, and only when the agent's `[retriever] publishers` lists it.
//!
//! The common name must agree with the URI's name, and one certificate holds one role.
//! Without TLS there is no certificate: a caller is only its remote address, and publishing
//! is open to callers on this machine (loopback) only.

use std::net::SocketAddr;

use tonic::{Request, Status};
use tracing::warn;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::cert::{NODE_URI_PREFIX, PUBLISHER_URI_PREFIX};

/// The identity of a gRPC caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext connection (no `[tls]`): nothing is proven but the remote address.
    Unauthenticated { remote: Option<SocketAddr> },
    /// A cluster node's certificate, by node name.
    Node(String),
    /// A publisher certificate (`artisync cert publisher`), by publisher name.
    Publisher(String),
}

impl Caller {
    /// The certificate's name, for logs; `-` without one.
    fn cert_name(&self) -> &str {
        match self {
            Caller::Unauthenticated { .. } => "-",
            Caller::Node(n) | Caller::Publisher(n) => n,
        }
    }
}

/// A client certificate that names no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("client certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("client certificate has no common name")]
    NoName,
    #[error("client certificate has more than one common name or artisync role")]
    Ambiguous,
    #[error("client certificate's common name {cn:?} differs from its artisync name {uri:?}")]
    Mismatch { cn: String, uri: String },
}

/// Reads the identity from a DER client certificate (the leaf).
pub fn identity_of_der(der: &[u8]) -> Result<Caller, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut cns = cert.subject().iter_common_name();
    let cn = match (cns.next(), cns.next()) {
        (Some(cn), None) => cn.as_str().map_err(|_| IdentityError::NoName)?.to_owned(),
        (None, _) => return Err(IdentityError::NoName),
        (Some(_), Some(_)) => return Err(IdentityError::Ambiguous),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut role = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let found = if let Some(n) = uri.strip_prefix(NODE_URI_PREFIX) {
            Caller::Node(n.to_owned())
        } else if let Some(n) = uri.strip_prefix(PUBLISHER_URI_PREFIX) {
            Caller::Publisher(n.to_owned())
        } else {
            continue;
        };
        if role.replace(found).is_some() {
            return Err(IdentityError::Ambiguous);
        }
    }
    let caller = role.unwrap_or_else(|| Caller::Node(cn.clone()));
    if caller.cert_name() != cn {
        return Err(IdentityError::Mismatch {
            cn,
            uri: caller.cert_name().to_owned(),
        });
    }
    Ok(caller)
}

/// The caller of `request`: its client certificate's identity, or unauthenticated on a
/// plaintext connection.
pub fn caller_identity<T>(request: &Request<T>) -> Result<Caller, IdentityError> {
    match request.peer_certs() {
        Some(certs) => match certs.first() {
            Some(leaf) => identity_of_der(leaf.as_ref()),
            None => Err(IdentityError::NoName),
        },
        None => Ok(Caller::Unauthenticated {
            remote: request.remote_addr(),
        }),
    }
}

fn remote_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

fn identify<T>(request: &Request<T>, service: &str) -> Result<Caller, Status> {
    caller_identity(request).map_err(|e| {
        warn!(service, remote = %remote_of(request), error = %e, "refused a client certificate");
        Status::permission_denied(e.to_string())
    })
}

/// `Peer.Subscribe`: a subscriber claiming to be `claimed` (its `node_name`) must hold that
/// node's certificate. Plaintext subscribers are not checked (the listener's rules apply).
pub fn authorize_subscriber<T>(request: &Request<T>, claimed: &str) -> Result<(), Status> {
    match identify(request, "Peer.Subscribe")? {
        Caller::Unauthenticated { .. } => Ok(()),
        Caller::Node(name) if name == claimed => Ok(()),
        Caller::Node(name) => {
            warn!(peer = %claimed, cert_name = %name, remote = %remote_of(request),
                "refused a subscriber whose certificate names another node");
            Err(Status::permission_denied(format!(
                "subscribing as node {claimed:?} needs that node's certificate; this one is \
                 for node {name:?}"
            )))
        }
        publisher @ Caller::Publisher(_) => Err(refuse_publisher(request, &publisher, "Peer")),
    }
}

/// `Peer.Fetch` and the `ArtifactHub` reads: a cluster node (or a plaintext caller); a
/// publisher certificate is refused.
pub fn authorize_cluster_read<T>(request: &Request<T>, service: &str) -> Result<(), Status> {
    match identify(request, service)? {
        Caller::Unauthenticated { .. } | Caller::Node(_) => Ok(()),
        publisher @ Caller::Publisher(_) => Err(refuse_publisher(request, &publisher, service)),
    }
}

fn refuse_publisher<T>(request: &Request<T>, caller: &Caller, service: &str) -> Status {
    warn!(service, cert_name = %caller.cert_name(), remote = %remote_of(request),
        "refused a publisher certificate on a cluster service");
    Status::permission_denied(format!(
        "{service} needs a cluster node certificate; {:?} holds a publisher certificate, which \
         may only publish and remove artifacts",
        caller.cert_name()
    ))
}

/// `ArtifactSaver` (publish, remove): a publisher certificate whose name `publishers` (the
/// `[retriever] publishers` key) lists, or, without TLS, a caller on this machine. A plaintext
/// caller from another host is refused, whatever `insecure` says: whoever reaches the port
/// could otherwise deploy an API, mediation logic included, on every gateway of the labels.
pub fn authorize_publisher<T>(request: &Request<T>, publishers: &[String]) -> Result<(), Status> {
    let caller = identify(request, "ArtifactSaver")?;
    let refusal = match publish_refusal(&caller, publishers) {
        None => return Ok(()),
        Some(reason) => reason,
    };
    warn!(cert_name = %caller.cert_name(), remote = %remote_of(request), reason = %refusal,
        "refused a publish/remove");
    Err(Status::permission_denied(refusal))
}

/// Why `caller` may not publish, or `None` when it may.
fn publish_refusal(caller: &Caller, publishers: &[String]) -> Option<String> {
    match caller {
        Caller::Publisher(name) if publishers.contains(name) => None,
        Caller::Publisher(name) => Some(format!(
            "publisher {name:?} is not listed in this agent's [retriever] publishers"
        )),
        Caller::Node(name) => Some(format!(
            "{name:?} holds a cluster node certificate, which may not publish: issue one with \
             `artisync cert publisher` and list its name in [retriever] publishers"
        )),
        Caller::Unauthenticated { remote } => {
            if remote.is_some_and(|a| a.ip().to_canonical().is_loopback()) {
                return None;
            }
            let from =
                remote.map_or_else(|| "an unknown address".to_owned(), |a| a.ip().to_string());
            Some(format!(
                "publishing through an agent from another host ({from}) needs mutual TLS: \
                 configure [tls] on the agent and publish with a publisher certificate \
                 (`artisync cert publisher`), or publish on the agent's machine or with --db"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert;

    fn der_of(pem: &std::path::Path) -> Vec<u8> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_file(pem).expect("pem").to_vec()
    }

    #[test]
    fn node_and_publisher_certificates_name_their_holder_and_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        cert::make_ca(dir.path()).expect("ca");
        let node =
            cert::make_node(dir.path(), "gw3", &["127.0.0.1".into()], dir.path()).expect("node");
        let publisher =
            cert::make_publisher(dir.path(), "ci-publisher", dir.path()).expect("publisher");
        assert_eq!(
            identity_of_der(&der_of(&node)),
            Ok(Caller::Node("gw3".into()))
        );
        assert_eq!(
            identity_of_der(&der_of(&publisher)),
            Ok(Caller::Publisher("ci-publisher".into()))
        );
        assert!(matches!(
            identity_of_der(b"not a certificate"),
            Err(IdentityError::Parse(_))
        ));
    }

    /// A node certificate from before the role URI: common name and hosts only.
    #[test]
    fn an_older_node_certificate_is_a_node_by_its_common_name() {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gw1");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        assert_eq!(identity_of_der(cert.der()), Ok(Caller::Node("gw1".into())));
    }

    #[test]
    fn a_certificate_whose_names_disagree_or_that_holds_two_roles_is_refused() {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
        let make = |cn: Option<&str>, uris: &[&str]| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name = rcgen::DistinguishedName::new();
            if let Some(cn) = cn {
                p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            }
            for u in uris {
                p.subject_alt_names
                    .push(rcgen::SanType::URI((*u).try_into().expect("ia5")));
            }
            let key = rcgen::KeyPair::generate().expect("key");
            p.signed_by(&key, &issuer).expect("sign").der().to_vec()
        };
        assert!(matches!(
            identity_of_der(&make(Some("gw1"), &["urn:artisync:node:gw2"])),
            Err(IdentityError::Mismatch { .. })
        ));
        assert_eq!(
            identity_of_der(&make(
                Some("ci"),
                &["urn:artisync:node:ci", "urn:artisync:publisher:ci"]
            )),
            Err(IdentityError::Ambiguous)
        );
        assert_eq!(
            identity_of_der(&make(None, &["urn:artisync:publisher:ci"])),
            Err(IdentityError::NoName)
        );
        assert_eq!(
            identity_of_der(&make(Some("ci"), &["https://example.com/x"])),
            Ok(Caller::Node("ci".into())),
            "other URIs are not roles"
        );
    }

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("socket address"))
    }

    #[test]
    fn only_listed_publishers_or_local_plaintext_callers_may_publish() {
        let listed = vec!["ci-publisher".to_owned()];
        let plain = |a| Caller::Unauthenticated { remote: addr(a) };
        for ok in [
            "127.0.0.1:4000",
            "127.8.9.10:4000",
            "[::1]:4000",
            "[::ffff:127.0.0.1]:4000",
        ] {
            assert_eq!(publish_refusal(&plain(ok), &listed), None, "{ok}");
        }
        for refused in [
            "10.0.0.12:4000",
            "[fd00::2]:4000",
            "[::ffff:10.0.0.12]:4000",
        ] {
            let reason = publish_refusal(&plain(refused), &listed).expect("refused");
            assert!(reason.contains("mutual TLS"), "{reason}");
        }
        let unknown = Caller::Unauthenticated { remote: None };
        assert!(
            publish_refusal(&unknown, &listed).is_some(),
            "unknown caller"
        );
        assert_eq!(
            publish_refusal(&Caller::Publisher("ci-publisher".into()), &listed),
            None
        );
        let other = publish_refusal(&Caller::Publisher("other".into()), &listed).expect("refused");
        assert!(other.contains("[retriever] publishers"), "{other}");
        let node = publish_refusal(&Caller::Node("gw1".into()), &listed).expect("refused");
        assert!(node.contains("node certificate"), "{node}");
        assert!(
            publish_refusal(&Caller::Node("ci-publisher".into()), &listed).is_some(),
            "a node certificate named like a listed publisher is still a node"
        );
    }

    #[test]
    fn a_plaintext_request_is_unauthenticated_and_reads_are_open_to_it() {
        let request = Request::new(());
        assert_eq!(
            caller_identity(&request),
            Ok(Caller::Unauthenticated { remote: None })
        );
        assert!(authorize_subscriber(&request, "gw2").is_ok());
        assert!(authorize_cluster_read(&request, "Peer.Fetch").is_ok());
        let refused = authorize_publisher(&request, &[]).expect_err("no remote address");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
