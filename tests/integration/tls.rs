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

/// `artisync artifact publish --hub https://...`: the publisher presents a certificate of the
/// cluster's CA (an agent takes publishes from another host only over mutual TLS); the agent
/// saves the artifact in its database and its retriever deploys it.
#[test]
fn a_publisher_saves_through_an_agent_over_mutual_tls() {
    let mut cluster = Cluster::new(&[&[]]);
    let pki = new_pki(&["hub", "publisher"]);
    let dir = pki.path().to_str().expect("utf-8 temp path");
    let hub = &mut cluster[0];
    let text = format!(
        "node = \"hub\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{state}\"\n\n\
         [tls]\nca = \"{dir}/ca.pem\"\ncert = \"{dir}/hub.pem\"\nkey = \"{dir}/hub.key\"\n\n\
         [[folder]]\nid = \"{SYNAPSE}\"\npath = \"{synapse}\"\n\n\
         [retriever]\nartifact_retriever = \"db\"\nfolder = \"{SYNAPSE}\"\n\
         database_url = \"sqlite://{state}/artifacts.db\"\ngateway_labels = [\"L1\"]\n",
        port = hub.port,
        state = hub.state_dir().display(),
        synapse = hub.synapse().display(),
    );
    std::fs::write(hub.config(), text).expect("write config");
    hub.start_no_wait();
    wait_up(hub);

    let from = tempfile::tempdir().expect("tempdir");
    write(
        &from.path().join("default/api/secure.xml"),
        "<api name=\"secure\"/>\n",
    );
    let address = format!("https://127.0.0.1:{}", hub.port);
    let publish = |tls: &[&str]| {
        let mut args = vec!["artifact", "publish", "--hub", address.as_str()];
        args.extend_from_slice(tls);
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
    // An https hub without a client certificate is refused by the CLI itself, naming the flags.
    let refused = publish(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--ca, --cert and --key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let ca = format!("{dir}/ca.pem");
    let (c, k) = (
        format!("{dir}/publisher.pem"),
        format!("{dir}/publisher.key"),
    );
    let saved = publish(&["--ca", &ca, "--cert", &c, "--key", &k]);
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
}
