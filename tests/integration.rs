//! End-to-end tests of the `artisync` binary: every test starts real agents as child processes
//! (`artisync run --config FILE`) on loopback, each with its own temp dir, and checks what the
//! operator would see on disk and through the CLI.
//!
//! One test binary (ripgrep style): the harness lives in `common`, the tests in
//! `tests/integration/*.rs`, one module per concern.

mod common;

/// The fuzz targets' harnesses (`fuzz/`), for `integration::fuzz_regressions`.
#[path = "../fuzz/src/checks.rs"]
mod fuzz_checks;

mod integration {
    mod artifacts;
    mod bulk;
    mod chaos;
    mod cli;
    mod config;
    mod conflict;
    mod crash;
    mod disk;
    mod echo;
    mod fuzz_regressions;
    mod gates;
    mod hostile;
    mod logs;
    mod metrics;
    mod own_records;
    mod restart;
    mod skip;
    mod sync;
    mod tls;
    mod watchdog;
    mod wso2;
}
