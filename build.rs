//! Compiles `proto/` with the vendored protoc, so `cargo build` needs nothing from apt.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Inline contents stay slices of the received message: no copy into a Vec of their own
    // per file (the bytes go from the gRPC buffer to the staged file as they came).
    config.bytes([".artisync.v1.Record.inline_data"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "proto/artisync/v1/sync.proto",
            "proto/artisync/v1/admin.proto",
            "proto/artisync/v1/artifacts.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
