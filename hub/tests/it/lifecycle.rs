//! Sessions ending, hubs restarting and shutting down.

use std::time::Duration;

use telemetry_proto::v1::hub_message::Msg as HubMsg;
use tonic::Code;

use crate::harness::*;
use crate::ingest::{run_fleet, small_fleet};

// (peak_rss_mib and the storm test are at the end of this file.)

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
async fn a_silent_peer_is_dropped_after_the_keepalive_and_others_go_on() {
    let hub = spawn_hub_with(|s| s.server.keepalive = Duration::from_millis(500)).await;
    let (mut bystander, _) = RawDevice::connect(&hub, "dev-awake").await;
    let link = FaultyLink::to(hub.addr).await;
    let devices = connect_many(&link.channel().await, "dev-silent", 5).await;
    assert_eq!(live_sessions(&hub).await, 6);
    // The sockets stay open but nothing gets through (a SIGSTOPped device):
    // only the HTTP/2 keepalive can tell.
    link.freeze();
    let now = now_ms();
    let mut seq = 0;
    wait_until("only the bystander left", async || {
        seq += 1;
        bystander
            .send(batch(vec![reading(seq, "t", now, 1.0)]))
            .await;
        bystander.ack_through(seq).await;
        live_sessions(&hub).await == 1
    })
    .await;
    for i in 0..5 {
        let id = format!("dev-silent-{i}");
        assert_eq!(hub.readings(&id).await.len(), 1, "{id}: its acked reading");
    }
    drop(devices);
    drop(bystander);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_data_survives_a_restart() {
    let mut hub = spawn_hub().await;
    let summary = run_fleet(hub.url(), small_fleet(5), 500).await;
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
async fn sqlite_a_clean_stop_leaves_nothing_staged_and_no_free_pages() {
    // Nothing is compacted while the fleet runs: every reading is staged
    // when the stop begins.
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 10_000_000).await;
    let summary = run_fleet(hub.url(), small_fleet(5), 500).await;
    assert!(summary.all_clean() && summary.acked > 0, "{summary:?}");
    let mut db = DbConn::open(&hub.settings).await;
    let staged: i64 = db.scalar("SELECT count(*) FROM readings_recent").await;
    assert_eq!(staged as u64, summary.acked, "staged while running");
    hub.stop().await;
    let staged: i64 = db.scalar("SELECT count(*) FROM readings_recent").await;
    let in_blocks: i64 = db
        .scalar("SELECT coalesce(sum(count), 0) FROM blocks")
        .await;
    assert_eq!((staged, in_blocks as u64), (0, summary.acked));
    // The pages staging held went back to the file system.
    let mode: i64 = db.scalar("PRAGMA auto_vacuum").await;
    let free: i64 = db.scalar("PRAGMA freelist_count").await;
    let page: i64 = db.scalar("PRAGMA page_size").await;
    assert_eq!(
        (mode, free, page),
        (2, 0, 16384),
        "a new database: incremental auto-vacuum, 16 KiB pages; nothing free"
    );
    hub.restart().await;
    let mut total = 0;
    for i in 1..=5 {
        total += hub.readings(&device_sim::device_id("sim-", i)).await.len() as u64;
    }
    assert_eq!(total, summary.acked, "every reading reads back from blocks");
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
    // The writer waits up to 10 s for more rows before it commits: the
    // batch is in flight (held, not committed) when the shutdown begins.
    let mut hub = spawn_hub_with(|s| s.ingest.max_batch_delay = Duration::from_secs(10)).await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-sd").await;
    let now = now_ms();
    dev.send(batch((1..=30).map(|s| reading(s, "t", now, 1.0)).collect()))
        .await;
    wait_until("the writer holds the batch", || async {
        hub.stats().await.ingest_uncommitted == 30
    })
    .await;
    assert_eq!(hub.stats().await.readings_committed, 0, "not committed yet");
    hub.stop().await;
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

/// Peak resident memory of this test process (the hub and the simulated
/// devices together), in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_devices_reconnect_at_once_after_a_restart_and_lose_nothing() {
    let devices = 5_000;
    let mut hub = spawn_hub().await;
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: hub.url(),
        devices,
        rate_hz: 1.0,
        batch_interval: std::time::Duration::from_millis(500),
        connections: Some(50),
        id_prefix: "storm-".into(),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(devices as u64).await;
    // Every stream ends at once (UNAVAILABLE); all devices come back
    // together, bounded only by their backoff.
    let started = std::time::Instant::now();
    hub.restart().await;
    wait_until_within(
        "every device back",
        std::time::Duration::from_secs(120),
        || async { hub.hub().metrics().live_sessions() == devices as u64 },
    )
    .await;
    let recovery = started.elapsed();
    fleet.wait_for_acks(devices as u64).await;
    eprintln!(
        "storm: {devices} devices back {recovery:?} after the restart began; \
         peak RSS of hub + simulated fleet {} MiB",
        peak_rss_mib()
    );
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert!(summary.reconnects >= devices as u64, "{summary:?}");
    assert_stored_exactly(&hub, "storm-", &summary).await;
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_reads_nothing_is_dropped_and_harms_no_one() {
    let hub = spawn_hub_with(|s| {
        s.server.send_timeout = std::time::Duration::from_secs(1);
        s.server.outbound_buffer = 4;
        s.commands.outbox = 2;
        s.commands.max_pending_per_device = 500;
    })
    .await;
    let (mut bystander, _) = RawDevice::connect(&hub, "dev-by").await;
    hub.register_offline("dev-stuck").await;
    let mut queued = Vec::new();
    for _ in 0..200 {
        let cmd = hub
            .send_command("dev-stuck", "set_rate", r#"{"hz": 1}"#, None)
            .await
            .unwrap();
        queued.push(cmd.command_id);
    }
    // The stuck device: a 1 KiB window and it never reads after Welcome.
    let mut stuck = RawDevice::open(hub.tiny_window_channel().await, hello("dev-stuck")).await;
    assert!(matches!(stuck.next().await, Ok(Some(HubMsg::Welcome(_)))));
    let now = now_ms();
    for start in (1..=200u64).step_by(50) {
        stuck
            .send(batch(
                (start..start + 50)
                    .map(|i| reading(i, "t", now, i as f64))
                    .collect(),
            ))
            .await;
    }
    bystander_outlives_the_stuck(&hub, &mut bystander, 0, now).await;
    // What the hub took for it is bounded by its buffers: the rest of its
    // commands still wait in its own queue.
    let mut waiting = 0;
    for id in &queued {
        if state(&hub.command(id).await) == telemetry_proto::v1::CommandState::Queued {
            waiting += 1;
        }
    }
    assert!(
        waiting >= 150,
        "only a handful left the queue: {waiting} waiting"
    );
    // When it reads again, it learns why.
    let (code, acked, _) = read_to_the_end(&mut stuck).await;
    assert_eq!(code, Code::DeadlineExceeded);
    assert_acked_is_stored(&hub, "dev-stuck", acked).await;
    drop(bystander);
    drop(stuck);
    hub.assert_no_leaks().await;
}

/// The stream takes its acks from the session's slot as the writer commits
/// (no channel fills up): a device that sends readings and never reads
/// its acks is dropped after the send timeout all the same, the others go
/// on, and everything it was acked is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_reads_its_acks_is_dropped_after_the_send_timeout() {
    let hub = spawn_hub_with(|s| s.server.send_timeout = Duration::from_secs(2)).await;
    let (mut bystander, _) = RawDevice::connect(&hub, "dev-by").await;
    // A 1 KiB stream window on a 1 MiB connection window: h2's own guard
    // against many small unread DATA frames (half the connection window)
    // does not end the stream first.
    let channel = tonic::transport::Endpoint::from_shared(hub.url())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1 << 20))
        .connect()
        .await
        .unwrap();
    let mut stuck = RawDevice::open(channel, hello("dev-stuck")).await;
    assert!(matches!(stuck.next().await, Ok(Some(HubMsg::Welcome(_)))));
    let now = now_ms();
    // A batch per commit (the bystander's ack marks each commit): an Ack
    // each, ~10 bytes of window apiece, far more than the stuck stream's
    // 1 KiB. (Sends after the hub dropped it fail; they are not counted.)
    let to_stuck = stuck.sender();
    let mut sent = 0;
    for seq in 1..=400u64 {
        if to_stuck
            .send(batch(vec![reading(seq, "t", now, 1.0)]))
            .await
            .is_ok()
        {
            sent = seq;
        }
        bystander
            .send(batch(vec![reading(seq, "t", now, 1.0)]))
            .await;
        bystander.ack_through(seq).await;
    }
    drop(to_stuck);
    assert!(
        sent > 120,
        "the window filled before the test began: {sent} sent"
    );
    bystander_outlives_the_stuck(&hub, &mut bystander, 400, now).await;
    // When it reads again, it learns why.
    let (code, acked, others) = read_to_the_end(&mut stuck).await;
    assert_eq!(code, Code::DeadlineExceeded);
    assert_eq!(others, 0, "only acks were due");
    assert!(
        (100..sent).contains(&acked),
        "the acks before the window filled were read, not more: {acked} of {sent}"
    );
    assert_acked_is_stored(&hub, "dev-stuck", acked).await;
    drop(bystander);
    drop(stuck);
    hub.assert_no_leaks().await;
}

