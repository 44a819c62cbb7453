//! The config's tests: parsing, defaults, and every key's validation by name.

use std::collections::BTreeMap;

use super::*;

fn base(dir: &Path) -> String {
    format!(
        "node = \"gw1\"\nlisten = \"127.0.0.1:7701\"\nstate_dir = \"{}/state\"\n\n[[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n",
        dir.display(),
        dir.join("sc").display()
    )
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("sc")).expect("mkdir");
    dir
}

fn err_of(text: &str) -> String {
    match Config::parse(text, Path::new("test.toml")) {
        Ok(_) => panic!("config should have been refused:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_parses_with_defaults() {
    let dir = setup();
    let c = Config::parse(&base(dir.path()), Path::new("t")).expect("valid");
    assert_eq!(c.quiet_period_ms, 25);
    assert_eq!(c.rescan_interval_secs, 3600);
    assert_eq!(c.folders[0].id, "synapse-configs");
    assert!(c.folders[0].xml_gate);
    assert_eq!(c.skip_retry_ms, 60_000);
}

#[test]
fn skip_retry_out_of_range_is_named() {
    let dir = setup();
    for bad in ["0", "99", "3600001"] {
        let e = err_of(&format!("skip_retry_ms = {bad}\n{}", base(dir.path())));
        assert!(e.contains("skip_retry_ms"), "{e}");
    }
    let text = format!("skip_retry_ms = 500\n{}", base(dir.path()));
    let c = Config::parse(&text, Path::new("t")).expect("valid");
    assert_eq!(c.skip_retry_ms, 500);
}

/// Found with the config fuzz harness (tests/fuzz/config/): a TTL of more days than fit in a u64 of seconds
/// passed check-config, then overflowed when the daemon computed it (wrapped in a
/// release build, to a TTL that purges tombstones early); 0 purged every tombstone.
#[test]
fn tombstone_ttl_out_of_range_is_named() {
    let dir = setup();
    for bad in ["0", "36501", "9223372036854775807"] {
        let e = err_of(&format!("tombstone_ttl_days = {bad}\n{}", base(dir.path())));
        assert!(e.contains("tombstone_ttl_days"), "{e}");
    }
    let text = format!("tombstone_ttl_days = 36500\n{}", base(dir.path()));
    let c = Config::parse(&text, Path::new("t")).expect("valid");
    assert_eq!(c.tombstone_ttl().as_secs(), 36_500 * 24 * 3600);
}

#[test]
fn max_clock_skew_defaults_to_five_minutes_and_out_of_range_is_named() {
    let dir = setup();
    let c = Config::parse(&base(dir.path()), Path::new("t")).expect("valid");
    assert_eq!(c.max_clock_skew_ms, 300_000);
    for bad in ["0", "604800001"] {
        let e = err_of(&format!("max_clock_skew_ms = {bad}\n{}", base(dir.path())));
        assert!(e.contains("max_clock_skew_ms"), "{e}");
    }
    let text = format!("max_clock_skew_ms = 2000\n{}", base(dir.path()));
    let c = Config::parse(&text, Path::new("t")).expect("valid");
    assert_eq!(c.max_clock_skew_ms, 2000);
}

#[test]
fn unknown_key_is_named() {
    let dir = setup();
    let e = err_of(&format!("{}colour = \"blue\"\n", base(dir.path())));
    assert!(e.contains("colour"), "{e}");
}

#[test]
fn missing_folder_path_is_named() {
    let dir = setup();
    let text = base(dir.path()).replace("/sc\"", "/nope\"");
    let e = err_of(&text);
    assert!(e.contains("folder[0].path") && e.contains("nope"), "{e}");
}

#[test]
fn duplicate_folder_id_is_named() {
    let dir = setup();
    std::fs::create_dir(dir.path().join("ep")).expect("mkdir");
    let e = err_of(&format!(
        "{}\n[[folder]]\nid = \"synapse-configs\"\npath = \"{}\"\n",
        base(dir.path()),
        dir.path().join("ep").display()
    ));
    assert!(e.contains("folder[1].id") && e.contains("duplicate"), "{e}");
}

#[test]
fn peer_problems_are_named() {
    let dir = setup();
    let b = base(dir.path());
    let e = err_of(&format!("{b}\n[[peer]]\nname = \"gw2\"\n"));
    assert!(e.contains("peer[0].address"), "{e}");
    let e = err_of(&format!(
        "{b}\n[[peer]]\nname = \"gw2\"\naddress = \"gw2:7701\"\n"
    ));
    assert!(e.contains("http://"), "{e}");
    let e = err_of(&format!(
        "{b}\n[[peer]]\nname = \"gw2\"\naddress = \"http://10.1.2.3:7701\"\n"
    ));
    assert!(e.contains("non-loopback"), "{e}");
    let e = err_of(&format!(
        "{b}\n[[peer]]\nname = \"gw2\"\naddress = \"http://127.0.0.1:x\"\n"
    ));
    assert!(e.contains("invalid port"), "{e}");
    let e = err_of(&format!(
        "{b}\n[[peer]]\nname = \"gw1\"\naddress = \"http://127.0.0.1:1\"\n"
    ));
    assert!(e.contains("own peer"), "{e}");
}

#[test]
fn metrics_are_off_by_default_and_a_non_loopback_endpoint_needs_its_own_insecure() {
    let dir = setup();
    let b = base(dir.path());
    let c = Config::parse(&b, Path::new("t")).expect("no [metrics]");
    assert!(c.metrics.is_none());
    let c = Config::parse(
        &format!("{b}\n[metrics]\nlisten = \"127.0.0.1:9464\"\n"),
        Path::new("t"),
    )
    .expect("loopback");
    assert_eq!(
        c.metrics.map(|m| m.listen.to_string()).as_deref(),
        Some("127.0.0.1:9464")
    );
    let open = format!("{b}\n[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    let e = err_of(&open);
    assert!(
        e.contains("`metrics.listen`") && e.contains("plaintext") && e.contains("insecure"),
        "{e}"
    );
    // The peers' insecure does not cover the metrics endpoint.
    let e = err_of(&open.replace("node = \"gw1\"", "node = \"gw1\"\ninsecure = true"));
    assert!(e.contains("`metrics.listen`"), "{e}");
    Config::parse(&format!("{open}insecure = true\n"), Path::new("t"))
        .expect("metrics.insecure allows it");
    let e = err_of(&format!("{b}\n[metrics]\nlisten = \"127.0.0.1:7701\"\n"));
    assert!(e.contains("gRPC `listen`"), "{e}");
    let e = err_of(&format!(
        "{b}\n[metrics]\nlisten = \"127.0.0.1:9464\"\npath = \"/m\"\n"
    ));
    assert!(e.contains("unknown field") && e.contains("path"), "{e}");
}

#[test]
fn non_loopback_listen_needs_tls_or_insecure() {
    let dir = setup();
    let text = base(dir.path()).replace("127.0.0.1:7701", "0.0.0.0:7701");
    assert!(err_of(&text).contains("`listen`"));
    let ok = text.replace("node = \"gw1\"", "node = \"gw1\"\ninsecure = true");
    Config::parse(&ok, Path::new("t")).expect("insecure allows it");
}

#[test]
fn bad_ignore_glob_and_overlapping_folders_are_named() {
    let dir = setup();
    let e = err_of(&format!("{}ignore = [\"a[\"]\n", base(dir.path())));
    assert!(e.contains("folder[0].ignore[0]"), "{e}");
    std::fs::create_dir(dir.path().join("sc/inner")).expect("mkdir");
    let e = err_of(&format!(
        "{}\n[[folder]]\nid = \"inner\"\npath = \"{}\"\n",
        base(dir.path()),
        dir.path().join("sc/inner").display()
    ));
    assert!(e.contains("overlaps"), "{e}");
}

#[test]
fn retriever_is_validated() {
    let dir = setup();
    let b = base(dir.path());
    let e = err_of(&format!("{b}\n[retriever]\nartifact_retriever = \"db\"\n"));
    assert!(e.contains("retriever.database_url"), "{e}");
    let e = err_of(&format!(
        "{b}\n[retriever]\ndatabase_url = \"oracle://x\"\n"
    ));
    assert!(e.contains("retriever.database_url"), "{e}");
    let e = err_of(&format!(
        "{b}\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\nfolder = \"nope\"\n"
    ));
    assert!(e.contains("retriever.folder"), "{e}");
}

#[test]
fn retriever_tenants_map_domains_to_folders_and_mistakes_are_named() {
    let dir = setup();
    std::fs::create_dir_all(dir.path().join("t1")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("t2")).expect("mkdir");
    let b = format!(
        "{}\n[[folder]]\nid = \"tenant-1\"\npath = \"{}\"\n\n[[folder]]\nid = \"tenant-2\"\npath = \"{}\"\n",
        base(dir.path()),
        dir.path().join("t1").display(),
        dir.path().join("t2").display()
    );
    let db = "\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\nschema = \"wso2-apim-3.2\"\n";
    let c = Config::parse(
        &format!("{b}{db}\n[retriever.tenants]\n\"WSO2.com\" = \"tenant-1\"\n\"acme.org\" = \"tenant-2\"\n"),
        Path::new("t"),
    )
    .expect("valid");
    let r = c.retriever.expect("retriever");
    assert_eq!(
        r.tenants,
        BTreeMap::from([
            ("acme.org".to_owned(), "tenant-2".to_owned()),
            ("wso2.com".to_owned(), "tenant-1".to_owned()),
        ]),
        "domains are kept lower case"
    );
    assert_eq!(
        r.target_folders(),
        vec!["synapse-configs", "tenant-2", "tenant-1"]
    );
    // No map: the super tenant's folder only.
    let c = Config::parse(&format!("{b}{db}"), Path::new("t")).expect("valid");
    assert!(c.retriever.expect("retriever").tenants.is_empty());
    let long = "a".repeat(256);
    for (tenants, needles) in [
        (
            "\"wso2.com\" = \"nope\"".to_owned(),
            vec![
                "retriever.tenants.\"wso2.com\"",
                "\"nope\"",
                "no [[folder]]",
            ],
        ),
        (
            "\"wso2.com\" = \"synapse-configs\"".to_owned(),
            vec!["retriever.tenants.\"wso2.com\"", "super tenant"],
        ),
        (
            "\"Carbon.Super\" = \"tenant-1\"".to_owned(),
            vec!["retriever.tenants.\"Carbon.Super\"", "retriever.folder"],
        ),
        (
            "\"a.com\" = \"tenant-1\"\n\"b.com\" = \"tenant-1\"".to_owned(),
            vec![
                "retriever.tenants.\"b.com\"",
                "\"a.com\"",
                "own synapse-configs",
            ],
        ),
        (
            "\"A.com\" = \"tenant-1\"\n\"a.com\" = \"tenant-2\"".to_owned(),
            vec!["retriever.tenants.\"a.com\"", "twice"],
        ),
        (
            "\"\" = \"tenant-1\"".to_owned(),
            vec!["retriever.tenants.\"\"", "empty"],
        ),
        (
            "\"a b.com\" = \"tenant-1\"".to_owned(),
            vec!["retriever.tenants.\"a b.com\"", "whitespace"],
        ),
        (
            "\"a\\u0007.com\" = \"tenant-1\"".to_owned(),
            vec!["retriever.tenants.\"a\\u{7}.com\"", "control"],
        ),
        (
            format!("\"{long}\" = \"tenant-1\""),
            vec!["retriever.tenants.", "255"],
        ),
    ] {
        let e = err_of(&format!("{b}{db}\n[retriever.tenants]\n{tenants}\n"));
        for needle in needles {
            assert!(e.contains(needle), "{tenants}: {needle:?} not in {e}");
        }
    }
    let e = err_of(&format!("{b}{db}\n[retriever.tenants]\n\"wso2.com\" = 1\n"));
    assert!(
        e.contains("\"wso2.com\" = 1") && e.contains("expected a string"),
        "a non-string folder is shown: {e}"
    );
}

#[test]
fn retriever_modes_become_types() {
    let dir = setup();
    let b = base(dir.path());
    let c = Config::parse(
        &format!(
            "{b}\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:7702\"\n\
             data_retrieval_mode = \"sync\"\n"
        ),
        Path::new("t"),
    )
    .expect("valid");
    let r = c.retriever.expect("retriever");
    assert_eq!(
        r.source,
        RetrieverSource::Hub {
            address: "http://127.0.0.1:7702".into()
        }
    );
    assert!(r.sync_start());
    let e = err_of(&format!(
        "{b}\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\ndata_retrieval_mode = \"later\"\n"
    ));
    assert!(e.contains("retriever.data_retrieval_mode"), "{e}");
    let e = err_of(&format!(
        "{b}\n[retriever]\nartifact_retriever = \"file\"\n"
    ));
    assert!(e.contains("retriever.artifact_retriever"), "{e}");
}

#[test]
fn retriever_schema_is_validated() {
    let dir = setup();
    let b = base(dir.path());
    let db = "\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\n";
    let c = Config::parse(&format!("{b}{db}"), Path::new("t")).expect("valid");
    let r = c.retriever.expect("retriever");
    assert_eq!(
        r.source,
        RetrieverSource::Db {
            url: "sqlite:///tmp/a.db".into(),
            schema: Schema::Artisync
        },
        "the default is artisync's own store"
    );
    assert_eq!(r.data_retrieval_mode, DataRetrievalMode::Async);
    assert!(!r.is_wso2());
    let c = Config::parse(
        &format!("{b}{db}schema = \"wso2-apim-3.2\"\n"),
        Path::new("t"),
    )
    .expect("valid");
    assert!(c.retriever.expect("retriever").is_wso2());
    for bad in ["wso2", "WSO2-APIM-3.2", "wso2-apim-4.0", ""] {
        let e = err_of(&format!("{b}{db}schema = \"{bad}\"\n"));
        assert!(
            e.contains("retriever.schema") && e.contains("wso2-apim-3.2"),
            "{bad:?}: {e}"
        );
    }
    let e = err_of(&format!(
        "{b}\n[retriever]\nartifact_retriever = \"hub\"\nhub = \"http://127.0.0.1:7702\"\nschema = \"wso2-apim-3.2\"\n"
    ));
    assert!(
        e.contains("retriever.schema") && e.contains("artifact_retriever"),
        "{e}"
    );
    let e = err_of(&format!("{b}{db}schema = 3\n"));
    assert!(e.contains("schema"), "a non-string is named too: {e}");
}

/// Issue 12: a state_dir inside a folder had its index, lock and `running` files synced
/// to peers when it did not exist yet at the first start.
#[test]
fn state_dir_inside_a_folder_is_refused_even_before_it_exists() {
    let dir = setup();
    let d = dir.path();
    std::os::unix::fs::symlink(d.join("sc"), d.join("link")).expect("symlink");
    let inside = [
        d.join("sc/state"),
        d.join("sc/deeper/state"),
        d.join("sc/../sc/state"),
        d.join("sc/./x/../state"),
        d.join("link/state"),
        d.join("sc"),
    ];
    for state in inside {
        let text = base(d).replace(
            &format!("{}/state", d.display()),
            &state.display().to_string(),
        );
        let e = err_of(&text);
        assert!(
            e.contains("`state_dir`") && e.contains("\"synapse-configs\""),
            "{}: {e}",
            state.display()
        );
    }
    assert!(!d.join("sc/state").exists() && !d.join("sc/deeper").exists());
    // Beside the folder, even through `..` out of it, is fine.
    let text = base(d).replace(
        &format!("{}/state", d.display()),
        &d.join("sc/../state").display().to_string(),
    );
    Config::parse(&text, Path::new("t")).expect("state_dir beside the folder");
}

#[test]
fn a_folder_inside_state_dir_is_refused() {
    let dir = setup();
    let d = dir.path();
    let text = base(d).replace(&format!("{}/state", d.display()), &d.display().to_string());
    let e = err_of(&text);
    assert!(
        e.contains("`state_dir`") && e.contains("contain folder \"synapse-configs\""),
        "{e}"
    );
}

#[test]
fn retriever_publishers_are_validated() {
    let dir = setup();
    for f in ["ca.pem", "n.pem", "n.key"] {
        std::fs::write(dir.path().join(f), "x").expect("write");
    }
    let d = dir.path().display();
    let tls = format!("[tls]\nca = \"{d}/ca.pem\"\ncert = \"{d}/n.pem\"\nkey = \"{d}/n.key\"\n\n");
    let b = base(dir.path());
    let db = "\n[retriever]\ndatabase_url = \"sqlite:///tmp/a.db\"\n";
    let c = Config::parse(
        &format!("{b}\n{tls}{db}publishers = [\"ci-publisher\"]\n"),
        Path::new("t"),
    )
    .expect("valid");
    assert_eq!(c.retriever.expect("retriever").publishers, ["ci-publisher"]);
    for (bad, needle) in [
        ("[\"\"]", "publishers[0]"),
        ("[\"a/b\"]", "publishers[0]"),
        ("[\"ci\", \"ci\"]", "duplicate"),
    ] {
        let e = err_of(&format!("{b}\n{tls}{db}publishers = {bad}\n"));
        assert!(
            e.contains("retriever.publishers") && e.contains(needle),
            "{e}"
        );
    }
    let e = err_of(&format!("{b}{db}publishers = [\"ci\"]\n"));
    assert!(
        e.contains("retriever.publishers") && e.contains("[tls]"),
        "{e}"
    );
    let e = err_of(&format!(
        "{b}\n{tls}{db}schema = \"wso2-apim-3.2\"\npublishers = [\"ci\"]\n"
    ));
    assert!(e.contains("retriever.publishers"), "{e}");
}

#[test]
fn example_config_in_repo_parses_after_path_substitution() {
    let dir = setup();
    std::fs::create_dir(dir.path().join("ep")).expect("mkdir");
    let text = include_str!("../../examples/gw1.toml")
        .replace(
            "/opt/wso2am/repository/deployment/server/synapse-configs",
            &dir.path().join("sc").display().to_string(),
        )
        .replace(
            "/opt/wso2am/repository/deployment/server/executionplans",
            &dir.path().join("ep").display().to_string(),
        );
    let c = Config::parse(&text, Path::new("examples/gw1.toml")).expect("example is valid");
    assert_eq!(c.folders.len(), 2);
    assert_eq!(c.peers.len(), 1);
}

#[test]
fn names_that_are_not_names_are_refused_where_they_stand() {
    let dir = setup();
    let b = base(dir.path());
    for (from, to, what) in [
        (
            "id = \"synapse-configs\"",
            "id = \"..\"",
            "folder id \"..\"",
        ),
        (
            "id = \"synapse-configs\"",
            "id = \"a/b\"",
            "folder id \"a/b\"",
        ),
        ("node = \"gw1\"", "node = \"gw 1\"", "node name \"gw 1\""),
    ] {
        assert!(b.contains(from), "the base config has {from}");
        let e = err_of(&b.replacen(from, to, 1));
        assert!(e.contains(what) && e.contains("1-64"), "{e}");
    }
}
