//! The standard `process_*` series, read from `/proc/self` at each scrape (prometheus-client
//! has no process collector). A file that cannot be read leaves its series out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub(super) struct ProcessCollector;

/// What `/proc/self/stat` tells, after the command name.
#[derive(Debug, PartialEq)]
struct Stat {
    cpu_secs: f64,
    threads: i64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) may hold spaces and parentheses: the
/// fields are counted from its last `)`.
fn parse_stat(text: &str, ticks_per_sec: f64) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `f[0]` is field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_secs: (num(14)? + num(15)?) as f64 / ticks_per_sec,
        threads: num(20)? as i64,
        start_ticks: num(22)?,
        virtual_bytes: num(23)?,
        resident_pages: num(24)?,
    })
}

/// Seconds since the epoch the machine booted at (`btime` in `/proc/stat`).
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft open-files limit from `/proc/self/limits`.
fn max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .filter(|p| *p > 0)
            .unwrap_or(4096) as u64;
        let read = |p: &str| std::fs::read_to_string(p).ok();
        if let Some(s) = read("/proc/self/stat").and_then(|t| parse_stat(&t, ticks)) {
            ConstCounter::new(s.cpu_secs).encode(e.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?)?;
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_pages * page,
            )?;
            gauge(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            )?;
            gauge(
                &mut e,
                "process_threads",
                "Number of OS threads in the process",
                s.threads,
            )?;
            if let Some(boot) = read("/proc/stat").and_then(|t| boot_time(&t)) {
                let start = boot as f64 + s.start_ticks as f64 / ticks;
                gauge(
                    &mut e,
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds",
                    start,
                )?;
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory's own descriptor, open while it is listed, is counted too.
            let open = dir.count().saturating_sub(1);
            gauge(
                &mut e,
                "process_open_fds",
                "Number of open file descriptors",
                open as i64,
            )?;
        }
        if let Some(max) = read("/proc/self/limits").and_then(|t| max_fds(&t)) {
            gauge(
                &mut e,
                "process_max_fds",
                "Maximum number of open file descriptors",
                max,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis_of_the_name() {
        let text = "4242 (art (isync) x) S 1 4242 4242 0 -1 4194560 2000 0 0 0 250 50 0 0 20 0 9 0 12345 104857600 2560 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(text, 100.0).expect("parses");
        assert_eq!(
            s,
            Stat {
                cpu_secs: 3.0,
                threads: 9,
                start_ticks: 12345,
                virtual_bytes: 104_857_600,
                resident_pages: 2560,
            }
        );
        assert_eq!(parse_stat("no parenthesis", 100.0), None);
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1796000000\n"),
            Some(1_796_000_000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_fds(limits), Some(1024));
    }

    #[test]
    fn this_process_is_read_from_proc() {
        let registry = {
            let mut r = prometheus_client::registry::Registry::default();
            r.register_collector(Box::new(ProcessCollector));
            r
        };
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).expect("encode");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }
}
