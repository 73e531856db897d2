//! The `telemetry.v1` protocol: the device gateway (`DeviceGateway.Connect`, one
//! bidirectional stream per device) and the operator API (`Operator`).
//!
//! Everything here is generated from `proto/telemetry/v1/telemetry.proto`;
//! that file is the public contract and documents every field. The generated
//! code uses [`codec::SmallBufferCodec`]; both ends of a device stream move
//! its bytes through [`io::BatchedWrites`].

pub mod codec;
pub mod io;

pub mod v1 {
    tonic::include_proto!("telemetry.v1");

    /// The encoded file descriptor set of `telemetry.v1`, for server
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/telemetry_descriptor.bin"));
}
