//! Helpers shared by the end-to-end benchmarks (`benches/sync.rs`, `benches/artifacts.rs`):
//! timing statistics, environment lines, deterministic Synapse-like XML, bounded commands,
//! and real `artisync run` child processes probed through the gRPC health service.
//!
//! Every wait here is bounded; a child that misses its deadline is killed, and so is any
//! child still running when its [`Agent`] is dropped (also when the bench panics).

#![allow(dead_code)] // each bench uses a different subset

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The agent binary Cargo builds for the bench.
pub const BIN: &str = env!("CARGO_BIN_EXE_artisync");

/// The agent binary the bench runs: `ARTISYNC_BENCH_BIN` when set (a reference build, for an
/// A/B comparison such as `benches/ab.sh`), else the one Cargo built for the bench.
pub fn bin() -> String {
    std::env::var("ARTISYNC_BENCH_BIN").unwrap_or_else(|_| BIN.to_owned())
}

/// Bounds for an agent to report SERVING, to exit after SIGTERM, and for helper commands.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// How often [`Agent::wait_serving`] probes health.
pub const SERVING_PROBE_EVERY: Duration = Duration::from_micros(500);

// ------------------------------------------------------------------ small helpers

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted samples.
pub fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    pct(&s, 0.5)
}

pub fn fmt_runs(samples: &[Duration]) -> String {
    samples
        .iter()
        .map(|d| format!("{:.0}", ms(*d)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs a command to completion under a deadline (killed past it). Returns its wall time.
pub fn run_cmd(cmd: &mut Command, what: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "{what} failed: {status}");
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn os_sync() -> Duration {
    run_cmd(&mut Command::new("sync"), "sync", CMD_TIMEOUT)
}

/// Share of all CPUs busy (any process) over `window`, from /proc/stat.
pub fn cpu_busy(window: Duration) -> f64 {
    let read = || -> Option<(u64, u64)> {
        let text = fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = text
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let idle = v.get(3)? + v.get(4)?;
        Some((v.iter().sum(), idle))
    };
    let before = read();
    std::thread::sleep(window);
    match (before, read()) {
        (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
            100.0 * (1.0 - (i1 - i0) as f64 / (t1 - t0) as f64)
        }
        _ => f64::NAN,
    }
}

/// The /proc/mounts entry (device, mount point, type, options) holding `path`.
pub fn mount_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && path.starts_with(f[1])).then(|| (f[1].len(), f[..4].join(" ")))
        })
        .max()
        .map_or_else(|| "?".into(), |(_, m)| m)
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn shell_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

// ------------------------------------------------------------------ deterministic content

/// SplitMix64: tiny, seeded, stable across crate versions.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Log-uniform integer in [lo, hi]: many small files, a tail of large ones.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo_f, hi_f) = (lo as f64, hi as f64);
        (lo_f * (hi_f / lo_f).powf(self.unit())) as u64
    }
    pub fn word(&mut self) -> &'static str {
        WORDS[self.below(WORDS.len() as u64) as usize]
    }
}

pub const WORDS: &[&str] = &[
    "order",
    "customer",
    "payment",
    "inventory",
    "shipping",
    "token",
    "throttle",
    "backend",
    "gateway",
    "tenant",
    "analytics",
    "catalog",
    "invoice",
    "profile",
    "account",
    "session",
    "quota",
    "region",
    "header",
    "payload",
    "loyalty",
    "pricing",
    "refund",
    "audit",
];

/// One well-formed Synapse-ish line.
pub fn xml_line(rng: &mut Rng, out: &mut String) {
    let (w1, w2, w3) = (rng.word(), rng.word(), rng.word());
    let (n, h) = (rng.below(100_000), rng.next());
    let _ = match rng.below(6) {
        0 => writeln!(
            out,
            "  <property name=\"{w1}.{w2}\" value=\"{h:016x}\" scope=\"default\" type=\"STRING\"/>"
        ),
        1 => writeln!(
            out,
            "  <log level=\"custom\"><property name=\"{w1}\" expression=\"get-property('{w2}_{n}')\"/></log>"
        ),
        2 => writeln!(
            out,
            "  <filter source=\"$ctx:{w1}\" regex=\"{w2}[0-9]+\"><then><property name=\"{w3}\" value=\"{n}\"/></then><else><drop/></else></filter>"
        ),
        3 => writeln!(out, "  <!-- {w1} {w2} {w3} revision {n} -->"),
        4 => writeln!(
            out,
            "  <header name=\"X-{w1}-{n}\" scope=\"transport\" value=\"{h:016x}\"/>"
        ),
        _ => writeln!(
            out,
            "  <resource methods=\"GET POST\" uri-template=\"/{w1}/{{id}}/{w2}\"><inSequence><send><endpoint key=\"{w3}--Production\"/></send></inSequence><outSequence><send/></outSequence></resource>"
        ),
    };
}

