//! The `artisync` binary: a thin CLI over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
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
    /// Make the peers' TLS material: a private CA, then one certificate per node.
    #[command(subcommand)]
    Cert(CertCommand),
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
}

fn init_logging(format: &str, default: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARTISYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
            println!(
                "{}: ok (node {}, {} folders, {} peers)",
                config.display(),
                c.node,
                c.folders.len(),
                c.peers.len()
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
        Command::Demo { nodes, apis, keep } => {
            init_logging("text", "warn")?;
            artisync::demo::run(artisync::demo::DemoOptions { nodes, apis, keep }).await?;
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
        eprintln!("artisync: warning: a TLS crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("artisync: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("artisync: {e:#}");
            ExitCode::FAILURE
        }
    }
}
