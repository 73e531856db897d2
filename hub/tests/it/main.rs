//! Black-box tests: a real hub on 127.0.0.1:0 with a temp SQLite file, real
//! gRPC clients (raw streams and the device-sim library).

mod alarms;
mod api;
mod badinput;
mod broker;
mod cli;
mod cluster;
mod commands;
mod console;
mod crash;
mod faults;
mod harness;
mod ingest;
mod jobs;
mod lifecycle;
mod lines;
mod mqtt;
mod openapi;
mod ops;
mod promql;
mod rollups;
mod security;
mod stream;
mod twin;
