//! Sessions ending, hubs restarting and shutting down.

use std::time::Duration;

use telemetry_proto::v1::hub_message::Msg as HubMsg;
use tonic::Code;

use crate::harness::*;
use crate::ingest::{run_fleet, small_fleet};

/// Connects `n` devices through `channel`, each with one acked reading.
async fn connect_many(
    channel: &tonic::transport::Channel,
    prefix: &str,
    n: usize,
) -> Vec<RawDevice> {
    let now = now_ms();
    let mut devices = Vec::new();
    for i in 0..n {
        let mut dev = RawDevice::open(channel.clone(), hello(&format!("{prefix}-{i}"))).await;
        assert!(matches!(dev.next().await, Ok(Some(HubMsg::Welcome(_)))));
        dev.send(batch(vec![reading(1, "t", now, 1.0)])).await;
        dev.ack_through(1).await;
        devices.push(dev);
    }
    devices
}

async fn live_sessions(hub: &TestHub) -> u64 {
    hub.hub().metrics().live_sessions()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_leave_no_live_sessions() {
    let hub = spawn_hub().await;
    let channel = hub.channel().await;
    let devices = connect_many(&channel, "dev-cancel", 20).await;
    assert_eq!(live_sessions(&hub).await, 20);
    // Dropping a call without a half-close cancels it (RST_STREAM).
    drop(devices);
    wait_until("live sessions back to 0", || async {
        live_sessions(&hub).await == 0
    })
    .await;
    assert!(hub.hub().registry().online().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_ends_every_session_on_it() {
    let hub = spawn_hub().await;
    let link = FaultyLink::to(hub.addr).await;
    let devices = connect_many(&link.channel().await, "dev-cut", 10).await;
    assert_eq!(live_sessions(&hub).await, 10);
    link.cut();
    wait_until("live sessions back to 0", || async {
        live_sessions(&hub).await == 0
    })
    .await;
    drop(devices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_after_the_keepalive() {
    let hub = spawn_hub_with(|s| s.server.keepalive = Duration::from_millis(500)).await;
    let link = FaultyLink::to(hub.addr).await;
    let devices = connect_many(&link.channel().await, "dev-silent", 5).await;
    assert_eq!(live_sessions(&hub).await, 5);
    // The sockets stay open but nothing gets through: only the HTTP/2
    // keepalive can tell.
    link.freeze();
    wait_until("live sessions back to 0", || async {
        live_sessions(&hub).await == 0
    })
    .await;
    drop(devices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_data_survives_a_restart() {
    let mut hub = spawn_hub().await;
    let summary = run_fleet(hub.url(), small_fleet(5), Duration::from_millis(800)).await;
    assert!(summary.all_clean() && summary.acked > 0, "{summary:?}");
    hub.restart().await;
    let mut total = 0;
    for i in 1..=5 {
        let id = device_sim::device_id("sim-", i);
        let rows = hub.readings(&id).await.len() as u64;
        let (_, welcome) = RawDevice::connect(&hub, &id).await;
        assert_eq!(welcome.acked_seq, rows, "{id}: Welcome after restart");
        total += rows;
    }
    assert_eq!(total, summary.acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rides_through_a_hub_restart_without_loss_or_duplicates() {
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 250).await;
    let url = hub.url();
    let stop = tokio_util::sync::CancellationToken::new();
    let stats = std::sync::Arc::new(device_sim::FleetStats::default());
    let fleet = tokio::spawn(device_sim::run(
        device_sim::FleetConfig {
            hub: url,
            ..small_fleet(8)
        },
        stop.clone(),
        stats.clone(),
    ));
    wait_until("readings flowing", || async {
        hub.stats().await.readings_committed > 500
    })
    .await;
    hub.restart().await;
    wait_until("devices back", || async {
        hub.stats().await.live_sessions == 8 && hub.stats().await.readings_committed > 500
    })
    .await;
    stop.cancel();
    let summary = tokio::time::timeout(WAIT, fleet)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(summary.all_clean(), "{summary:?}");
    assert!(
        summary.reconnects >= 8,
        "every device reconnected: {summary:?}"
    );
    assert_eq!(summary.sent, summary.acked);
    let mut total = 0;
    for i in 1..=8 {
        let id = device_sim::device_id("sim-", i);
        let rows = hub.readings(&id).await;
        let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), rows.len(), "{id}: no seq stored twice");
        assert_eq!(
            seqs,
            (1..=rows.len() as u64).collect::<Vec<_>>(),
            "{id}: no gaps"
        );
        total += rows.len() as u64;
    }
    assert_eq!(total, summary.acked, "every acked reading is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_acks_what_is_in_flight_then_tells_devices_to_come_back() {
    let mut hub = spawn_hub_with(|s| s.ingest.max_batch_delay = Duration::from_millis(200)).await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-sd").await;
    let now = now_ms();
    dev.send(batch((1..=30).map(|s| reading(s, "t", now, 1.0)).collect()))
        .await;
    // Wait until the batch is queued or written, not necessarily committed.
    wait_until("batch received", || async {
        let s = hub.stats().await;
        s.ingest_queue_depth > 0 || s.readings_committed == 30 || s.commits > 1
    })
    .await;
    let started = std::time::Instant::now();
    hub.stop().await;
    assert!(started.elapsed() < hub.settings.server.shutdown_timeout);
    let mut acked = 0;
    let code = loop {
        match dev.next().await {
            Ok(Some(HubMsg::Ack(a))) => acked = a.acked_seq,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status.code(),
        }
    };
    assert_eq!(
        acked, 30,
        "in-flight readings committed and acked before the close"
    );
    assert_eq!(code, Code::Unavailable);
}
