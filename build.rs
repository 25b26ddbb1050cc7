//! Compiles proto/ with a pure-Rust protobuf compiler (protox), so a fresh
//! machine needs no protoc, and writes the descriptor set that server
//! reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/paxoskv/v1/kv.proto",
        "proto/paxoskv/v1/replica.proto",
        "proto/paxoskv/v1/admin.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("paxoskv_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        // Decode errors are the caller's: INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
