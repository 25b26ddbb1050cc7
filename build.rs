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
    // What the client port's reflection describes: the client API and the
    // Admin service only. The replica protocol (replica.proto) is served on
    // the peer port alone, so the client port does not even describe it.
    let client_fds = protox::compile(
        ["proto/paxoskv/v1/kv.proto", "proto/paxoskv/v1/admin.proto"],
        ["proto"],
    )?;
    std::fs::write(
        out_dir.join("paxoskv_client_descriptor.bin"),
        prost::Message::encode_to_vec(&client_fds),
    )?;

    tonic_prost_build::configure()
        // Decode errors are the caller's: INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::Codec")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    // etcd v3's KV/Put and KV/Range, for `paxoskv bench --target etcd`:
    // client stubs only, with tonic-prost's own codec (the decode-error
    // mapping of crate::codec is for servers), and no descriptor set.
    let etcd_protos = [
        "proto/etcd/etcdserverpb/rpc.proto",
        "proto/etcd/mvccpb/kv.proto",
    ];
    for proto in &etcd_protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(protox::compile(etcd_protos, ["proto"])?)?;
    Ok(())
}
