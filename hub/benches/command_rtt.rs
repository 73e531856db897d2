//! Command round-trip latency against a running hub: operator SendCommand
//! (`ping`) until SUCCEEDED is seen by the operator through WatchCommand.
//!
//! Run by `scripts/bench-commands.sh`, which starts the hub and a fleet.
//! Env: HUB_ADDR (http://127.0.0.1:50051), DEVICES (1000, ids sim-00001..),
//! COMMANDS (500).

use std::time::{Duration, Instant};

use telemetry_proto::v1::{self as pb, operator_client::OperatorClient};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let addr = std::env::var("HUB_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let devices = env_or("DEVICES", 1000).max(1);
    let commands = env_or("COMMANDS", 500).max(1) as usize;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(addr.clone())
            .expect("hub URL")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("hub reachable");
        let mut client = OperatorClient::new(channel);
        let mut latencies = Vec::with_capacity(commands);
        let mut pick: u64 = 0x2545_F491_4F6C_DD1D;
        let mut failed = 0;
        for _ in 0..commands {
            pick ^= pick << 13;
            pick ^= pick >> 7;
            pick ^= pick << 17;
            let device = format!("sim-{:05}", pick % devices + 1);
            let started = Instant::now();
            let sent = client
                .send_command(pb::SendCommandRequest {
                    device_id: device,
                    name: "ping".into(),
                    params_json: String::new(),
                    ttl_ms: 60_000,
                })
                .await
                .expect("send")
                .into_inner();
            let mut watch = client
                .watch_command(pb::WatchCommandRequest {
                    command_id: sent.command_id,
                    timeout_ms: 10_000,
                })
                .await
                .expect("watch")
                .into_inner();
            let mut last = pb::CommandState::Unspecified;
            while let Some(info) = watch.message().await.expect("watch stream") {
                last = pb::CommandState::try_from(info.state).unwrap_or_default();
            }
            if last == pb::CommandState::Succeeded {
                latencies.push(started.elapsed());
            } else {
                failed += 1;
            }
        }
        latencies.sort_unstable();
        let at = |q: f64| -> Duration {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "command round trip ({} ok, {failed} not SUCCEEDED): p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            latencies.len(),
            ms(at(0.50)),
            ms(at(0.90)),
            ms(at(0.99)),
            ms(latencies.last().copied().unwrap_or_default()),
        );
    });
}
