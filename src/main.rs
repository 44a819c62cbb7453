//! The `artisync` binary: a thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use artisync::config::Config;

#[derive(Parser)]
#[command(
    name = "artisync",
    version,
    about = "Keeps the artifact folders of an API-gateway cluster identical"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (logs to stderr; SIGTERM shuts down gracefully).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Log format: `text` or `json`.
        #[arg(long, default_value = "text")]
        log_format: String,
    },
    /// Show the running agent's folders and peers.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List kept conflict copies (the losing sides of concurrent edits).
    Conflicts {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Confirm a folder paused by the mass-delete guard: its current state is intended.
    Resume {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        folder: String,
    },
    /// Check a config file and exit.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the TLS material: a private CA, one certificate per node, and publishers'.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Save, remove and inspect DB-backed artifacts; act on this node's deployed ones.
    #[command(subcommand)]
    Artifact(Box<ArtifactCommand>),
    /// Start a local cluster on loopback in a temp dir and show sync as it happens.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 200)]
        apis: usize,
        /// Keep the demo's directory afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Print a shell completion script to stdout, e.g.
    /// `artisync completions bash > /etc/bash_completion.d/artisync`.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the man page (roff) to stdout: `artisync man > artisync.1`; with `--dir`, write
    /// artisync.1 and one page per subcommand (artisync-run.1, ...) into that directory.
    #[command(hide = true)]
    Man {
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// The shells `artisync completions` writes scripts for (those the packages install).
#[derive(Clone, Copy, clap::ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// Where artifacts are saved, and the client certificate for an agent reached over https.
#[derive(clap::Args)]
struct Target {
    #[command(flatten)]
    to: Destination,
    /// With `--hub https://...`: the cluster's CA certificate (PEM). An agent takes publish
    /// and remove from another host only over mutual TLS.
    #[arg(long, requires_all = ["hub", "cert", "key"])]
    ca: Option<PathBuf>,
    /// With `--hub https://...`: this publisher's certificate (PEM) from `artisync cert
    /// publisher`, whose name the agent lists in `[retriever] publishers`.
    #[arg(long, requires_all = ["hub", "ca", "key"])]
    cert: Option<PathBuf>,
    /// With `--hub https://...`: this publisher's private key (PEM).
    #[arg(long, requires_all = ["hub", "ca", "cert"])]
    key: Option<PathBuf>,
}

/// A database URL, a config's `[retriever] database_url`, or an agent with database access
/// (its `ArtifactSaver` service).
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Destination {
    /// sqlite:///path.db, postgres://user@host/db or mysql://user@host/db
    #[arg(long)]
    db: Option<String>,
    /// Use `[retriever] database_url` of this config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address of an agent with database access, e.g. http://127.0.0.1:7701 (on its own
    /// machine) or https://gw1.example:7701 with --ca, --cert and --key.
    #[arg(long)]
    hub: Option<String>,
}

#[derive(Subcommand)]
enum ArtifactCommand {
    /// Save every file under --from as a new revision of the artifact.
    Publish {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = "carbon.super")]
        tenant: String,
        /// Gateway label (repeatable).
        #[arg(long = "label", required = true)]
        labels: Vec<String>,
        /// Folder id the files deploy into on the retrieving nodes.
        #[arg(long, default_value = "synapse-configs")]
        folder: String,
        #[arg(long)]
        from: PathBuf,
    },
    /// Remove an artifact from one label, or from all.
    Remove {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: String,
        #[arg(long)]
        label: Option<String>,
    },
    /// List artifacts, labels and revisions.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// What the retriever deployed on this node, and what is failing.
    Deployed {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Fetch and write an artifact again on this node.
    Redeploy {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: String,
    },
    /// Remove an artifact's files from this node only.
    Undeploy {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        id: String,
    },
}

enum Saver {
    Db(artisync::artifacts::db::ArtifactDb),
    Hub(
        artisync::pb::artifacts::artifact_saver_client::ArtifactSaverClient<
            tonic::transport::Channel,
        >,
    ),
}

async fn saver(target: &Target) -> Result<Saver> {
    use artisync::artifacts::db::ArtifactDb;
    use artisync::config::{RetrieverSource, Schema};
    if let Some(url) = &target.to.db {
        return Ok(Saver::Db(ArtifactDb::connect(url).await?));
    }
    if let Some(path) = &target.to.config {
        let config = load(path)?;
        let url = match config.retriever.map(|r| r.source) {
            Some(RetrieverSource::Db {
                url,
                schema: Schema::Artisync,
            }) => url,
            Some(RetrieverSource::Db {
                schema: schema @ Schema::Wso2Apim32,
                ..
            }) => anyhow::bail!(
                "{}: [retriever] schema = {:?} reads WSO2's own tables, which artisync never \
                 writes (nor creates its tables beside them): publish and remove through WSO2 \
                 API-M; `artisync artifact deployed --config` shows what this node deployed",
                path.display(),
                schema.as_str()
            ),
            Some(RetrieverSource::Hub { .. }) | None => {
                anyhow::bail!("{}: no [retriever] database_url", path.display())
            }
        };
        return Ok(Saver::Db(ArtifactDb::connect(&url).await?));
    }
    let hub = target
        .to
        .hub
        .as_deref()
        .context("give --db, --config or --hub")?;
    let (secure, _) =
        artisync::config::parse_peer_address(hub).map_err(|e| anyhow::anyhow!("--hub: {e}"))?;
    let tls = match (&target.ca, &target.cert, &target.key) {
        (Some(ca), Some(cert), Some(key)) => Some(artisync::config::TlsConfig {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    match (secure, tls.is_some()) {
        (true, false) => {
            anyhow::bail!("--hub {hub}: an https address needs --ca, --cert and --key")
        }
        (false, true) => anyhow::bail!("--hub {hub}: --ca, --cert and --key need an https address"),
        _ => {}
    }
    let channel = artisync::net::channel(hub, tls.as_ref(), "hub").await?;
    Ok(Saver::Hub(
        artisync::pb::artifacts::artifact_saver_client::ArtifactSaverClient::new(channel)
            .max_encoding_message_size(artisync::net::MAX_MESSAGE_BYTES),
    ))
}

async fn artifact(cmd: ArtifactCommand) -> Result<()> {
    use artisync::artifacts::{self, Bundle, check_field, parse_id};
    match cmd {
        ArtifactCommand::Publish {
            target,
            id,
            name,
            version,
            tenant,
            labels,
            folder,
            from,
        } => {
            let id = parse_id(&id)?;
            check_field("--name", &name)?;
            check_field("--version", &version)?;
            check_field("--tenant", &tenant)?;
            check_field("--folder", &folder)?;
            for l in &labels {
                check_field("--label", l)?;
            }
            let mut labels = labels;
            labels.sort();
            labels.dedup();
            let bundle = Bundle::from_dir(&from)?;
            let files = bundle.files.len();
            let revision = match saver(&target).await? {
                Saver::Db(db) => {
                    let meta = artifacts::db::NewArtifact {
                        id: id.clone(),
                        name,
                        version,
                        tenant,
                        folder,
                        labels,
                    };
                    db.publish(&meta, &bundle, artisync::now_ms()).await?
                }
                Saver::Hub(mut client) => {
                    let req = artisync::pb::artifacts::PublishRequest {
                        id: id.clone(),
                        name,
                        version,
                        tenant,
                        folder,
                        labels,
                        files: bundle
                            .files
                            .into_iter()
                            .map(|f| artisync::pb::artifacts::File {
                                path: f.path.to_string(),
                                mode: f.mode,
                                data: f.data,
                            })
                            .collect(),
                    };
                    client
                        .publish(req)
                        .await
                        .map_err(|s| anyhow::anyhow!("hub: {}", s.message()))?
                        .into_inner()
                        .revision
                }
            };
            println!("published artifact {id} revision {revision} ({files} files)");
        }
        ArtifactCommand::Remove { target, id, label } => {
            let id = parse_id(&id)?;
            let removed = match saver(&target).await? {
                Saver::Db(db) => db.remove(&id, label.as_deref(), artisync::now_ms()).await?,
                Saver::Hub(mut client) => {
                    client
                        .remove(artisync::pb::artifacts::RemoveRequest {
                            id: id.clone(),
                            label,
                        })
                        .await
                        .map_err(|s| anyhow::anyhow!("hub: {}", s.message()))?
                        .into_inner()
                        .labels
                }
            };
            println!("removed artifact {id} from labels {removed:?}");
        }
        ArtifactCommand::List { target, json } => {
            let Saver::Db(db) = saver(&target).await? else {
                bail!("list needs --db or --config (a database), not --hub");
            };
            let list = db.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                if list.is_empty() {
                    println!("no artifacts");
                }
                for a in list {
                    println!(
                        "{}  {} {}  rev {}  {}  labels {:?}  {} bytes{}",
                        a.id,
                        a.name,
                        a.version,
                        a.revision,
                        a.folder,
                        a.labels,
                        a.size,
                        if a.removed { "  (removed)" } else { "" }
                    );
                }
            }
        }
        ArtifactCommand::Deployed { config, json } => {
            let text = admin(&config, "deployed", None).await?;
            if json {
                println!("{text}");
            } else {
                let s: artisync::artifacts::retriever::RetrieverStatus =
                    serde_json::from_str(&text).context("agent sent an unreadable answer")?;
                print!("{}", artisync::demo::render_retriever(&s));
            }
        }
        ArtifactCommand::Redeploy { config, id } => {
            let text = admin(&config, "redeploy", Some(id)).await?;
            let v: serde_json::Value =
                serde_json::from_str(&text).context("agent sent an unreadable answer")?;
            println!("{}", v["result"].as_str().unwrap_or(&text));
        }
        ArtifactCommand::Undeploy { config, id } => {
            let text = admin(&config, "undeploy", Some(id)).await?;
            let v: serde_json::Value =
                serde_json::from_str(&text).context("agent sent an unreadable answer")?;
            println!("{}", v["result"].as_str().unwrap_or(&text));
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create DIR/ca.pem and DIR/ca.key.
    Ca {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue OUT/NAME.pem and OUT/NAME.key signed by the CA in --ca.
    Node {
        #[arg(long)]
        ca: PathBuf,
        /// Node name (the certificate's common name).
        #[arg(long)]
        name: String,
        /// DNS name or IP address peers use to reach this node (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue OUT/NAME.pem and OUT/NAME.key for a publisher (client only), for
    /// `artifact publish|remove --hub https://...`; the agent lists NAME in
    /// `[retriever] publishers`.
    Publisher {
        #[arg(long)]
        ca: PathBuf,
        /// Publisher name (the certificate's common name, as listed in `publishers`).
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn init_logging(format: &str, default: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARTISYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A stderr that breaks (its reader gone) loses log lines, not the agent: by default
    // tracing-subscriber reports a failed write with `eprint!`, which panics then.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => bail!("--log-format {other:?}: use text or json"),
    }
    Ok(())
}

fn load(config: &std::path::Path) -> Result<Config> {
    Ok(Config::load(config)?)
}

async fn shutdown_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    cancel.cancel();
}

async fn admin(config: &std::path::Path, what: &str, folder: Option<String>) -> Result<String> {
    let config = load(config)?;
    Ok(artisync::admin::call(&config.admin_socket(), what, folder).await?)
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config, log_format } => {
            init_logging(&log_format, "info")?;
            let config = load(&config)?;
            let cancel = CancellationToken::new();
            tokio::spawn(shutdown_signal(cancel.clone()));
            artisync::daemon::run(config, cancel, None).await?;
        }
        Command::Status { config, json } => {
            let text = admin(&config, "status", None).await?;
            if json {
                println!("{text}");
            } else {
                let report: artisync::admin::StatusReport =
                    serde_json::from_str(&text).context("agent sent an unreadable status")?;
                print!("{}", artisync::demo::render_status(&report));
            }
        }
        Command::Conflicts { config, json } => {
            let text = admin(&config, "conflicts", None).await?;
            if json {
                println!("{text}");
            } else {
                let list: Vec<serde_json::Value> =
                    serde_json::from_str(&text).context("agent sent an unreadable list")?;
                if list.is_empty() {
                    println!("no conflicts");
                }
                for c in list {
                    println!(
                        "{}/{}  lost to node {}  kept at {}",
                        c["folder"].as_str().unwrap_or("?"),
                        c["path"].as_str().unwrap_or("?"),
                        c["winner_node"].as_str().unwrap_or("?"),
                        c["copy"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        Command::Resume { config, folder } => {
            let text = admin(&config, "resume", Some(folder)).await?;
            let v: serde_json::Value =
                serde_json::from_str(&text).context("agent sent an unreadable answer")?;
            println!("{}", v["result"].as_str().unwrap_or(&text));
        }
        Command::CheckConfig { config } => {
            let c = load(&config)?;
            let count = |n: usize, one: &str| {
                if n == 1 {
                    format!("1 {one}")
                } else {
                    format!("{n} {one}s")
                }
            };
            let metrics = match &c.metrics {
                Some(m) => format!(", metrics at http://{}/metrics", m.listen),
                None => String::new(),
            };
            println!(
                "{}: ok (node {}, {}, {}{metrics})",
                config.display(),
                c.node,
                count(c.folders.len(), "folder"),
                count(c.peers.len(), "peer")
            );
        }
        Command::Cert(CertCommand::Ca { out }) => {
            let pem = artisync::cert::make_ca(&out)?;
            println!(
                "CA certificate {} (key beside it, mode 0600)",
                pem.display()
            );
        }
        Command::Cert(CertCommand::Node {
            ca,
            name,
            hosts,
            out,
        }) => {
            let pem = artisync::cert::make_node(&ca, &name, &hosts, &out)?;
            println!(
                "node certificate {} for {}",
                pem.display(),
                hosts.join(", ")
            );
        }
        Command::Cert(CertCommand::Publisher { ca, name, out }) => {
            let pem = artisync::cert::make_publisher(&ca, &name, &out)?;
            println!(
                "publisher certificate {} (list {name:?} in the agent's [retriever] publishers)",
                pem.display()
            );
        }
        Command::Artifact(cmd) => artifact(*cmd).await?,
        Command::Demo { nodes, apis, keep } => {
            // The agents' log lines would break up the narration on the terminal: they go to
            // a file the demo names (kept after the demo, like any log).
            let (log_file, log) = tempfile::Builder::new()
                .prefix("artisync-demo-")
                .suffix(".log")
                .tempfile()
                .context("cannot create the demo's log file")?
                .keep()
                .context("cannot keep the demo's log file")?;
            let filter = tracing_subscriber::EnvFilter::try_from_env("ARTISYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(log_file))
                .log_internal_errors(false)
                .init();
            artisync::demo::run(artisync::demo::DemoOptions {
                nodes,
                apis,
                keep,
                log: Some(log),
            })
            .await?;
        }
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            // Into a buffer first: `generate` panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "artisync", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .context("cannot write the completion script")?;
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .context("cannot render the man page")?;
            std::io::Write::write_all(&mut std::io::stdout(), &page)
                .context("cannot write the man page")?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        say_err("artisync: warning: a TLS crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say_err(&format!("artisync: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say_err(&format!("artisync: {e:#}"));
            ExitCode::FAILURE
        }
    };
    // Dropping the runtime would wait for every blocking thread, and one stuck in the kernel
    // (the work of a stalled engine) would hold up the exit for good.
    runtime.shutdown_timeout(RUNTIME_EXIT_WAIT);
    code
}

/// Writes a line to stderr; a broken stderr is ignored (`eprintln!` would panic).
fn say_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// How long the exit waits for blocking work still running after the agent stopped.
const RUNTIME_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
