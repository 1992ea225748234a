//! Generates the protobuf types (and, with the `grpc` feature, the gRPC service code)
//! from `proto/` with protox, so that no system `protoc` is needed. The encoded file
//! descriptor set is written to `OUT_DIR` for gRPC reflection and the proto3 JSON mapping.

use std::{env, path::PathBuf};

use prost::Message as _;

const FILES: &[&str] = &[
    "cunicu.proto",
    "core.proto",
    "epdisc.proto",
    "pdisc.proto",
    "pske.proto",
    "signaling.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();

    let fds = protox::compile(FILES, ["proto"])?;
    std::fs::write(out_dir.join("descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(grpc)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}
