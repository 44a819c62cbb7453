//! Mutual TLS between peers: certificates from `artisync cert`, `https://` peer addresses.

use std::process::Command;

use crate::common::*;

fn cert(args: &[&str]) {
    let out = Command::new(BIN)
        .arg("cert")
        .args(args)
        .output()
        .expect("run artisync cert");
    assert!(
        out.status.success(),
        "artisync cert {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rewrites a node's config for TLS: `[tls]` with its cert, peers over https.
fn use_tls(node: &Node, pki: &std::path::Path) {
    let text = std::fs::read_to_string(node.config()).expect("read config");
    let tls = format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n",
        pki.join("ca.pem").display(),
        pki.join(format!("{}.pem", node.name)).display(),
        pki.join(format!("{}.key", node.name)).display()
    );
    let text =
        text.replace("http://", "https://")
            .replacen("[[folder]]", &format!("{tls}[[folder]]"), 1);
    std::fs::write(node.config(), text).expect("write config");
}

/// Readiness without the plaintext health probe: the admin socket answers `status`.
fn wait_up(node: &Node) {
    wait_for(
        SYNC_TIMEOUT,
        format!("node {} to answer status", node.name),
        || {
            let out = node.cli(&["status", "--json"]);
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        },
    );
}

/// A new CA with a certificate for each of `names` (valid for 127.0.0.1), from `artisync cert`.
fn new_pki(names: &[&str]) -> tempfile::TempDir {
    let pki = tempfile::tempdir().expect("tempdir");
    let dir = pki.path().to_str().expect("utf-8 temp path");
    cert(&["ca", "--out", dir]);
    for name in names {
        cert(&[
            "node",
            "--ca",
            dir,
            "--name",
            name,
            "--host",
            "127.0.0.1",
            "--out",
            dir,
        ]);
    }
    pki
}

fn peer_state(node: &Node) -> serde_json::Value {
    node.status_json()["peers"][0].clone()
}

#[test]
fn peers_sync_over_mutual_tls_and_refuse_a_foreign_certificate() {
    let mut cluster = Cluster::full_mesh(2);
    let pki = new_pki(&["a", "b"]);
    use_tls(&cluster[0], pki.path());
    use_tls(&cluster[1], pki.path());
    cluster[0].start_no_wait();
    cluster[1].start_no_wait();
    wait_up(&cluster[0]);
    wait_up(&cluster[1]);

    let (a, b) = (&cluster[0], &cluster[1]);
    write(
        &a.synapse().join("default/api/tls.xml"),
        "<api name=\"tls\"/>\n",
    );
    wait_content(
        &b.synapse().join("default/api/tls.xml"),
        b"<api name=\"tls\"/>\n",
    );
    write(&b.plans().join("back.siddhiql"), "@Plan:name('back')\n");
    wait_content(&a.plans().join("back.siddhiql"), b"@Plan:name('back')\n");
    assert_eq!(peer_state(a)["connected"], true);

    // A node that trusts the cluster CA but presents a certificate from another CA is refused
    // by B's client-certificate check, and gets none of B's files.
    let mut intruder_cluster = Cluster::new(&[&[]]);
    let intruder = &mut intruder_cluster[0];
    let other = new_pki(&["a"]);
    let d = other.path().to_str().expect("utf-8 temp path");
    let text = format!(
        "node = \"a\"\nlisten = \"127.0.0.1:{}\"\nstate_dir = \"{}\"\n\n[tls]\nca = \"{}\"\ncert = \"{d}/a.pem\"\nkey = \"{d}/a.key\"\n\n[[folder]]\nid = \"{SYNAPSE}\"\npath = \"{}\"\n\n[[peer]]\nname = \"b\"\naddress = \"https://127.0.0.1:{}\"\n",
        intruder.port,
        intruder.state_dir().display(),
        pki.path().join("ca.pem").display(),
        intruder.synapse().display(),
        b.port,
    );
    std::fs::write(intruder.config(), text).expect("write intruder config");
    intruder.start_no_wait();
    wait_up(intruder);
    wait_for(SYNC_TIMEOUT, "the intruder's TLS handshake to fail", || {
        let p = peer_state(intruder);
        match (&p["connected"], p["last_error"].as_str()) {
            (serde_json::Value::Bool(false), Some(e)) if !e.is_empty() => Ok(()),
            _ => Err(format!("intruder's peer state: {p}")),
        }
    });
    holds_for(
        std::time::Duration::from_millis(500),
        "B's files staying off the intruder",
        || {
            if intruder.synapse().join("default/api/tls.xml").exists() {
                Err("a node with a foreign certificate got B's files".into())
            } else {
                Ok(())
            }
        },
    );
}

/// `artisync cert publisher --ca DIR --name N --out DIR`.
fn new_publisher(pki: &std::path::Path, name: &str) {
    let dir = pki.to_str().expect("utf-8 temp path");
    cert(&["publisher", "--ca", dir, "--name", name, "--out", dir]);
}

/// Rewrites `node`'s config as a TLS agent (its certificate from `pki`, named after the node)
/// with the database, serving the hub and the saver; `publishers` goes to
/// `[retriever] publishers`. Starts it and waits until it answers.
fn start_tls_db_agent(node: &mut Node, pki: &std::path::Path, publishers: &[&str]) {
    let dir = pki.to_str().expect("utf-8 temp path");
    let list: Vec<String> = publishers.iter().map(|p| format!("{p:?}")).collect();
    let text = format!(
        "node = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{state}\"\n\n\
         [tls]\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/{name}.pem\"\nkey = \"{dir}/{name}.key\"\n\n\
         [[folder]]\nid = \"{SYNAPSE}\"\npath = \"{synapse}\"\n\n\
         [retriever]\nartifact_retriever = \"db\"\nfolder = \"{SYNAPSE}\"\n\
         database_url = \"sqlite://{state}/artifacts.db\"\ngateway_labels = [\"L1\"]\n\
         publishers = [{list}]\n",
        name = node.name,
        port = node.port,
        state = node.state_dir().display(),
        synapse = node.synapse().display(),
        list = list.join(", "),
    );
    std::fs::write(node.config(), text).expect("write config");
    node.start_no_wait();
    wait_up(node);
}

/// A tonic channel to `node` over mutual TLS, presenting `pki/<holder>.pem`.
async fn channel_as(
    node_port: u16,
    pki: &std::path::Path,
    holder: &str,
) -> tonic::transport::Channel {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = artisync::config::TlsConfig {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{holder}.pem")),
        key: pki.join(format!("{holder}.key")),
    };
    artisync::net::channel(
        &format!("https://127.0.0.1:{node_port}"),
        Some(&tls),
        "test",
    )
    .await
    .expect("channel")
}

async fn subscribe_as(
    port: u16,
    pki: &std::path::Path,
    holder: &str,
    claimed: &str,
) -> Result<(), tonic::Status> {
    use artisync::pb::sync::{SubscribeRequest, peer_client::PeerClient};
    let mut client = PeerClient::new(channel_as(port, pki, holder).await);
    client
        .subscribe(SubscribeRequest {
            node_id: 0x5eed_0003,
            node_name: claimed.into(),
            folders: vec![artisync::pb::sync::FolderCursor {
                folder: "synapse-configs".into(),
                ..Default::default()
            }],
        })
        .await
        .map(drop)
}

/// The log text without terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Issue 12: with TLS, a peer's certificate name must match the node it claims to be. A
/// cluster certificate for gw3 subscribing as gw2 is refused, and the agent says so in its log.
#[test]
fn a_subscriber_claiming_another_node_than_its_certificate_names_is_refused() {
    let mut cluster = Cluster::new(&[&[]]);
    let pki = new_pki(&["a", "gw3"]);
    start_tls_db_agent(&mut cluster[0], pki.path(), &[]);
    let node = &cluster[0];
    runtime().block_on(async {
        let refused = subscribe_as(node.port, pki.path(), "gw3", "gw2")
            .await
            .expect_err("gw3's certificate subscribing as gw2");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("gw2"), "{refused:?}");
        subscribe_as(node.port, pki.path(), "gw3", "gw3")
            .await
            .expect("gw3 subscribing as itself");
    });
    wait_for(SYNC_TIMEOUT, "the refusal in the agent's log", || {
        let log = strip_ansi(&std::fs::read_to_string(node.log_path()).unwrap_or_default());
        match log
            .lines()
            .find(|l| l.contains("refused a subscriber") && l.contains("cert_name=gw3"))
        {
            Some(line) if line.contains("peer=gw2") && line.contains("remote=127.0.0.1") => Ok(()),
            other => Err(format!(
                "no refusal with peer, cert name and remote: {other:?}"
            )),
        }
    });
}

