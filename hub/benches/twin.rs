//! Twin figures against a running hub (`scripts/bench-twin.sh` starts it).
//!
//! - `MODE=rtt`: one twin-aware device stream; an operator's UpdateDesired
//!   until the device holds it (DesiredState), and on until the device's
//!   reported patch of it is acked (the whole loop), ROUNDS times.
//! - `MODE=reports`: DEVICES twin-aware streams (CONNECTIONS HTTP/2
//!   connections), each sending a reported patch every INTERVAL_MS for
//!   SECONDS; ReportedAck latency and patches/s.
//! - `MODE=filter`: registers DEVICES twin-aware devices (a reported
//!   battery and firmware each, a site tag, every 100th out of sync) unless
//!   the hub has them, then times fleet filters over them (ListDevices with
//!   `where`, every page), RUNS times each.
//!
//! Env: HUB_ADDR (http://127.0.0.1:50051).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use telemetry_proto::v1::{
    self as pb, device_gateway_client::DeviceGatewayClient, device_message::Msg as DeviceMsg,
    hub_message::Msg as HubMsg, operator_client::OperatorClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(addr.to_owned())
        .expect("hub URL")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("hub reachable")
}

/// p50 / p99 / max of durations, in ms.
fn percentiles(mut d: Vec<Duration>) -> String {
    if d.is_empty() {
        return "no samples".into();
    }
    d.sort_unstable();
    let at = |q: f64| d[((d.len() as f64 * q) as usize).min(d.len() - 1)].as_secs_f64() * 1e3;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        at(0.5),
        at(0.99),
        at(1.0),
        d.len()
    )
}

/// A twin-aware device stream.
struct Device {
    tx: mpsc::Sender<pb::DeviceMessage>,
    inbound: tonic::Streaming<pb::HubMessage>,
    welcome: pb::Welcome,
}

impl Device {
    async fn connect(channel: Channel, id: &str) -> Device {
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::DeviceMessage {
            msg: Some(DeviceMsg::Hello(pb::Hello {
                device_id: id.into(),
                firmware: "bench".into(),
                twin: true,
                ..Default::default()
            })),
        };
        tx.send(hello).await.expect("local channel");
        let mut inbound = DeviceGatewayClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await
            .expect("connect")
            .into_inner();
        let welcome = match inbound.message().await.expect("stream") {
            Some(pb::HubMessage {
                msg: Some(HubMsg::Welcome(w)),
            }) => w,
            other => panic!("expected Welcome, got {other:?}"),
        };
        Device {
            tx,
            inbound,
            welcome,
        }
    }

    async fn report(&self, seq: u64, patch: serde_json::Value) {
        let msg = pb::DeviceMessage {
            msg: Some(DeviceMsg::Reported(pb::ReportedPatch {
                seq,
                patch_json: patch.to_string(),
            })),
        };
        self.tx.send(msg).await.expect("stream open");
    }

    /// The next message that `want` picks (others are passed over).
    async fn until<T>(&mut self, mut want: impl FnMut(HubMsg) -> Option<T>) -> T {
        loop {
            let msg = self
                .inbound
                .message()
                .await
                .expect("stream")
                .expect("stream open")
                .msg
                .expect("content");
            if let Some(t) = want(msg) {
                return t;
            }
        }
    }

    async fn acked(&mut self, seq: u64) {
        self.until(|m| match m {
            HubMsg::ReportedAck(a) if a.seq >= seq => Some(()),
            _ => None,
        })
        .await
    }
}

async fn rtt(addr: &str) {
    let rounds = env_or("ROUNDS", 300);
    let ch = channel(addr).await;
    let mut op = OperatorClient::new(ch.clone());
    let id = format!("twin-rtt-{}", std::process::id());
    let mut dev = Device::connect(ch, &id).await;
    // The stale-at-connect document, if any.
    let mut version = op
        .get_twin(pb::GetTwinRequest {
            device_id: id.clone(),
        })
        .await
        .expect("twin")
        .into_inner()
        .desired_version;
    let (mut delivered, mut looped) = (Vec::new(), Vec::new());
    for n in 1..=rounds {
        let started = Instant::now();
        let twin = op
            .update_desired(pb::UpdateDesiredRequest {
                device_id: id.clone(),
                patch_json: format!("{{\"n\":{n}}}"),
                if_version: Some(version),
            })
            .await
            .expect("update")
            .into_inner();
        version = twin.desired_version;
        dev.until(|m| match m {
            HubMsg::Desired(d) if d.version >= version => Some(()),
            _ => None,
        })
        .await;
        delivered.push(started.elapsed());
        dev.report(n, serde_json::json!({ "n": n })).await;
        dev.acked(n).await;
        looped.push(started.elapsed());
    }
    println!(
        "desired change -> device holds it: {}",
        percentiles(delivered)
    );
    println!("-> device's report of it acked:    {}", percentiles(looped));
}