/// The bystander keeps sending, each batch acked after seq `after`, until
/// it is the only live session: the stuck stream was dropped, and no one
/// else waited for it.
async fn bystander_outlives_the_stuck(
    hub: &TestHub,
    bystander: &mut RawDevice,
    after: u64,
    now: i64,
) {
    let mut seq = after;
    wait_until("the stuck stream dropped", async || {
        seq += 1;
        bystander
            .send(batch(vec![reading(seq, "t", now, 1.0)]))
            .await;
        bystander.ack_through(seq).await;
        hub.hub().metrics().live_sessions() == 1
    })
    .await;
}

/// Reads what a dropped stream still holds: how it ended, the last seq it
/// was acked, and how many messages other than Acks came.
async fn read_to_the_end(stuck: &mut RawDevice) -> (Code, u64, usize) {
    let (mut acked, mut others) = (0, 0);
    loop {
        match stuck.next().await {
            Ok(Some(HubMsg::Ack(a))) => acked = a.acked_seq,
            Ok(Some(_)) => others += 1,
            Ok(None) => return (Code::Ok, acked, others),
            Err(status) => return (status.code(), acked, others),
        }
    }
}

/// Everything the device was acked is stored, seqs 1..=n without a gap.
async fn assert_acked_is_stored(hub: &TestHub, device: &str, acked: u64) {
    let stored = hub.readings(device).await;
    assert!(stored.len() as u64 >= acked, "everything acked is stored");
    assert_eq!(
        stored.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=stored.len() as u64).collect::<Vec<_>>()
    );
}

/// `device-sim --hub A,B`: the devices that start at a hub that is not
/// there move on to the next one, and the fleet's readings are all stored
/// there exactly once. (Groundwork of issue 12's failover between hubs
/// that share one database.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_fail_over_to_the_next_hub_url() {
    let hub = spawn_hub().await;
    // Reserved and never listened on.
    let reserved = reserve_port();
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], reserved.port));
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: format!("http://{dead}, {}", hub.url()),
        devices: 4,
        rate_hz: 20.0,
        id_prefix: "fo-".into(),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(40).await;
    let summary = fleet.finish().await;
    assert_eq!(summary.clean_devices, 4, "{summary:?}");
    assert!(
        summary.reconnects >= 2,
        "half the devices started at the dead hub: {summary:?}"
    );
    assert_fleet_stored_exactly(&hub, "fo-", &summary).await;
    hub.assert_no_leaks().await;
}