/// Issue 12: a publisher certificate may only publish and remove; the peer protocol and the
/// hub's reads need a cluster node certificate.
#[test]
fn a_publisher_certificate_may_not_subscribe_fetch_or_read_the_hub() {
    let mut cluster = Cluster::new(&[&[]]);
    let pki = new_pki(&["a", "gw3"]);
    new_publisher(pki.path(), "ci-publisher");
    start_tls_db_agent(&mut cluster[0], pki.path(), &["ci-publisher"]);
    let port = cluster[0].port;
    runtime().block_on(async {
        use artisync::pb::artifacts::{
            CurrentRequest, LastEventIdRequest, artifact_hub_client::ArtifactHubClient,
        };
        use artisync::pb::sync::{FetchRequest, peer_client::PeerClient};
        let denied = |what: &str, r: Result<(), tonic::Status>| match r {
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                assert!(s.message().contains("publisher"), "{what}: {s:?}");
            }
            other => panic!("{what} with a publisher certificate: {other:?}"),
        };
        denied(
            "Subscribe",
            subscribe_as(port, pki.path(), "ci-publisher", "ci-publisher").await,
        );
        let mut peer = PeerClient::new(channel_as(port, pki.path(), "ci-publisher").await);
        denied(
            "Fetch",
            peer.fetch(FetchRequest {
                folder: SYNAPSE.into(),
                path: "x.xml".into(),
                hash: vec![0; 32],
            })
            .await
            .map(drop),
        );
        let mut hub = ArtifactHubClient::new(channel_as(port, pki.path(), "ci-publisher").await);
        denied(
            "ArtifactHub.Current",
            hub.current(CurrentRequest {
                labels: vec!["L1".into()],
            })
            .await
            .map(drop),
        );
        denied(
            "ArtifactHub.LastEventId",
            hub.last_event_id(LastEventIdRequest {}).await.map(drop),
        );
        // A cluster node certificate reads the hub.
        let mut hub = ArtifactHubClient::new(channel_as(port, pki.path(), "gw3").await);
        hub.current(CurrentRequest {
            labels: vec!["L1".into()],
        })
        .await
        .expect("a node certificate reads the hub");
    });
}