async fn reports(addr: &str) {
    let devices = env_or("DEVICES", 10_000) as usize;
    let connections = env_or("CONNECTIONS", 100).max(1) as usize;
    let interval = Duration::from_millis(env_or("INTERVAL_MS", 10_000));
    let seconds = Duration::from_secs(env_or("SECONDS", 30));
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(channel(addr).await);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..devices {
        let ch = channels[i % connections].clone();
        let (acked, latencies) = (Arc::clone(&acked), Arc::clone(&latencies));
        tasks.spawn(async move {
            let mut dev = Device::connect(ch, &format!("twin-rep-{i:06}")).await;
            let mut seq = dev.welcome.reported_seq;
            // Spread over the interval.
            let offset = interval.mul_f64((i as f64) / (devices as f64));
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            while started.elapsed() < seconds {
                tick.tick().await;
                seq += 1;
                let sent = Instant::now();
                dev.report(
                    seq,
                    serde_json::json!({"battery": seq % 100, "uptime_s": seq}),
                )
                .await;
                dev.acked(seq).await;
                latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(sent.elapsed());
                acked.fetch_add(1, Ordering::Relaxed);
            }
            drop(dev.tx);
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let n = acked.load(Ordering::Relaxed);
    let latencies = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "{devices} devices, a reported patch each every {} s: {n} acked in {elapsed:.0} s ({:.0}/s); ack {}",
        interval.as_secs_f64(),
        n as f64 / elapsed,
        percentiles(latencies)
    );
}

async fn seed(addr: &str, devices: usize) {
    let ch = channel(addr).await;
    let mut op = OperatorClient::new(ch.clone());
    let have = op
        .list_devices(pb::ListDevicesRequest {
            r#where: "tags.bench = twin".into(),
            limit: 1,
            after: format!("twin-f-{:06}", devices.saturating_sub(2)),
        })
        .await
        .expect("list")
        .into_inner();
    if !have.devices.is_empty() {
        println!("({devices} devices there already)");
        return;
    }
    let started = Instant::now();
    let concurrency = 256;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let channels: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(channel(addr).await);
        }
        v
    };
    for w in 0..concurrency {
        let next = Arc::clone(&next);
        let ch = channels[w % channels.len()].clone();
        tasks.spawn(async move {
            let mut op = OperatorClient::new(ch.clone());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= devices {
                    return;
                }
                let id = format!("twin-f-{i:06}");
                let mut dev = Device::connect(ch.clone(), &id).await;
                let firmware = if i.is_multiple_of(3) { "1.4" } else { "1.3" };
                dev.report(
                    1,
                    serde_json::json!({"battery": i % 100, "firmware": firmware}),
                )
                .await;
                dev.acked(1).await;
                drop(dev.tx);
                while dev.inbound.message().await.ok().flatten().is_some() {}
                let tags: HashMap<String, String> = [
                    ("bench".to_owned(), "twin".to_owned()),
                    ("site".to_owned(), format!("plant-{}", i % 10)),
                ]
                .into();
                op.update_tags(pb::UpdateTagsRequest {
                    device_id: id.clone(),
                    set: tags,
                    remove: Vec::new(),
                })
                .await
                .expect("tags");
                if i.is_multiple_of(100) {
                    op.update_desired(pb::UpdateDesiredRequest {
                        device_id: id,
                        patch_json: r#"{"firmware": "1.5"}"#.into(),
                        if_version: None,
                    })
                    .await
                    .expect("desired");
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    println!(
        "registered {devices} twin devices in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

async fn filter(addr: &str) {
    let devices = env_or("DEVICES", 100_000) as usize;
    let runs = env_or("RUNS", 5).max(1);
    seed(addr, devices).await;
    let mut op = OperatorClient::new(channel(addr).await);
    println!(
        "{:<78} {:>7}  {:>16}  {:>16}",
        "filter", "devices", "first 100 (med)", "all pages (med)"
    );
    for text in [
        "tags.site = plant-7",
        "reported.firmware != 1.4",
        "tags.site = plant-0 and in_sync = false",
        "reported.battery < 20",
        "reported.battery < 20 and tags.site = plant-3 and reported.firmware = 1.3",
        "in_sync = false",
        "reported.battery > 98 and reported.firmware = 1.4",
    ] {
        // The first page, as an operator's listing asks for it, then every
        // page (the whole answer over gRPC).
        let mut first = Vec::new();
        let mut all = Vec::new();
        let mut found = 0;
        for _ in 0..runs {
            let started = Instant::now();
            op.list_devices(pb::ListDevicesRequest {
                r#where: text.into(),
                limit: 100,
                after: String::new(),
            })
            .await
            .expect("list");
            first.push(started.elapsed());
            let started = Instant::now();
            let mut after = String::new();
            found = 0;
            loop {
                let page = op
                    .list_devices(pb::ListDevicesRequest {
                        r#where: text.into(),
                        limit: 10_000,
                        after,
                    })
                    .await
                    .expect("list")
                    .into_inner();
                found += page.devices.len();
                if page.next_after.is_empty() {
                    break;
                }
                after = page.next_after;
            }
            all.push(started.elapsed());
        }
        let median = |mut v: Vec<Duration>| {
            v.sort_unstable();
            v[v.len() / 2].as_secs_f64() * 1e3
        };
        println!(
            "{text:<78} {found:>7}  {:>13.1} ms  {:>13.1} ms",
            median(first),
            median(all)
        );
    }
}

fn main() {
    let addr = std::env::var("HUB_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mode = std::env::var("MODE").unwrap_or_else(|_| "rtt".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        match mode.as_str() {
            "rtt" => rtt(&addr).await,
            "reports" => reports(&addr).await,
            "filter" => filter(&addr).await,
            other => panic!("MODE is rtt, reports or filter, not {other:?}"),
        }
    });
}
