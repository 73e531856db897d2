//! Compiles `telemetry/v1/telemetry.proto` with protox (pure Rust), so a fresh
//! machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "telemetry/v1/telemetry.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    // The descriptor set, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("telemetry_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // `build_transport(false)`: the generated `connect(dst)` constructor would
    // clash with the `Connect` rpc; clients are built from a `Channel` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