/// `artisync artifact publish --hub https://...`: the publisher presents a publisher
/// certificate (`artisync cert publisher`) whose name the agent lists in `[retriever]
/// publishers`; the agent saves the artifact in its database and its retriever deploys it.
/// Issue 12: a cluster node certificate, or a publisher certificate not listed, is refused.
#[test]
fn only_a_listed_publisher_certificate_saves_through_an_agent_over_mutual_tls() {
    let mut cluster = Cluster::new(&[&[]]);
    let pki = new_pki(&["a", "gw3"]);
    new_publisher(pki.path(), "ci-publisher");
    new_publisher(pki.path(), "rogue");
    let dir = pki.path().to_str().expect("utf-8 temp path");
    start_tls_db_agent(&mut cluster[0], pki.path(), &["ci-publisher"]);
    let hub = &cluster[0];

    let from = tempfile::tempdir().expect("tempdir");
    write(
        &from.path().join("default/api/secure.xml"),
        "<api name=\"secure\"/>\n",
    );
    let address = format!("https://127.0.0.1:{}", hub.port);
    let ca = format!("{dir}/ca.pem");
    let as_holder = |holder: &str| {
        vec![
            "--ca".to_owned(),
            ca.clone(),
            "--cert".to_owned(),
            format!("{dir}/{holder}.pem"),
            "--key".to_owned(),
            format!("{dir}/{holder}.key"),
        ]
    };
    let publish = |tls: &[String]| {
        let mut args = vec!["artifact", "publish", "--hub", address.as_str()];
        args.extend(tls.iter().map(String::as_str));
        args.extend_from_slice(&[
            "--id",
            "9b2c1f4e-5a6d-4e3f-8a1b-2c3d4e5f6a7b",
            "--name",
            "SecureAPI",
            "--version",
            "1.0.0",
            "--label",
            "L1",
            "--from",
            from.path().to_str().expect("utf-8 temp path"),
        ]);
        Command::new(BIN)
            .args(&args)
            .output()
            .expect("run artisync artifact publish")
    };
    let remove = |tls: &[String]| {
        let mut args = vec!["artifact", "remove", "--hub", address.as_str()];
        args.extend(tls.iter().map(String::as_str));
        args.extend_from_slice(&["--id", "9b2c1f4e-5a6d-4e3f-8a1b-2c3d4e5f6a7b"]);
        Command::new(BIN)
            .args(&args)
            .output()
            .expect("run artisync artifact remove")
    };
    let refused = |out: std::process::Output, needle: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "should be refused: {stderr}");
        assert!(stderr.contains(needle), "{needle:?} in: {stderr}");
    };
    // An https hub without a client certificate is refused by the CLI itself, naming the flags.
    refused(publish(&[]), "--ca, --cert and --key");
    // A cluster node certificate may not publish or remove.
    refused(publish(&as_holder("gw3")), "node certificate");
    refused(publish(&as_holder("a")), "node certificate");
    // A publisher certificate the agent does not list may not either.
    refused(publish(&as_holder("rogue")), "[retriever] publishers");

    let saved = publish(&as_holder("ci-publisher"));
    assert!(
        saved.status.success(),
        "publish over mutual TLS: {}",
        String::from_utf8_lossy(&saved.stderr)
    );
    assert!(String::from_utf8_lossy(&saved.stdout).contains("revision 1"));
    wait_content(
        &hub.synapse().join("default/api/secure.xml"),
        b"<api name=\"secure\"/>\n",
    );
    refused(remove(&as_holder("gw3")), "node certificate");
    refused(remove(&as_holder("rogue")), "[retriever] publishers");
    assert!(hub.synapse().join("default/api/secure.xml").exists());
    let removed = remove(&as_holder("ci-publisher"));
    assert!(
        removed.status.success(),
        "remove over mutual TLS: {}",
        String::from_utf8_lossy(&removed.stderr)
    );
    wait_gone(&hub.synapse().join("default/api/secure.xml"));
}
