//! Simulated telemetry devices, as a library (used by the `device-sim`
//! binary, `hub demo` and the hub's tests).
//!
//! - [`device`]: one device: Hello, Welcome, sample, batch, resend after a
//!   reconnect, drain and half-close.
//! - [`commands`]: what a device does with commands (and deduplication).
//! - [`fleet`]: many devices over a few shared HTTP/2 connections.
//! - [`signal`]: reproducible, realistic sensor values.
//! - [`stats`]: live counters and the end-of-run summary.

pub mod commands;
pub mod device;
pub mod fleet;
pub mod signal;
pub mod stats;
pub mod tls;
pub mod twin;

pub use fleet::{Credentials, FleetConfig, FleetError, TlsFiles, device_id, fleet_token, run};
pub use stats::{FleetStats, FleetSummary};
