//! telemetry-hub: devices stream readings in, the hub stores them and acks.
//!
//! ```text
//! device ══Connect (bidi gRPC)══▶ grpc::session ──checked batches──▶ ingest queue (bounded)
//! Telegraf ══POST /api/v1/write══▶ http ──▶ lines ──batches (204 after commit)──▶ ┘
//!    ▲                (auth admits)    │                                   │
//!    └──────── Ack (after commit) ◀── AckSlot ◀── ingest::writer (one task per hub, group commit)
//!                                                                          │
//! hub CLI ══Operator (gRPC)══▶ grpc::OperatorService ─┐                    ▼
//! browser ══HTTP /api/v1, SSE══▶ http ─────────────────┼▶ operator ──▶ query ──▶ store (SQLite or PostgreSQL)
//! broker  ══MQTT commands═════▶ mqtt ──────────────────┘      └──▶ commands (task) ══Command══▶ session ══▶ device
//! committed readings, presence, command events ──▶ mqtt, http events, watchers (bounded broadcasts)
//! twins: reported patches ride the ingest queue like batches; committed twin changes ──▶
//!        twin::TwinHub ──▶ device streams (DesiredState), watchers, mqtt
//! alarms: rules run on each group's rows in its commit ──▶ alarm events + webhook outbox
//!        ──▶ alarms::AlarmHub (sse, mqtt, watchers); alarms::leader (inactivity, webhooks)
//! ```
//!
//! - [`domain`]: plain types (DeviceId, Reading, ...); depends on nothing.
//! - [`config`]: layered typed settings.
//! - [`auth`]: device credentials and operator roles, decided once here.
//! - [`devices`]: enrollment, token rotation and removal of devices.
//! - [`grpc`]: tonic services; the only protobuf <-> domain conversion.
//!   [`grpc::session`] runs one device stream (reader loop + ack task for
//!   commands, desired state and the closing status; the response stream
//!   takes the acks from the commit itself).
//! - [`registry`]: one live stream per device; a newer one takes over.
//! - [`lines`]: line-protocol writes (the HTTP door for producers without
//!   a stream): lines to readings, then admitted, queued and answered
//!   after the commit like a stream's batches.
//! - [`ingest`]: bounded queue -> single batching writer -> acks after commit.
//! - [`commands`]: command lifecycle; one task owns open commands and the
//!   command log, pushes commands down device streams, enforces TTL.
//! - [`twin`]: per-device tags, desired and reported documents (plain
//!   rules in `twin::doc` and the fleet filter in `twin::filter`); changes
//!   are written by the ingest writer and handed to streams and watchers
//!   after the commit.
//! - [`alarms`]: rules (plain `alarms::rules`, `alarms::engine`) run on
//!   each group's stored readings inside the writer's commit; the leader
//!   task checks inactivity, delivers signed webhooks from the outbox and
//!   prunes history.
//! - [`jobs`]: fleet rollouts (a desired patch or a command at a rate,
//!   with a concurrency and abort thresholds); plain rules, and the runner
//!   that drives them through the writer and the core.
//! - [`store`]: sqlx on SQLite (the default) or PostgreSQL; one writer
//!   connection per hub (on PostgreSQL a second one, the writer's sidecar,
//!   compacts and merges beside it), a reader pool.
//! - [`cluster`]: several hubs on one PostgreSQL database: claims and
//!   command notices between hubs, heartbeats and presence.
//! - [`operator`]: what an operator may ask (validation, limits, errors,
//!   the budgets of long calls, device admin, backups), the only API of
//!   every door to the hub.
//! - [`metrics`]: the hub's counters and histograms (read by `hub stats`
//!   and by [`prometheus`]).
//! - [`query`]: paged, merged or bucketed reading queries.
//! - [`retention`]: old readings deleted in small steps through the writer.
//! - [`app`]: wires it all, owns the tasks and the shutdown order.
//! - [`http`]: the web console and its HTTP/JSON API (axum), another door
//!   to [`operator`]; live events by Server-Sent Events.
//! - [`prometheus`]: the optional `/metrics` endpoint.
//! - [`promql`]: the Prometheus query API's plain core (series as labels,
//!   the PromQL subset, evaluation); [`operator`] loads its samples and
//!   [`http`] serves `/api/v1/query`, `query_range`, `series`, `labels`.
//! - [`mqtt`]: the optional MQTT bridge: committed readings, presence and
//!   command events out, commands in (with `mqtt.commands`, through
//!   [`commands`]).
//! - [`cli`]: the operator subcommands (gRPC clients) and the demo.
//! - [`throttle`]: suppressed log lines and token buckets, so one noisy
//!   device costs the others nothing.

pub mod alarms;
pub mod app;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod devices;
pub mod domain;
pub mod grpc;
pub mod http;
pub mod ingest;
pub mod jobs;
pub mod lines;
pub mod metrics;
pub mod mqtt;
pub mod operator;
pub mod prometheus;
pub mod promql;
pub mod query;
pub mod registry;
pub mod retention;
pub mod store;
pub mod throttle;
pub mod twin;

pub use app::Hub;
pub use config::Settings;

/// The property tests' settings: 2000 cases each, no regression files
/// written into the source tree.
#[cfg(test)]
fn fuzz_config() -> proptest::prelude::ProptestConfig {
    proptest::prelude::ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..Default::default()
    }
}
