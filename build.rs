//! Compiles `proto/replication.proto` with a protoc binary vendored by the
//! `protoc-bin-vendored` crate, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/replication.proto");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&["proto/replication.proto"], &["proto"])?;
    Ok(())
}
