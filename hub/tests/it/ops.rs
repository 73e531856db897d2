//! Running the hub: Prometheus metrics, JSON logs, retention of readings
//! and commands, and config errors that say where the bad value came from.

use std::io::BufRead;
use std::time::Duration;

use telemetry_proto::v1::{self as pb, CommandState as S};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::harness::*;

/// `GET path` over plain HTTP/1.1; the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of a sample line `name{labels} value` in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_show_what_the_hub_did() {
    let hub = spawn_hub_with(|s| {
        s.metrics.enabled = true;
        s.metrics.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let addr = hub.hub().metrics_addr().expect("metrics are on");
    let (mut dev, _) = RawDevice::connect(&hub, "prom-dev").await;
    let now = now_ms();
    dev.send(batch(vec![
        reading(1, "t", now, 1.0),
        reading(1, "t", now, 1.0),
        reading(2, "t", 0, 2.0),
        reading(3, "t", now, f64::NAN),
    ]))
    .await;
    dev.ack_through(3).await;
    let cmd = hub
        .send_command("prom-dev", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(dev.next_command().await.command_id, cmd.command_id);
    wait_until("SENT recorded", || async {
        state(&hub.command(&cmd.command_id).await) == S::Sent
    })
    .await;
    let text = http_get(addr, "/metrics").await;
    assert_eq!(
        sample(&text, "hub_readings_committed_total"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "hub_readings_duplicate_total"), Some(1.0));
    assert_eq!(sample(&text, "hub_readings_rejected_total"), Some(2.0));
    assert_eq!(sample(&text, "hub_live_sessions"), Some(1.0));
    assert_eq!(sample(&text, "hub_storage_ok"), Some(1.0));
    assert!(
        sample(&text, "hub_commit_seconds_count").unwrap() >= 2.0,
        "{text}"
    );
    assert_eq!(sample(&text, "hub_ack_seconds_count"), Some(1.0));
    assert!(sample(&text, "hub_db_bytes").unwrap() > 0.0);
    assert_eq!(
        sample(&text, r#"hub_command_transitions_total{state="QUEUED"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"hub_command_transitions_total{state="SENT"}"#),
        Some(1.0)
    );
    assert!(text.contains("# TYPE hub_ack_seconds histogram"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = crate::harness::hub_process()
        .arg("serve")
        .env("HUB__LOG__FORMAT", "json")
        .env("HUB__SERVER__LISTEN", "127.0.0.1:0")
        .env("HUB__STORAGE__PATH", dir.path().join("hub.db"))
        .env("RUST_LOG", "info,hub::grpc::session=debug")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut next_json = async || -> serde_json::Value {
        let line = tokio::time::timeout(WAIT, lines.recv())
            .await
            .unwrap()
            .unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    // The web console's line comes first; the gRPC listener's is last.
    let (listening, message) = loop {
        let line = next_json().await;
        let message = line["fields"]["message"].as_str().unwrap().to_owned();
        if message.starts_with("listening on ") {
            break (line, message);
        }
    };
    let addr = message
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{listening}"))
        .to_owned();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut dev = RawDevice::open(channel, hello("json-dev")).await;
    assert!(matches!(
        dev.next().await,
        Ok(Some(pb::hub_message::Msg::Welcome(_)))
    ));
    let connected = loop {
        let line = next_json().await;
        if line["fields"]["message"] == "device connected" {
            break line;
        }
    };
    assert_eq!(connected["span"]["device_id"], "json-dev", "{connected}");
    // Per-device lines are DEBUG: a 10,000-device fleet would flood INFO.
    assert_eq!(connected["level"], "DEBUG");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_readings_and_commands_while_ingest_goes_on() {
    // Readings an hour old, stored before retention is switched on (with
    // it, the hub refuses readings it would delete at once).
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 2_000).await;
    let (mut dev, _) = RawDevice::connect(&hub, "ret-dev").await;
    let old = now_ms() - 3_600_000;
    for start in (1..=6_000u64).step_by(1_000) {
        dev.send(batch(
            (start..start + 1_000)
                .map(|s| reading(s, if s % 2 == 0 { "a" } else { "b" }, old + s as i64, 0.0))
                .collect(),
        ))
        .await;
    }
    let now = now_ms();
    dev.send(batch(
        (6_001..=6_010).map(|s| reading(s, "a", now, 1.0)).collect(),
    ))
    .await;
    dev.ack_through(6_010).await;
    drop(dev);
    // A pass every 3 s; readings made now stay for 30 s.
    hub.settings.storage.retention = Duration::from_secs(30);
    hub.settings.commands.retention = Duration::from_secs(2);
    hub.restart().await;
    let (dev, _) = RawDevice::connect(&hub, "ret-dev").await;
    // A device with a wrong clock: readings older than retention keeps
    // are refused (counted), never stored.
    let (mut late, welcome) = RawDevice::connect(&hub, "ret-late").await;
    late.send(batch(vec![
        reading(1, "a", old, 1.0),
        reading(2, "a", now_ms(), 2.0),
    ]))
    .await;
    assert_eq!(late.ack_through(2).await, (2, 1, 0), "{welcome:?}");
    assert_eq!(
        hub.readings("ret-late")
            .await
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        [2]
    );
    drop((dev, late));
    hub.register_offline("ret-off").await;
    let open = hub.send_command("ret-off", "ping", "", None).await.unwrap();

    // A fleet streams throughout: retention must not stall it.
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: hub.url(),
        devices: 3,
        rate_hz: 100.0,
        id_prefix: "ret-".into(),
        ..Default::default()
    })
    .await;
    let done = hub
        .send_command("ret-00001", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(
        state(&hub.watch_until_final(&done.command_id).await.pop().unwrap()),
        S::Succeeded
    );
    wait_until("old readings deleted", || async {
        hub.readings("ret-dev").await.len() == 10
    })
    .await;
    fleet.wait_for_acks(500).await;
    let seqs: Vec<u64> = hub
        .readings("ret-dev")
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        seqs,
        (6_001..=6_010).collect::<Vec<_>>(),
        "the recent ones stay"
    );
    assert_eq!(
        hub.device("ret-dev").await.unwrap().readings,
        10,
        "the count follows"
    );
    wait_until("the final command deleted", || async {
        hub.operator()
            .await
            .get_command(pb::GetCommandRequest {
                command_id: done.command_id.clone(),
            })
            .await
            .is_err_and(|e| e.code() == Code::NotFound)
    })
    .await;
    assert_eq!(
        state(&hub.command(&open.command_id).await),
        S::Queued,
        "a command that is not final is never deleted"
    );
    let summary = fleet.finish().await;
    assert!(
        summary.all_clean() && summary.sent == summary.acked,
        "{summary:?}"
    );
}
