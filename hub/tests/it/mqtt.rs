//! The MQTT bridge against a real broker each test starts for itself
//! (Mosquitto, or a small in-process broker where it is not installed), and
//! the live watch stream.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use telemetry_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::broker::TestBroker;
use crate::harness::*;

fn unique(name: &str) -> String {
    format!(
        "it-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// A plain MQTT client that records what it receives.
struct Probe {
    client: AsyncClient,
    /// Topic, payload, retain flag, and the QoS it was delivered at.
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>, bool, QoS)>,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    async fn connect(port: u16, filter: &str) -> Probe {
        Self::connect_at(port, filter, QoS::AtLeastOnce).await
    }

    async fn connect_at(port: u16, filter: &str, qos: QoS) -> Probe {
        let mut options = MqttOptions::new(unique("probe"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic, p.payload.to_vec(), p.retain, p.qos));
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        client.subscribe(filter, qos).await.unwrap();
        tokio::time::timeout(WAIT, subscribed.recv())
            .await
            .expect("SubAck from the broker");
        Probe { client, rx, task }
    }

    /// The next message whose topic is `topic` (others are skipped).
    async fn next_on(&mut self, topic: &str) -> (Value, bool) {
        let (value, retain, _) = self.next_at(topic).await;
        (value, retain)
    }

    /// The same, with the QoS it was delivered at.
    async fn next_at(&mut self, topic: &str) -> (Value, bool, QoS) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (t, payload, retain, qos) = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no message on {topic}"))
                .unwrap();
            if t == topic {
                let value = serde_json::from_slice(&payload)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&payload).into()));
                return (value, retain, qos);
            }
        }
    }

    async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .unwrap();
    }

    /// Publishes a retained message and waits until the broker routed it
    /// back (the probe hears its own topics): the broker holds it.
    async fn publish_retained(&mut self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.as_bytes().to_vec())
            .await
            .unwrap();
        self.next_on(topic).await;
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The hub's retained status topic: its own when it is on PostgreSQL (one
/// of possibly several hubs there).
fn hub_status(hub: &TestHub, prefix: &str) -> String {
    match hub.settings.storage.backend {
        hub::config::Backend::Sqlite => format!("{prefix}/hub/status"),
        hub::config::Backend::Postgres => {
            format!("{prefix}/hubs/{}/status", hub.hub().hub_id())
        }
    }
}

/// Two hubs on one PostgreSQL database, bridged to one broker (commands
/// taken), as one MQTT client group.
async fn bridged_pair(db: TestDb, broker: &TestBroker, prefix: &str) -> (TestHub, TestHub) {
    let group = unique("hubs");
    let bridged = |s: &mut hub::Settings| {
        s.mqtt.enabled = true;
        s.mqtt.url = format!("mqtt://127.0.0.1:{}", broker.port);
        s.mqtt.client_id = group.clone();
        s.mqtt.topic_prefix = prefix.to_owned();
        s.mqtt.commands = true;
    };
    let a = spawn_hub_in(db, bridged).await;
    let b = a.spawn_peer(bridged).await;
    (a, b)
}