/// A well-formed XML document of exactly `size` bytes (when `size` leaves room for the
/// root element; otherwise a little larger).
pub fn xml_doc(rng: &mut Rng, open: &str, root: &str, size: usize) -> String {
    let mut doc = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{open}\n");
    let close = format!("</{root}>\n");
    let mut line = String::new();
    loop {
        line.clear();
        xml_line(rng, &mut line);
        if doc.len() + line.len() + close.len() + 8 > size {
            break;
        }
        doc.push_str(&line);
    }
    let rest = size.saturating_sub(doc.len() + close.len());
    if rest >= 8 {
        doc.push_str("<!--");
        doc.extend(std::iter::repeat_n('.', rest - 8));
        doc.push_str("-->\n");
    } else {
        doc.extend(std::iter::repeat_n('\n', rest));
    }
    doc.push_str(&close);
    doc
}

// ------------------------------------------------------------------ agents

pub struct Agent {
    pub name: String,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
    /// Just before the process was spawned.
    pub started: Instant,
}

impl Agent {
    /// Starts `artisync run --config CONFIG` with `ARTISYNC_LOG=log_level`, stdout discarded
    /// and stderr appended to `log`.
    pub fn spawn(name: &str, port: u16, config: &Path, log: &Path, log_level: &str) -> Self {
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open agent log");
        let started = Instant::now();
        let child = Command::new(bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("ARTISYNC_LOG", log_level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn the artisync agent");
        Agent {
            name: name.to_owned(),
            port,
            log: log.to_owned(),
            child: Some(child),
            started,
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        strip_ansi(&lines[lines.len().saturating_sub(20)..].join("\n"))
    }

    pub fn check_alive(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "agent {} exited early ({status}); log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
    }

    /// Polls the gRPC health probe until SERVING; returns the time since process start.
    pub fn wait_serving(&mut self, rt: &tokio::runtime::Runtime) -> Duration {
        self.wait_serving_every(rt, SERVING_PROBE_EVERY)
    }

    /// [`Agent::wait_serving`] with `every` between probes (each probe opens a connection).
    pub fn wait_serving_every(
        &mut self,
        rt: &tokio::runtime::Runtime,
        every: Duration,
    ) -> Duration {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if rt.block_on(serving(self.port)) {
                return self.started.elapsed();
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "agent {} not SERVING within {START_TIMEOUT:?}; log tail:\n{}",
                self.name,
                self.log_tail()
            );
            std::thread::sleep(every);
        }
    }

    /// SIGTERM, then wait (bounded; SIGKILL past the deadline). Returns the shutdown time.
    pub fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let start = Instant::now();
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
        let _ = kill(pid, Signal::SIGTERM);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if !status.success() {
                    println!(
                        "  note: agent {} exited with {status}; log tail:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
                return start.elapsed();
            }
            if start.elapsed() > STOP_TIMEOUT {
                println!(
                    "  note: agent {} ignored SIGTERM for {STOP_TIMEOUT:?}: killed",
                    self.name
                );
                let _ = child.kill();
                let _ = child.wait();
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One health probe (service "", SERVING), short timeouts.
pub async fn serving(port: u16) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
    else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_millis(250))
        .timeout(Duration::from_millis(500))
        .connect()
        .await
    else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    match client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
    {
        Ok(r) => r.get_ref().status == ServingStatus::Serving as i32,
        Err(_) => false,
    }
}

// ------------------------------------------------------------------ environment

/// Prints date, nproc, CPU, kernel, load (with a 1 s CPU-busy sample) and the filesystem
/// holding `base`.
pub fn print_env(base: &Path) {
    println!(
        "date:    {}",
        shell_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
    );
    println!(
        "nproc:   {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    println!("cpu:     {cpu}");
    println!("kernel:  {}", shell_line("uname", &["-sr"]));
    println!(
        "load:    {} (loadavg); CPU busy over the last second before start: {:.0}% of all cores",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim(),
        cpu_busy(Duration::from_secs(1))
    );
    println!("fs:      {} on {}", base.display(), mount_of(base));
}