async fn hub_with_bridge(prefix: &str, port: u16) -> TestHub {
    let prefix = prefix.to_owned();
    spawn_hub_with(move |s| {
        s.mqtt.enabled = true;
        s.mqtt.commands = true;
        s.mqtt.url = format!("mqtt://127.0.0.1:{port}");
        s.mqtt.client_id = unique("hub");
        s.mqtt.topic_prefix = prefix;
        s.commands.max_params_bytes = 256;
        s.mqtt.max_payload_bytes = 1280;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_readings_and_presence_reach_mqtt() {
    let broker = TestBroker::start();
    let prefix = unique("readings");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let mut hub = hub_with_bridge(&prefix, broker.port).await;
    let (value, retained) = probe.next_on(&hub_status(&hub, &prefix)).await;
    assert_eq!((value, retained), (json!("online"), false));

    let (mut dev, _) = RawDevice::connect(&hub, "mq-dev").await;
    let (status, _) = probe
        .next_on(&format!("{prefix}/devices/mq-dev/status"))
        .await;
    assert_eq!(status["online"], true);
    assert_eq!(status["firmware"], "test-fw/1");

    dev.send(batch(vec![
        reading(1, "temperature", 1_767_225_600_000, 21.5),
        reading(2, "humidity", 1_767_225_600_010, 40.25),
    ]))
    .await;
    let (msg, _) = probe
        .next_on(&format!("{prefix}/devices/mq-dev/readings"))
        .await;
    assert_eq!(
        msg,
        json!({"device_id": "mq-dev", "readings": [
            {"seq": 1, "sensor": "temperature", "ts_ms": 1_767_225_600_000i64, "value": 21.5},
            {"seq": 2, "sensor": "humidity", "ts_ms": 1_767_225_600_010i64, "value": 40.25},
        ]})
    );
    // Published after the commit: the readings are stored already.
    assert_eq!(hub.readings("mq-dev").await.len(), 2);
    assert_eq!(dev.ack_through(2).await.0, 2);

    // A late subscriber gets the retained statuses.
    let mut late = Probe::connect(broker.port, &format!("{prefix}/+/+/status")).await;
    let (status, retained) = late
        .next_on(&format!("{prefix}/devices/mq-dev/status"))
        .await;
    assert!(retained, "device status is retained");
    assert_eq!(status["online"], true);

    // Takeover: a newer stream is one more "online" with a later since,
    // never an "offline" in between.
    let before_takeover = now_ms();
    let (mut newer, _) = RawDevice::connect(&hub, "mq-dev").await;
    assert_eq!(dev.end_code().await, tonic::Code::Aborted);
    let (status, _) = probe
        .next_on(&format!("{prefix}/devices/mq-dev/status"))
        .await;
    assert_eq!(status["online"], true);
    let since = status["since"].as_str().unwrap();
    let since_ms = humantime::parse_rfc3339(since)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(
        since_ms >= before_takeover,
        "the newer stream's status: {since}"
    );

    newer.half_close();
    assert_eq!(newer.end_code().await, tonic::Code::Ok);
    let (status, _) = probe
        .next_on(&format!("{prefix}/devices/mq-dev/status"))
        .await;
    assert_eq!(status["online"], false);

    // Clean shutdown: the hub says it is offline (retained).
    let status_topic = hub_status(&hub, &prefix);
    hub.stop().await;
    let (value, _) = probe.next_on(&status_topic).await;
    assert_eq!(value, json!("offline"));
    let mut after = Probe::connect(broker.port, &status_topic).await;
    let (value, retained) = after.next_on(&status_topic).await;
    assert_eq!((value, retained), (json!("offline"), true));
}

/// The bridge at QoS 2 (`mqtt.qos = 2`) to a probe subscribed at QoS 2:
/// both legs run the four-packet handshake, and each committed batch
/// arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_qos_2_each_committed_batch_reaches_mqtt_once() {
    let broker = TestBroker::start();
    let prefix = unique("qos2");
    let mut probe = Probe::connect_at(broker.port, &format!("{prefix}/#"), QoS::ExactlyOnce).await;
    let (port, topic_prefix) = (broker.port, prefix.clone());
    let hub = spawn_hub_with(move |s| {
        s.mqtt.enabled = true;
        s.mqtt.url = format!("mqtt://127.0.0.1:{port}");
        s.mqtt.client_id = unique("hub");
        s.mqtt.topic_prefix = topic_prefix;
        s.mqtt.qos = 2;
    })
    .await;
    probe.next_on(&hub_status(&hub, &prefix)).await;
    let (mut dev, _) = RawDevice::connect(&hub, "mq-q2").await;
    let topic = format!("{prefix}/devices/mq-q2/readings");
    for seq in 1..=3u64 {
        let ts = 1_767_225_600_000 + seq as i64;
        dev.send(batch(vec![reading(seq, "t", ts, seq as f64)]))
            .await;
        dev.ack_through(seq).await;
        let (msg, _, qos) = probe.next_at(&topic).await;
        assert_eq!(msg["readings"][0]["seq"], seq, "{msg}");
        assert_eq!(qos, QoS::ExactlyOnce, "delivered at QoS 2 end to end");
    }
    let quiet = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some((t, payload, ..))) = tokio::time::timeout_at(quiet, probe.rx.recv()).await {
        assert_ne!(
            t,
            topic,
            "delivered twice: {}",
            String::from_utf8_lossy(&payload)
        );
    }
    drop(dev);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_mqtt_reach_the_device_and_events_come_back() {
    let broker = TestBroker::start();
    let prefix = unique("cmd");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let hub = hub_with_bridge(&prefix, broker.port).await;
    probe.next_on(&hub_status(&hub, &prefix)).await;
    let fleet = SimFleet::start(&hub, "mqc-", 1).await;
    let events = format!("{prefix}/devices/mqc-00001/commands/events");
    probe
        .publish(
            &format!("{prefix}/devices/mqc-00001/commands"),
            r#"{"name": "ping", "request_id": "req-7", "ttl_s": 30}"#,
        )
        .await;
    let mut states = Vec::new();
    let mut last = Value::Null;
    while states.last().map(String::as_str) != Some("SUCCEEDED") {
        let (event, _) = probe.next_on(&events).await;
        assert_eq!(event["request_id"], "req-7");
        states.push(event["state"].as_str().unwrap().to_owned());
        last = event;
    }
    assert_eq!(states, ["QUEUED", "SENT", "RECEIVED", "SUCCEEDED"]);
    assert!(last["result"]["pong"].is_i64(), "{last}");
    // The same lifecycle and persistence as gRPC.
    let info = hub.command(last["command_id"].as_str().unwrap()).await;
    assert_eq!(state(&info), pb::CommandState::Succeeded);
    assert_eq!(info.expires_at_ms - info.created_at_ms, 30_000);
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_commands_topic_lands_on_the_errors_topic() {
    let broker = TestBroker::start();
    let prefix = unique("garbage");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let hub = hub_with_bridge(&prefix, broker.port).await;
    probe.next_on(&hub_status(&hub, &prefix)).await;
    hub.register_offline("mq-g").await;
    let errors = format!("{prefix}/errors");
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            format!("{prefix}/devices/mq-g/commands"),
            b"not json".to_vec(),
            "not a command",
        ),
        (
            format!("{prefix}/devices/mq-g/commands"),
            br#"{"params": {}}"#.to_vec(),
            "name",
        ),
        (
            format!("{prefix}/devices/mq-g/commands"),
            br#"{"name": "x", "params": [1]}"#.to_vec(),
            "JSON object",
        ),
        (
            format!("{prefix}/devices/bad id/commands"),
            br#"{"name": "ping"}"#.to_vec(),
            "device_id",
        ),
        (
            format!("{prefix}/devices/nobody/commands"),
            br#"{"name": "ping"}"#.to_vec(),
            "unknown device",
        ),
        (
            format!("{prefix}/devices/mq-g/commands"),
            format!(
                r#"{{"name": "ping", "params": {{"pad": "{}"}}}}"#,
                "x".repeat(600)
            )
            .into_bytes(),
            // The core's one cap on params, whichever door they came through.
            "params of 610 bytes are over the limit of 256 bytes",
        ),
        (
            format!("{prefix}/devices/mq-g/commands"),
            format!(
                r#"{{"name": "ping", "params": {{"pad": "{}"}}}}"#,
                "x".repeat(2000)
            )
            .into_bytes(),
            "payload of 2039 bytes is over the limit of 1280 bytes",
        ),
    ];
    for (topic, payload, why) in &cases {
        probe.publish(topic, payload.clone()).await;
        let (error, _) = probe.next_on(&errors).await;
        assert!(
            error["error"].as_str().unwrap().contains(why),
            "{why}: {error}"
        );
        assert_eq!(error["topic"], topic.as_str());
    }
    assert_eq!(hub.stats().await.mqtt_bad_messages, cases.len() as u64);
    // The same params over gRPC meet the same rule and message.
    let err = hub
        .send_command(
            "mq-g",
            "ping",
            &format!(r#"{{"pad":"{}"}}"#, "x".repeat(600)),
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("params of 610 bytes are over the limit of 256 bytes"),
        "{}",
        err.message()
    );
    // And the hub goes on: a good command is accepted.
    probe
        .publish(
            &format!("{prefix}/devices/mq-g/commands"),
            r#"{"name": "ping"}"#,
        )
        .await;
    let (event, _) = probe
        .next_on(&format!("{prefix}/devices/mq-g/commands/events"))
        .await;
    assert_eq!(event["state"], "QUEUED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_rides_out_a_broker_restart_and_ingest_never_stalls() {
    // The broker is down when the hub starts: the hub starts anyway.
    let mut broker = TestBroker::start();
    broker.kill();
    let prefix = unique("restart");
    let hub = hub_with_bridge(&prefix, broker.port).await;
    let fleet = SimFleet::start(&hub, "mqr-", 4).await;
    assert!(!hub.stats().await.mqtt_connected);
    let acked_at_start = device_sim::FleetStats::get(&fleet.stats.acked);
    wait_until("acks before any broker", || async {
        device_sim::FleetStats::get(&fleet.stats.acked) > acked_at_start + 40
    })
    .await;
    broker.restart();
    wait_until("bridge connected", || async {
        hub.stats().await.mqtt_connected
    })
    .await;

    // Killed mid-run.
    broker.kill();
    wait_until("bridge notices", || async {
        !hub.stats().await.mqtt_connected
    })
    .await;
    // Ingest goes on while the broker is away: acks keep coming.
    let acked_at_kill = device_sim::FleetStats::get(&fleet.stats.acked);
    wait_until("acks without a broker", || async {
        device_sim::FleetStats::get(&fleet.stats.acked) > acked_at_kill + 40
    })
    .await;

    broker.restart();
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    // Retained statuses are published again, and readings flow.
    let (status, _) = probe
        .next_on(&format!("{prefix}/devices/mqr-00001/status"))
        .await;
    assert_eq!(status["online"], true);
    let (msg, _) = probe
        .next_on(&format!("{prefix}/devices/mqr-00002/readings"))
        .await;
    assert!(!msg["readings"].as_array().unwrap().is_empty());
    assert!(hub.stats().await.mqtt_connected);

    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert_eq!(summary.sent, summary.acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_committed_readings_and_a_slow_one_only_skips() {
    let hub = spawn_hub_with(|s| s.ingest.fanout_capacity = 4).await;
    let mut op = hub.operator().await;
    let mut watch = op
        .watch_readings(pb::WatchReadingsRequest {
            device_id: "w-dev".into(),
            sensor: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // A watcher that never reads, on a connection with a tiny window.
    let slow_channel = hub.tiny_window_channel().await;
    let mut slow = pb::operator_client::OperatorClient::new(slow_channel)
        .watch_readings(pb::WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let (mut dev, _) = RawDevice::connect(&hub, "w-dev").await;
    let now = now_ms();
    dev.send(batch(vec![
        reading(1, "t", now, 1.0),
        reading(2, "other", now, 2.0),
        reading(3, "t", now, 3.0),
    ]))
    .await;
    dev.ack_through(3).await;
    let event = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let seen: Vec<(String, u64, f64)> = event
        .readings
        .iter()
        .map(|r| (r.sensor.clone(), r.seq, r.value))
        .collect();
    assert_eq!(
        seen,
        vec![("t".into(), 1, 1.0), ("t".into(), 3, 3.0)],
        "filtered by device and sensor"
    );
    assert_eq!(event.skipped, 0);

    // Lots of readings while the slow watcher reads nothing: ingest and
    // acks are unaffected.
    let fleet = SimFleet::start(&hub, "w-fleet-", 8).await;
    let before = hub.stats().await.readings_committed;
    wait_until("plenty committed", || async {
        hub.stats().await.readings_committed > before + 400
    })
    .await;
    let summary = fleet.finish().await;
    assert!(
        summary.all_clean() && summary.sent == summary.acked,
        "{summary:?}"
    );

    // Now the slow watcher reads: what was buffered for it (at most the
    // fan-out's capacity and its own small channel), then it is told it
    // skipped readings, and after that it sees new ones again.
    let mut skipped = 0;
    for _ in 0..64 {
        let event = tokio::time::timeout(WAIT, slow.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        skipped += event.skipped;
        if skipped > 0 {
            break;
        }
    }
    assert!(skipped > 0, "the slow watcher was told it skipped readings");
    dev.send(batch(vec![reading(4, "late", now, 4.0)])).await;
    dev.ack_through(4).await;
    loop {
        let event = tokio::time::timeout(WAIT, slow.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if event.readings.iter().any(|r| r.sensor == "late") {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_speaks_tls_to_an_mqtts_broker() {
    let pki = Pki::new("broker CA");
    let (cert, key) = pki.issue("broker", "broker", true);
    let Some((broker, tls_port)) = TestBroker::start_with_tls(&cert, &key) else {
        return;
    };
    let prefix = unique("tls");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let ca = pki.ca_path();
    let hub = spawn_hub_with(move |s| {
        s.mqtt.enabled = true;
        s.mqtt.url = format!("mqtts://127.0.0.1:{tls_port}");
        s.mqtt.ca = ca;
        s.mqtt.client_id = unique("hub");
        s.mqtt.topic_prefix = prefix.clone();
    })
    .await;
    let prefix = hub.settings.mqtt.topic_prefix.clone();
    // The hub's messages come through the TLS listener.
    let (value, _) = probe.next_on(&hub_status(&hub, &prefix)).await;
    assert_eq!(value, json!("online"));
    let (dev, _) = RawDevice::connect(&hub, "tls-dev").await;
    dev.send(batch(vec![reading(1, "t", now_ms(), 1.5)])).await;
    let (msg, _) = probe
        .next_on(&format!("{prefix}/devices/tls-dev/readings"))
        .await;
    assert_eq!(msg["readings"][0]["value"], 1.5);
    assert!(hub.stats().await.mqtt_connected);

    // A hub that does not trust the broker's CA never connects.
    let strange = Pki::new("another CA");
    let ca = strange.ca_path();
    let untrusting = spawn_hub_with(move |s| {
        s.mqtt.enabled = true;
        s.mqtt.url = format!("mqtts://127.0.0.1:{tls_port}");
        s.mqtt.ca = ca;
        s.mqtt.client_id = unique("hub");
    })
    .await;
    wait_until("its TLS handshakes fail", || async {
        untrusting.stats().await.mqtt_connection_errors >= 2
    })
    .await;
    assert!(!untrusting.stats().await.mqtt_connected);
    // It keeps trying (backoff) and ingest is unaffected.
    let (mut other, _) = RawDevice::connect(&untrusting, "tls-other").await;
    other
        .send(batch(vec![reading(1, "t", now_ms(), 1.0)]))
        .await;
    assert_eq!(other.ack_through(1).await.0, 1);
}

/// Two hubs on one PostgreSQL database, bridged to one broker: each has its
/// own status topic, a command published once is created once (the hubs
/// share one subscription) and reaches the device on either hub, and each
/// state change is published once, by the hub that committed it (hubs
/// publish independently: events of one command may arrive out of order
/// across hubs, and say when they happened).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_on_one_broker_create_each_mqtt_command_once() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let broker = TestBroker::start();
    let prefix = unique("pair");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let (mut a, mut b) = bridged_pair(db, &broker, &prefix).await;
    for hub in [&a, &b] {
        let topic = format!("{prefix}/hubs/{}/status", hub.hub().hub_id());
        assert_eq!(probe.next_on(&topic).await.0, "online");
    }
    let fleet = SimFleet::start(&b, "pair-", 1).await;
    fleet.wait_for_acks(1).await;
    let events = format!("{prefix}/devices/pair-00001/commands/events");
    probe
        .publish(
            &format!("{prefix}/devices/pair-00001/commands"),
            r#"{"name": "ping"}"#,
        )
        .await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let (event, _) = probe.next_on(&events).await;
        seen.push((
            event["at_ms"].as_i64().unwrap(),
            event["state"].as_str().unwrap().to_owned(),
        ));
    }
    // Each state once, whichever hub's connection delivered it first.
    let order = ["QUEUED", "SENT", "RECEIVED", "SUCCEEDED"];
    let mut states: Vec<&str> = seen.iter().map(|(_, s)| s.as_str()).collect();
    states.sort_by_key(|s| order.iter().position(|x| x == s));
    assert_eq!(states, order, "each once: {seen:?}");
    // And their times say in which order they happened.
    seen.sort_by_key(|(_, s)| order.iter().position(|x| x == s));
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    let listed = a
        .operator()
        .await
        .list_commands(pb::ListCommandsRequest {
            device_id: "pair-00001".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.commands.len(), 1, "created once: {listed:?}");
    // Nothing published twice. A marker command through each hub: each
    // hub publishes what it committed in commit order, so once both
    // markers' QUEUED (committed by the hub each went through) and
    // SUCCEEDED (by B, which holds the device) are out, a second copy of
    // the first command's events would have been out before them.
    let first = listed.commands[0].command_id.clone();
    let mut markers = Vec::new();
    for hub in [&a, &b] {
        markers.push(
            hub.send_command("pair-00001", "ping", "", None)
                .await
                .unwrap()
                .command_id,
        );
    }
    let mut marker_states: Vec<(String, String)> = Vec::new();
    let mut again = Vec::new();
    let wanted = |id: &str| ["QUEUED", "SUCCEEDED"].map(|s| (id.to_owned(), s.to_owned()));
    while !markers
        .iter()
        .all(|id| wanted(id).iter().all(|w| marker_states.contains(w)))
    {
        let (event, _) = probe.next_on(&events).await;
        let id = event["command_id"].as_str().unwrap().to_owned();
        let state = event["state"].as_str().unwrap().to_owned();
        if id == first {
            again.push(state);
        } else {
            marker_states.push((id, state));
        }
    }
    assert!(
        again.is_empty(),
        "the first command's events again: {again:?}"
    );
    fleet.finish().await;
    a.stop().await;
    b.stop().await;
}

/// MQTT commands are a door of their own: off unless `mqtt.commands`, so a
/// bridge for readings does not let anyone on the broker send commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_mqtt_are_refused_unless_the_door_is_opened() {
    let broker = TestBroker::start();
    let prefix = unique("closed");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    // Retained: the broker hands it to the hub the moment the hub
    // subscribes, before the hub's own status (published after it). (On
    // PostgreSQL the hub's subscription is shared, which gets no retained
    // messages: there the test shows less.)
    probe
        .publish_retained(
            &format!("{prefix}/devices/mq-closed/commands"),
            r#"{"name": "reboot"}"#,
        )
        .await;
    let port = broker.port;
    let bridge_prefix = prefix.clone();
    let hub = spawn_hub_with(move |s| {
        s.mqtt.enabled = true;
        s.mqtt.url = format!("mqtt://127.0.0.1:{port}");
        s.mqtt.client_id = unique("hub");
        s.mqtt.topic_prefix = bridge_prefix;
    })
    .await;
    probe.next_on(&hub_status(&hub, &prefix)).await;
    hub.register_offline("mq-closed").await;
    // A command through the operator API after it: its events are told on
    // MQTT, and by then an MQTT command would have been created too.
    let sent = hub
        .send_command("mq-closed", "ping", "", None)
        .await
        .unwrap();
    let (event, _) = probe
        .next_on(&format!("{prefix}/devices/mq-closed/commands/events"))
        .await;
    assert_eq!(event["command_id"], sent.command_id.as_str(), "{event}");
    let listed = hub
        .operator()
        .await
        .list_commands(pb::ListCommandsRequest {
            device_id: "mq-closed".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.commands.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["ping"], "nothing came in over MQTT");
    assert_eq!(hub.stats().await.mqtt_bad_messages, 0);
}

/// A device that moved to another hub is that hub's to announce: the hub it
/// left does not take its retained status back to offline when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_stopping_leaves_a_moved_devices_status_to_its_new_hub() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let broker = TestBroker::start();
    let prefix = unique("moved");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let (mut a, mut b) = bridged_pair(db, &broker, &prefix).await;
    let status = format!("{prefix}/devices/roamer/status");
    let (mut on_a, _) = RawDevice::connect(&a, "roamer").await;
    assert_eq!(probe.next_on(&status).await.0["online"], true);
    let (mut on_b, _) = RawDevice::connect(&b, "roamer").await;
    assert_eq!(
        on_a.end_code().await,
        tonic::Code::Aborted,
        "A let go of it"
    );
    assert_eq!(probe.next_on(&status).await.0["online"], true);
    a.stop().await;
    // What a newcomer to the broker reads is B's word.
    let mut after = Probe::connect(broker.port, &status).await;
    let (value, retained) = after.next_on(&status).await;
    assert!(retained);
    assert_eq!(value["online"], true, "{value}");
    on_b.half_close();
    assert_eq!(on_b.end_code().await, tonic::Code::Ok);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_are_retained_on_mqtt_and_desired_changes_come_in_through_its_door() {
    let broker = TestBroker::start();
    let prefix = unique("twin");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/#")).await;
    let hub = hub_with_bridge(&prefix, broker.port).await;
    probe.next_on(&hub_status(&hub, &prefix)).await;
    let fleet = SimFleet::start(&hub, "mqt-", 1).await;
    let reported_topic = format!("{prefix}/devices/mqt-00001/twin/reported");
    let (first, retained) = probe.next_on(&reported_topic).await;
    assert!(!retained, "published live");
    assert!(first["version"].as_u64().unwrap() >= 1, "{first}");

    // A desired change through MQTT: the core's path (versions, limits).
    probe
        .publish(
            &format!("{prefix}/devices/mqt-00001/twin/desired/set"),
            r#"{"desired": {"sample_rate_hz": 10}, "if_version": 0}"#,
        )
        .await;
    let (desired, _) = probe
        .next_on(&format!("{prefix}/devices/mqt-00001/twin/desired"))
        .await;
    assert_eq!(
        desired,
        serde_json::json!({"version": 1, "desired": {"sample_rate_hz": 10}})
    );
    // The simulator applies it and reports it.
    loop {
        let (report, _) = probe.next_on(&reported_topic).await;
        if report["reported"]["sample_rate_hz"] == 10 {
            break;
        }
    }
    // A stale version is refused on the errors topic.
    probe
        .publish(
            &format!("{prefix}/devices/mqt-00001/twin/desired/set"),
            r#"{"desired": {"sample_rate_hz": 1}, "if_version": 0, "request_id": "r-9"}"#,
        )
        .await;
    let (error, _) = probe.next_on(&format!("{prefix}/errors")).await;
    assert_eq!(error["request_id"], "r-9");
    assert!(
        error["error"].as_str().unwrap().contains("version 1"),
        "{error}"
    );
    fleet.finish().await;

    // Retained: a client that comes later reads both documents at once.
    let mut late = Probe::connect(broker.port, &format!("{prefix}/devices/mqt-00001/twin/+")).await;
    let (desired, retained) = late
        .next_on(&format!("{prefix}/devices/mqt-00001/twin/desired"))
        .await;
    assert!(retained);
    assert_eq!(desired["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_changes_are_published_per_device() {
    let broker = TestBroker::start();
    let prefix = unique("alarm");
    let mut probe = Probe::connect(broker.port, &format!("{prefix}/alarms/#")).await;
    let hub = hub_with_bridge(&prefix, broker.port).await;
    crate::alarms::put_rule(
        &hub.http_url(),
        "mq-hot",
        serde_json::json!({"severity": "minor", "threshold": {"sensor": "t", "raise": "> 5"}}),
    )
    .await;
    let (mut dev, _) = RawDevice::connect(&hub, "mq-al").await;
    let ts = now_ms() - 1_000;
    dev.send(batch(vec![
        reading(1, "t", ts, 9.0),
        reading(2, "t", ts + 1, 1.0),
    ]))
    .await;
    dev.ack_through(2).await;
    let topic = format!("{prefix}/alarms/mq-al");
    let (raised, retained) = probe.next_on(&topic).await;
    assert!(!retained);
    assert_eq!(raised["kind"], "raised");
    assert_eq!(raised["alarm"]["rule"], "mq-hot");
    let (cleared, _) = probe.next_on(&topic).await;
    assert_eq!(cleared["kind"], "cleared");
    assert_eq!(cleared["alarm"]["id"], raised["alarm"]["id"]);
    assert!(cleared["id"].as_i64() > raised["id"].as_i64());
}
