//! Several hubs on one PostgreSQL database (issue 12): a device may connect
//! to any of them, the hub that accepts its Hello claims it, and a hub
//! whose claim is stale can commit nothing for it. These tests always use
//! PostgreSQL (whatever HUB_TEST_BACKEND says) and skip without it.

use std::time::{Duration, Instant};

use telemetry_proto::v1 as pb;
use tonic::Code;

use crate::crash::{ChildHub, operator};
use crate::harness::*;
use crate::twin::{connect_twin, get_twin, next_desired, parsed, reported_through, set_desired};
use serde_json::json;

/// Two in-process hubs on one fresh PostgreSQL database.
async fn two_hubs() -> Option<(TestHub, TestHub)> {
    let db = TestDb::postgres().await?;
    let a = spawn_hub_in(db, |_| {}).await;
    let b = a.spawn_peer(|_| {}).await;
    assert_ne!(a.hub().hub_id(), b.hub().hub_id());
    Some((a, b))
}

fn readings(seqs: std::ops::RangeInclusive<u64>) -> pb::DeviceMessage {
    let base = now_ms() - 3_600_000;
    batch(
        seqs.map(|s| reading(s, "t", base + s as i64, s as f64))
            .collect(),
    )
}

/// The seqs a hub returns for a device, sorted.
async fn seqs(hub: &TestHub, device: &str) -> Vec<u64> {
    let mut seqs: Vec<u64> = hub.readings(device).await.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_to_another_hub_mid_stream_loses_and_doubles_nothing() {
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let (mut on_a, welcome) = RawDevice::connect(&a, "mover").await;
    assert_eq!(welcome.acked_seq, 0);
    on_a.send(readings(1..=100)).await;
    assert_eq!(on_a.ack_through(100).await.0, 100);

    // The device turns up at hub B while its stream to A is still open
    // (a load balancer moved it): B welcomes it with A's mark, and A ends
    // the old stream.
    let (mut on_b, welcome) = RawDevice::connect(&b, "mover").await;
    assert_eq!(welcome.acked_seq, 100, "B knows what A stored");
    assert_eq!(on_a.end_code().await, Code::Aborted, "A let go of it");

    // It resends from its last ack and a bit before: duplicates, not rows.
    on_b.send(readings(51..=200)).await;
    let (acked, _, duplicates) = on_b.ack_through(200).await;
    assert_eq!((acked, duplicates), (200, 50));

    // And back to A.
    let (mut back, welcome) = RawDevice::connect(&a, "mover").await;
    assert_eq!(welcome.acked_seq, 200);
    assert_eq!(on_b.end_code().await, Code::Aborted);
    back.send(readings(201..=250)).await;
    assert_eq!(back.ack_through(250).await.0, 250);

    let all: Vec<u64> = (1..=250).collect();
    assert_eq!(seqs(&a, "mover").await, all, "each once, seen from A");
    assert_eq!(seqs(&b, "mover").await, all, "each once, seen from B");
    let mut db = DbConn::open(&a.settings).await;
    let devices = db.devices("mover").await;
    assert_eq!(devices.len(), 1);
    let (key, _, mark, count) = devices[0].clone();
    assert_eq!((mark, count), (250, 250));
    let mut stored = db.stored_seqs(key).await;
    stored.sort_unstable();
    assert_eq!(stored, (1..=250).collect::<Vec<i64>>());
    back.half_close();
    assert_eq!(back.end_code().await, Code::Ok);
    a.stop().await;
    b.stop().await;
}

/// An operator's removal through one hub ends the device's stream on
/// another, which writes nothing more for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_removed_through_one_hub_is_cut_off_on_the_other() {
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let (mut dev, _) = RawDevice::connect(&a, "gone").await;
    dev.send(readings(1..=5)).await;
    assert_eq!(dev.ack_through(5).await.0, 5);
    b.operator()
        .await
        .remove_device(pb::RemoveDeviceRequest {
            device_id: "gone".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        dev.end_code().await,
        Code::Unauthenticated,
        "A let go of it"
    );
    let mut again = RawDevice::open(a.channel().await, hello("gone")).await;
    assert_eq!(again.end_code().await, Code::Unauthenticated, "refused now");
    a.stop().await;
    b.stop().await;
}

/// Re-adding a device (a new token) through one hub ends its stream on
/// another, which was on the old credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_re_added_through_one_hub_is_cut_off_on_the_other() {
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let (mut dev, _) = RawDevice::connect(&b, "readded").await;
    dev.send(readings(1..=5)).await;
    assert_eq!(dev.ack_through(5).await.0, 5);
    a.operator()
        .await
        .add_device(pb::AddDeviceRequest {
            device_id: "readded".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        dev.end_code().await,
        Code::Unauthenticated,
        "B let go of the stream on the old credentials"
    );
    a.stop().await;
    b.stop().await;
}

/// Fencing holds without the notice: another hub's claim that A never
/// heard of (its notice lost) still stops A from writing for the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_whose_claim_is_stale_writes_nothing_for_the_device() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = spawn_hub_in(db, |_| {}).await;
    let (mut dev, _) = RawDevice::connect(&a, "fenced").await;
    dev.send(readings(1..=10)).await;
    assert_eq!(dev.ack_through(10).await.0, 10);
    // A claim by a hub that sent no notice: the epoch moves, nothing else.
    let mut conn = DbConn::open(&a.settings).await;
    let claimed: i64 = conn
        .scalar(
            "UPDATE devices SET epoch = epoch + 1, hub = 'elsewhere' \
             WHERE external_id = 'fenced' RETURNING epoch",
        )
        .await;
    assert_eq!(claimed, 2);
    dev.send(readings(11..=20)).await;
    assert_eq!(dev.end_code().await, Code::Aborted, "fenced at its commit");
    assert_eq!(seqs(&a, "fenced").await, (1..=10).collect::<Vec<_>>());
    let stats = a.stats().await;
    assert_eq!(stats.readings_stored, 10, "nothing of the fenced batch");
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_racing_for_one_device_leave_exactly_one_stream_that_writes() {
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let mut next_seq = 1u64;
    for round in 0..10 {
        let device = format!("race-{round}");
        let open = async |hub: &TestHub| {
            let mut dev = RawDevice::open(hub.channel().await, hello(&device)).await;
            let welcome = dev.next().await;
            (dev, welcome)
        };
        let (first, second) = tokio::join!(open(&a), open(&b));
        // Both sent a batch after their Welcome: one is written and acked,
        // the other stream ends ABORTED (told by the winner's claim, or
        // fenced at its commit) and writes nothing. The loser may be ended
        // before its Welcome, or before it sends: that is a win too.
        let mut streams = [first, second];
        for (stream, welcome) in &streams {
            if let (Some(tx), Ok(_)) = (&stream.tx, welcome) {
                let _ = tx.send(readings(next_seq..=next_seq + 9)).await;
            }
        }
        let mut outcomes = Vec::new();
        for (stream, welcome) in &mut streams {
            let next = match welcome {
                Ok(Some(pb::hub_message::Msg::Welcome(_))) => stream.next().await,
                Err(status) => Err(status.clone()),
                other => panic!("{device}: expected a Welcome or an end, got {other:?}"),
            };
            outcomes.push(match next {
                Ok(Some(pb::hub_message::Msg::Ack(ack))) => Ok(ack.acked_seq),
                Err(status) => Err(status.code()),
                other => panic!("{device}: expected an Ack or an end, got {other:?}"),
            });
        }
        let acked: Vec<u64> = outcomes.iter().filter_map(|o| (*o).ok()).collect();
        let aborted = outcomes
            .iter()
            .filter(|o| **o == Err(Code::Aborted))
            .count();
        assert_eq!(
            (acked.len(), aborted),
            (1, 1),
            "{device}: exactly one winner: {outcomes:?}"
        );
        assert_eq!(acked[0], next_seq + 9);
        let want: Vec<u64> = (next_seq..=next_seq + 9).collect();
        assert_eq!(seqs(&a, &device).await, want, "{device}");
        next_seq += 10;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_through_one_hub_reaches_the_device_on_another_and_both_see_it() {
    use pb::{CommandState as S, CommandStatus};
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let (mut dev, _) = RawDevice::connect(&b, "cmd-dev").await;
    let sent = a
        .send_command("cmd-dev", "reboot", r#"{"delay":1}"#, None)
        .await
        .unwrap();
    assert_eq!(state(&sent), S::Queued);
    let id = sent.command_id.clone();
    let device_side = async {
        let command = dev.next_command().await;
        assert_eq!(
            (command.command_id.as_str(), command.name.as_str()),
            (id.as_str(), "reboot")
        );
        dev.reply(&id, CommandStatus::Received, "", "").await;
        dev.reply(&id, CommandStatus::Succeeded, "done", r#"{"ok":true}"#)
            .await;
    };
    let (seen_a, seen_b, ()) = tokio::join!(
        a.watch_until_final(&id),
        b.watch_until_final(&id),
        device_side
    );
    for (hub, seen) in [("A", &seen_a), ("B", &seen_b)] {
        assert_eq!(
            seen.last().map(state),
            Some(S::Succeeded),
            "watched from {hub}: {seen:?}"
        );
    }
    let history = |info: &pb::CommandInfo| -> Vec<S> {
        info.history
            .iter()
            .map(|t| S::try_from(t.state).unwrap())
            .collect()
    };
    let (from_a, from_b) = (a.command(&id).await, b.command(&id).await);
    assert_eq!(from_a, from_b, "one log, the same answer from each hub");
    assert_eq!(
        history(&from_a),
        vec![S::Queued, S::Sent, S::Received, S::Succeeded]
    );
    assert_eq!(from_a.attempts, 1);

    // Created through A while the device is on neither hub, delivered when
    // it comes back to B; cancelled through B, seen as such from A.
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    let later = a
        .send_command("cmd-dev", "calibrate", "", None)
        .await
        .unwrap();
    let doomed = a.send_command("cmd-dev", "wipe", "", None).await.unwrap();
    let cancelled = b
        .operator()
        .await
        .cancel_command(pb::CancelCommandRequest {
            command_id: doomed.command_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), S::Cancelled);
    let (mut dev, _) = RawDevice::connect(&b, "cmd-dev").await;
    let command = dev.next_command().await;
    assert_eq!(
        command.command_id, later.command_id,
        "the cancelled one never goes out"
    );
    dev.reply(&later.command_id, CommandStatus::Succeeded, "", "")
        .await;
    let seen = a.watch_until_final(&later.command_id).await;
    assert_eq!(seen.last().map(state), Some(S::Succeeded), "{seen:?}");
    assert_eq!(state(&a.command(&doomed.command_id).await), S::Cancelled);
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hub_shows_where_devices_are_and_a_dead_hubs_devices_go_offline_within_the_lease() {
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let (mut dev, _) = RawDevice::connect(&b, "where").await;
    let online = |info: Option<pb::DeviceInfo>| info.unwrap().online;
    assert!(online(a.device("where").await), "A sees it on B");
    assert!(online(b.device("where").await));
    // A stream that ends is offline everywhere at once.
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    wait_until("offline on A", async || !online(a.device("where").await)).await;
    // Moving to A: online on both, not flickering offline from B's end.
    let (_on_b, _) = RawDevice::connect(&b, "where").await;
    let (_on_a, _) = RawDevice::connect(&a, "where").await;
    for hub in [&a, &b] {
        let listed = hub
            .operator()
            .await
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(listed.devices.iter().all(|d| d.online), "{listed:?}");
    }
    b.stop().await;

    // A hub that dies holding a stream: its device is offline within the
    // lease (10 s) on the hubs that live on.
    let reserved = reserve_port();
    let port = reserved.port;
    let mut child = ChildHub::start_with(&a.settings, port);
    child.wait_line("listening on").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut orphan = RawDevice::open(channel, hello("orphan")).await;
    assert!(matches!(
        orphan.next().await,
        Ok(Some(pb::hub_message::Msg::Welcome(_)))
    ));
    assert!(
        online(a.device("orphan").await),
        "A sees it on the child hub"
    );
    let killed = Instant::now();
    child.kill().await;
    wait_until_within(
        "offline after the lease",
        Duration::from_secs(20),
        async || !online(a.device("orphan").await),
    )
    .await;
    let gone = killed.elapsed();
    assert!(
        gone >= Duration::from_secs(5),
        "not before the lease: {gone:?}"
    );
    eprintln!("a dead hub's device showed offline {gone:?} after its SIGKILL");
    a.stop().await;
}

/// On PostgreSQL blocks live in monthly partitions, made with their first
/// block; retention drops a month whose blocks are all older than the
/// cutoff, counts kept true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_are_partitioned_by_month_and_retention_drops_old_months() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    // Readings of 2020, stored before retention is switched on (with it,
    // the hub refuses readings it would delete at once).
    let mut hub = spawn_hub_in(db, |s| s.storage.compact_rows = 8).await;
    let jan_2020 = 1_577_836_800_000i64;
    let (mut dev, _) = RawDevice::connect(&hub, "old-and-new").await;
    dev.send(batch(
        (1..=100u64)
            .map(|s| reading(s, "t", jan_2020 + s as i64 * 60_000, s as f64))
            .collect(),
    ))
    .await;
    let now = now_ms();
    dev.send(batch(
        (101..=200u64)
            .map(|s| reading(s, "t", now - 1_000 + s as i64, s as f64))
            .collect(),
    ))
    .await;
    assert_eq!(dev.ack_through(200).await.0, 200);
    drop(dev);
    let partitions = async |hub: &TestHub| -> Vec<String> {
        let mut conn = DbConn::open(&hub.settings).await;
        let DbConn::Postgres(c) = &mut conn else {
            unreachable!("a PostgreSQL test")
        };
        sqlx::query_scalar(
            "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'blocks'::regclass ORDER BY 1",
        )
        .fetch_all(c)
        .await
        .unwrap()
    };
    // The 2020 month is made and compacted into (right after the commit),
    // then dropped by retention (its first pass 3 s after the start).
    wait_until("January 2020 made", async || {
        partitions(&hub).await.iter().any(|n| n == "blocks_p202001")
    })
    .await;
    hub.settings.storage.retention = Duration::from_secs(30);
    hub.restart().await;
    wait_until("January 2020 dropped", async || {
        let names = partitions(&hub).await;
        !names.iter().any(|n| n == "blocks_p202001")
            && names.iter().any(|n| n.starts_with("blocks_p20"))
    })
    .await;
    let kept: Vec<u64> = hub
        .readings("old-and-new")
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(kept, (101..=200).collect::<Vec<_>>(), "only this month's");
    let info = hub.device("old-and-new").await.unwrap();
    assert_eq!(info.readings, 100, "the count follows the dropped month");
    hub.stop().await;
}

/// Both hubs stage into the same tables and compact and merge the same
/// parts and series: every reading ends in exactly one place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_compacting_and_merging_the_same_tables_store_every_reading_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let small = |s: &mut hub::Settings| s.storage.compact_rows = 80;
    let mut a = spawn_hub_in(db, small).await;
    let mut b = a.spawn_peer(small).await;
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        // Devices spread over A, B, A: devices that share a staging part
        // (key mod 8) are on different hubs.
        hub: format!("{},{},{}", a.url(), b.url(), a.url()),
        devices: 16,
        rate_hz: 200.0,
        id_prefix: "both-".into(),
        batch_interval: Duration::from_millis(20),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(30_000).await;
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    for hub in [&a, &b] {
        let m = hub.hub().metrics();
        assert!(m.compactions.load(Relaxed) > 0, "both compact");
        assert_eq!(m.compaction_failures.load(Relaxed), 0);
        assert_eq!(m.commit_failures.load(Relaxed), 0);
    }
    let merges = a.hub().metrics().merges.load(Relaxed) + b.hub().metrics().merges.load(Relaxed);
    assert!(merges > 0, "blocks were merged");
    assert_fleet_stored_exactly(&a, "both-", &summary).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_under_load_loses_no_acked_reading_and_its_devices_move() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let (reserved_a, reserved_b) = (reserve_port(), reserve_port());
    let (port_a, port_b) = (reserved_a.port, reserved_b.port);
    let mut hub_a = ChildHub::start(&db, port_a);
    hub_a.wait_line("listening on").await;
    let mut hub_b = ChildHub::start(&db, port_b);
    hub_b.wait_line("listening on").await;

    let devices = 10;
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        // Half the fleet starts on each hub.
        hub: format!("http://127.0.0.1:{port_a},http://127.0.0.1:{port_b}"),
        devices,
        rate_hz: 200.0,
        id_prefix: "ha-".into(),
        batch_interval: Duration::from_millis(50),
        connections: Some(2),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(4_000).await;

    // A command for every device, sent through B just before A dies: half
    // of them are for A's devices, in flight there.
    let mut op = operator(&format!("http://127.0.0.1:{port_b}")).await;
    let mut commands = Vec::new();
    for d in 1..=devices {
        let info = op
            .send_command(pb::SendCommandRequest {
                device_id: device_sim::device_id("ha-", d),
                name: "ping".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        commands.push(info.command_id);
    }
    let killed = Instant::now();
    hub_a.kill().await;
    // Every device streams again, on B.
    wait_until("every device online at B", async || {
        let listed = op
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .unwrap()
            .into_inner();
        listed.devices.iter().filter(|d| d.online).count() == devices
    })
    .await;
    let failover = killed.elapsed();
    fleet.wait_for_acks(2_000).await;
    // Every command ends in a true state: run once, SUCCEEDED.
    for id in &commands {
        wait_until("the command is final", async || {
            let info = op
                .get_command(pb::GetCommandRequest {
                    command_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            info.state == pb::CommandState::Succeeded as i32
        })
        .await;
    }
    let summary = fleet.finish().await;
    eprintln!(
        "failover: every device streamed to B {failover:?} after A's SIGKILL; \
         {} readings acked, {} reconnects",
        summary.acked, summary.reconnects
    );
    assert!(summary.all_clean(), "{summary:?}");
    assert_eq!(
        summary.commands_executed, devices as u64,
        "each command run once: {summary:?}"
    );
    assert!(
        summary.reconnects >= devices as u64 / 2,
        "A's devices moved: {summary:?}"
    );
    hub_b.terminate();
    drop(hub_b);
    let mut checker = spawn_hub_in(db, |_| {}).await;
    assert_fleet_stored_exactly(&checker, "ha-", &summary).await;
    checker.stop().await;
}

/// Another hub's retention may drop a month this hub still believes it
/// made: the next compaction into it makes the month again at once, with
/// no failed compaction and nothing refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_dropped_elsewhere_is_made_again_by_the_next_compaction() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let hub = spawn_hub_in(db, |s| s.storage.compact_rows = 8).await;
    let jan_2020 = 1_577_836_800_000i64;
    let old = |seqs: std::ops::RangeInclusive<u64>| {
        batch(
            seqs.map(|s| reading(s, "t", jan_2020 + s as i64 * 60_000, s as f64))
                .collect(),
        )
    };
    let mut conn = DbConn::open(&hub.settings).await;
    let staged = async |conn: &mut DbConn| -> i64 {
        let mut total = 0;
        for part in 0..8 {
            total += conn
                .scalar::<i64>(&format!("SELECT count(*) FROM readings_recent_{part}"))
                .await;
        }
        total
    };
    let (mut dev, _) = RawDevice::connect(&hub, "dropped-month").await;
    dev.send(old(1..=100)).await;
    assert_eq!(dev.ack_through(100).await.0, 100);
    wait_until("January 2020 compacted into", async || {
        staged(&mut conn).await == 0
    })
    .await;
    // As another hub's retention would (its blocks go with it).
    let DbConn::Postgres(c) = &mut conn else {
        unreachable!("a PostgreSQL test")
    };
    sqlx::query("DROP TABLE blocks_p202001")
        .execute(&mut *c)
        .await
        .unwrap();

    dev.send(old(101..=200)).await;
    assert_eq!(dev.ack_through(200).await.0, 200);
    wait_until("the new readings compacted", async || {
        staged(&mut conn).await == 0
    })
    .await;
    let stats = hub.stats().await;
    assert_eq!(stats.compaction_failures, 0, "{stats:?}");
    assert!(stats.storage_ok, "{stats:?}");
    let kept: Vec<u64> = seqs(&hub, "dropped-month").await;
    assert_eq!(kept, (101..=200).collect::<Vec<_>>());
}

/// A stream's end clears its device's presence only while no newer stream
/// (of this hub or another) holds it: an old stream's offline write racing
/// a quick reconnect must not show the live device offline elsewhere. (A
/// race: each device here closes a stream and opens the next at once, and
/// every one must end up online as B sees it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_streams_end_never_shows_a_reconnected_device_offline() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = spawn_hub_in(db, |s| s.ingest.max_batch_delay = Duration::ZERO).await;
    let b = a.spawn_peer(|_| {}).await;
    let ids: Vec<String> = (0..40).map(|i| format!("flicker-{i:02}")).collect();
    let mut first = Vec::new();
    for id in &ids {
        first.push(RawDevice::connect(&a, id).await.0);
    }
    let mut live = Vec::new();
    for (id, old) in ids.iter().zip(first) {
        let channel = a.channel();
        drop(old);
        live.push(RawDevice::open(channel.await, hello(id)).await);
    }
    for dev in &mut live {
        assert!(matches!(
            dev.next().await,
            Ok(Some(pb::hub_message::Msg::Welcome(_)))
        ));
    }
    // Presence changes are written in order: once a later device's end
    // shows on B, every earlier end has been written.
    let (mut marker, _) = RawDevice::connect(&a, "flicker-marker").await;
    marker.half_close();
    assert_eq!(marker.end_code().await, Code::Ok);
    wait_until("the marker offline on B", async || {
        !b.device("flicker-marker").await.unwrap().online
    })
    .await;
    for id in &ids {
        assert!(b.device(id).await.unwrap().online, "{id} is live on A");
    }
}

/// With retention on, a device with a wrong clock cannot make a monthly
/// partition for every month back to 2000 on a shared database: readings
/// older than the cutoff are refused by whichever hub takes them (counted
/// in the ack), and neither hub makes their month.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_older_than_retention_make_no_partition_on_any_hub() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let retained = |s: &mut hub::Settings| {
        s.storage.retention = Duration::from_secs(3600);
        s.storage.compact_rows = 8;
    };
    let a = spawn_hub_in(db, retained).await;
    let b = a.spawn_peer(retained).await;
    let jan_2001 = 978_307_200_000i64;
    for (hub, device) in [(&a, "clock-a"), (&b, "clock-b")] {
        let (mut dev, _) = RawDevice::connect(hub, device).await;
        dev.send(batch(vec![
            reading(1, "t", jan_2001, 1.0),
            reading(2, "t", now_ms(), 2.0),
        ]))
        .await;
        assert_eq!(dev.ack_through(2).await, (2, 1, 0), "{device}");
        assert_eq!(seqs(hub, device).await, [2]);
    }
    let mut conn = DbConn::open(&a.settings).await;
    let DbConn::Postgres(c) = &mut conn else {
        unreachable!("a PostgreSQL test")
    };
    let old: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname = 'blocks_p200101'")
            .fetch_one(&mut *c)
            .await
            .unwrap();
    assert_eq!(old, 0, "no partition for January 2001");
}

/// A certificate revoked through one hub ends the streams that presented
/// it on the others too (the revocation is announced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_through_one_hub_is_cut_off_on_the_other() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let pki = Pki::new("cluster CA");
    let (server_cert, server_key) = pki.issue("hub", "hub", true);
    let ca_path = pki.ca_path();
    let tls = |s: &mut hub::Settings| {
        s.server.tls.cert = server_cert.clone();
        s.server.tls.key = server_key.clone();
        s.server.tls.client_ca = ca_path.clone();
        s.auth.devices = hub::config::DeviceAuthMode::Tls;
    };
    let a = spawn_hub_in(db, tls).await;
    let b = a.spawn_peer(tls).await;
    let channel = |hub: &TestHub, identity: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(pki.ca());
        if let Some((cert, key)) = identity {
            config = config.identity(tonic::transport::Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ));
        }
        tonic::transport::Endpoint::from_shared(format!("https://{}", hub.addr))
            .unwrap()
            .tls_config(config)
            .unwrap()
            .connect_lazy()
    };
    let leaked = pki.issue("leaked", "cut-dev", false);
    let mut dev = RawDevice::open(channel(&b, Some(leaked.clone())), hello("cut-dev")).await;
    assert!(matches!(
        dev.next().await,
        Ok(Some(pb::hub_message::Msg::Welcome(_)))
    ));
    let der = crate::security::pem_der(&leaked.0);
    let answer = pb::operator_client::OperatorClient::new(channel(&a, None))
        .revoke_certificate(pb::RevokeCertificateRequest {
            sha256: hex::encode(hub::auth::certificate_sha256(&der)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.streams_ended, 0, "A held no stream on it");
    assert_eq!(dev.end_code().await, Code::Unauthenticated, "B ended it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_change_through_one_hub_reaches_the_device_on_another_and_a_mover_converges() {
    let Some((a, b)) = two_hubs().await else {
        return;
    };
    let (mut on_b, _) = connect_twin(&b, "tw-cl", 0).await;
    let mut watch_a = a
        .operator()
        .await
        .watch_twin(pb::WatchTwinRequest {
            device_id: "tw-cl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch_a.message().await.unwrap().is_some(), "the twin now");

    // Changes through A reach the stream on B in order, each within a
    // second (as whole documents: B does not know A's patches).
    for version in 1..=3u64 {
        let started = Instant::now();
        let twin = set_desired(&a, "tw-cl", json!({"step": version}), Some(version - 1))
            .await
            .unwrap();
        assert_eq!(twin.desired_version, version);
        let desired = next_desired(&mut on_b).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(desired.version, version);
        assert_eq!(parsed(&desired.json)["step"], json!(version));
    }
    // Both hubs at once: the versions stay gap-free and ordered.
    let (x, y) = tokio::join!(
        set_desired(&a, "tw-cl", json!({"x": 1}), None),
        set_desired(&b, "tw-cl", json!({"y": 1}), None)
    );
    let mut versions = [x.unwrap().desired_version, y.unwrap().desired_version];
    versions.sort_unstable();
    assert_eq!(versions, [4, 5]);
    // What the device holds: whole documents replace, patches merge.
    let mut held = json!({"step": 3});
    loop {
        let desired = next_desired(&mut on_b).await;
        if desired.full {
            held = parsed(&desired.json);
        } else {
            for (k, v) in parsed(&desired.json).as_object().unwrap() {
                held[k] = v.clone();
            }
        }
        if desired.version == 5 {
            break;
        }
        assert_eq!(desired.version, 4);
    }
    assert_eq!(held, json!({"step": 3, "x": 1, "y": 1}));

    // Reported through B: seen from A (its watchers too), in sync.
    on_b.send(reported(1, json!({"step": 3, "x": 1, "y": 1})))
        .await;
    reported_through(&mut on_b, 1).await;
    assert_eq!(parsed(&get_twin(&a, "tw-cl").await.delta_json), json!({}));
    let seen = loop {
        let event = tokio::time::timeout(WAIT, watch_a.message())
            .await
            .expect("a twin event on A")
            .unwrap()
            .unwrap();
        if event.part == pb::TwinPart::Reported as i32
            && parsed(&event.twin.as_ref().unwrap().reported_json)["step"] == json!(3)
        {
            break event;
        }
    };
    assert!(seen.twin.is_some());

    // A change while the device moves to A: it converges there.
    set_desired(&b, "tw-cl", json!({"z": 1}), Some(5))
        .await
        .unwrap();
    let (mut on_a, welcome) = connect_twin(&a, "tw-cl", 5).await;
    assert_eq!(welcome.reported_seq, 1);
    let desired = next_desired(&mut on_a).await;
    assert_eq!((desired.version, desired.full), (6, true));
    assert_eq!(parsed(&desired.json)["z"], json!(1));
    assert_eq!(on_b.end_code().await, Code::Aborted);
    drop(watch_a);
    on_a.half_close();
    assert_eq!(on_a.end_code().await, Code::Ok);
}

/// An alarm raised while a device streams to one hub is cleared by the
/// other after the device moves: its open alarm and pending conditions are
/// read from the database, so there is no second alarm and no missed
/// clear; the late reading rule holds across the move. Inactivity runs on
/// one hub (the lease holder) for the fleet: one alarm, not one per hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_follow_a_device_to_another_hub() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let fast = |s: &mut hub::Settings| s.alarms.check_interval = Duration::from_millis(200);
    let a = spawn_hub_in(db, fast).await;
    let b = a.spawn_peer(fast).await;
    crate::alarms::put_rule(
        &a.http_url(),
        "roam-hot",
        json!({"severity": "major", "target": {"device": "al-roam"},
               "threshold": {"sensor": "t", "raise": "> 30", "raise_for": "30s",
                             "clear": "< 20", "clear_for": "20s"}}),
    )
    .await;
    crate::alarms::put_rule(
        &b.http_url(),
        "roam-quiet",
        json!({"severity": "warning", "target": {"device": "al-quiet-2"}, "inactivity": {"after": "1s"}}),
    )
    .await;
    let base = now_ms() - 3_600_000;
    let at = |s: i64| base + s * 1_000;
    let (mut on_a, _) = RawDevice::connect(&a, "al-roam").await;
    on_a.send(batch(vec![
        reading(1, "t", at(0), 35.0),
        reading(2, "t", at(30), 35.0),
        // The clear condition begins here, on A...
        reading(3, "t", at(40), 10.0),
    ]))
    .await;
    on_a.ack_through(3).await;
    let alarms = crate::alarms::alarms_of(&b.http_url(), "al-roam").await;
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0]["state"], "active");
    let (mut on_b, _) = RawDevice::connect(&b, "al-roam").await;
    assert_eq!(on_a.end_code().await, Code::Aborted);
    // ...and holds long enough on B. A late reading (before 40 s) and a
    // hot one in between would have broken it had B not known.
    on_b.send(batch(vec![
        reading(4, "t", at(35), 99.0),
        reading(5, "t", at(50), 10.0),
        reading(6, "t", at(60), 10.0),
    ]))
    .await;
    on_b.ack_through(6).await;
    let alarms = crate::alarms::alarms_of(&a.http_url(), "al-roam").await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0]["state"], "cleared");
    assert_eq!(alarms[0]["cleared_ms"], at(60));

    // Inactivity: both hubs run the leader task; one holds the lease.
    let (mut quiet, _) = RawDevice::connect(&a, "al-quiet-2").await;
    quiet.send(batch(vec![reading(1, "t", at(0), 1.0)])).await;
    quiet.ack_through(1).await;
    wait_until("the inactivity alarm", async || {
        !crate::alarms::alarms_of(&a.http_url(), "al-quiet-2")
            .await
            .is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let alarms = crate::alarms::alarms_of(&a.http_url(), "al-quiet-2").await;
    assert_eq!(alarms.len(), 1, "one evaluator for the fleet: {alarms:?}");
}

/// Operators on one hub and the evaluator on another touch the same rows
/// (PostgreSQL): rules created at once under one name on two hubs, and
/// clears on A of the alarms B's device keeps raising, fail no group
/// (no unique violation, no deadlock) and lose no ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_changes_and_clears_from_two_hubs_fail_no_group() {
    use std::sync::atomic::Ordering::Relaxed;
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let rule = |v: i64| {
        json!({"severity": "minor", "target": {"device": "race-dev"},
               "threshold": {"sensor": "t", "raise": format!("> {v}"), "clear": format!("< {v}")}})
    };
    let (http_a, http_b) = (a.http_url(), b.http_url());
    for i in 0..8 {
        let name = format!("race-{i}");
        tokio::join!(
            crate::alarms::put_rule(&http_a, &name, rule(30)),
            crate::alarms::put_rule(&http_b, &name, rule(31)),
        );
    }
    let rules: serde_json::Value = reqwest::get(format!("{}/api/v1/alarm-rules", a.http_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rules = rules["rules"].as_array().unwrap();
    for i in 0..8 {
        let named: Vec<_> = rules
            .iter()
            .filter(|r| r["name"] == format!("race-{i}"))
            .collect();
        assert_eq!(named.len(), 1, "{rules:?}");
        assert_eq!(named[0]["version"], 2, "one create, one update: {named:?}");
    }
    // B's device flips the eight rules' alarms with every batch while an
    // operator on A clears whatever is open.
    let (mut dev, _) = RawDevice::connect(&b, "race-dev").await;
    let base = now_ms() - 3_600_000;
    let stop = tokio_util::sync::CancellationToken::new();
    let clearing = {
        let (http, stop) = (a.http_url(), stop.clone());
        tokio::spawn(async move {
            let mut cleared = 0;
            while !stop.is_cancelled() {
                for alarm in crate::alarms::alarms_of(&http, "race-dev").await {
                    if alarm["state"] != "cleared" {
                        let path = format!("/alarms/{}/clear", alarm["id"]);
                        let (status, body) =
                            crate::alarms::post(&http, &path, json!({"note": "race"})).await;
                        assert!(status < 500, "{status}: {body}");
                        cleared += 1;
                    }
                }
            }
            cleared
        })
    };
    let mut seq = 0;
    for round in 0..60 {
        let readings = (0..4)
            .map(|k| {
                seq += 1;
                let v = if (round + k) % 2 == 0 { 40.0 } else { 10.0 };
                reading(seq, "t", base + seq as i64 * 10, v)
            })
            .collect();
        dev.send(batch(readings)).await;
        dev.ack_through(seq).await;
    }
    stop.cancel();
    let cleared = clearing.await.unwrap();
    assert!(cleared > 0, "the operator cleared some alarms");
    for hub in [&a, &b] {
        assert_eq!(hub.hub().metrics().commit_failures.load(Relaxed), 0);
    }
    a.stop().await;
    b.stop().await;
}

/// A group PostgreSQL rolls back for a deadlock is run again, not failed:
/// a connection of the test's own holds an alarm row, the hub's group
/// (clearing that alarm) locks the series state and waits for it, then the
/// test's connection asks for the series state. PostgreSQL breaks the
/// cycle by aborting the group, which waited first; the hub runs it again
/// and the device gets its ack on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_rolled_back_for_a_deadlock_is_run_again() {
    use sqlx::Connection;
    use std::sync::atomic::Ordering::Relaxed;
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut hub = spawn_hub_in(db, |_| {}).await;
    crate::alarms::put_rule(
        &hub.http_url(),
        "dl",
        json!({"severity": "minor", "target": {"device": "dl-dev"},
               "threshold": {"sensor": "t", "raise": "> 30", "clear": "< 20"}}),
    )
    .await;
    let base = now_ms() - 3_600_000;
    let (mut dev, _) = RawDevice::connect(&hub, "dl-dev").await;
    dev.send(batch(vec![reading(1, "t", base, 40.0)])).await;
    dev.ack_through(1).await;
    let alarm = crate::alarms::alarms_of(&hub.http_url(), "dl-dev").await[0]["id"]
        .as_i64()
        .unwrap();
    let url = hub.settings.storage.url.as_str().to_owned();
    let mut other = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("UPDATE alarms SET last_value = last_value WHERE id = $1")
        .bind(alarm)
        .execute(&mut other)
        .await
        .unwrap();
    // Clears the alarm: the group writes the series state, then waits for
    // the alarm row.
    dev.send(batch(vec![reading(2, "t", base + 1_000, 10.0)]))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cycle = tokio::spawn(async move {
        let r = sqlx::query("UPDATE alarm_series SET state = state")
            .execute(&mut other)
            .await;
        let _ = sqlx::query("ROLLBACK").execute(&mut other).await;
        r.map(|_| ())
    });
    dev.ack_through(2).await;
    cycle
        .await
        .unwrap()
        .expect("the group was the deadlock's victim");
    assert_eq!(hub.hub().metrics().commit_failures.load(Relaxed), 0);
    let alarms = crate::alarms::alarms_of(&hub.http_url(), "dl-dev").await;
    assert_eq!(alarms[0]["state"], "cleared", "{alarms:?}");
    assert_eq!(
        crate::alarms::history(&hub.http_url(), &alarms[0]["id"]).await,
        ["raised", "cleared"]
    );
    drop(dev);
    hub.stop().await;
}

/// One hub drives jobs (the `jobs` lease); when it stops, another takes
/// the job over and finishes it, and each device gets its command once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_moves_to_another_hub_when_its_runner_stops() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let mut a = spawn_hub_in(db, |_| {}).await;
    let b = a.spawn_peer(|_| {}).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let stats = std::sync::Arc::new(device_sim::FleetStats::default());
    let cfg = device_sim::FleetConfig {
        hub: b.url(),
        devices: 30,
        rate_hz: 0.2,
        id_prefix: "jmv-".into(),
        ..Default::default()
    };
    let fleet = tokio::spawn(device_sim::run(cfg, stop.clone(), stats.clone()));
    wait_until("30 devices online", async || {
        device_sim::FleetStats::get(&stats.online) == 30
    })
    .await;
    let client = reqwest::Client::new();
    for i in 1..=30 {
        let resp = client
            .patch(format!("{}/api/v1/devices/jmv-{i:05}/twin", b.http_url()))
            .json(&json!({"tags": {"move": "yes"}}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    // A is the older hub: it took the lease first.
    let job: serde_json::Value = client
        .post(format!("{}/api/v1/jobs", a.http_url()))
        .json(&json!({"name": "moving", "target": {"tags": {"move": "yes"}},
                      "command": {"name": "ping"}, "rollout": {"per_minute": 300}, "concurrency": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_i64().unwrap();
    let url = format!("{}/api/v1/jobs/{id}", b.http_url());
    wait_until("the job under way", async || {
        let j: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        j["counts"]["succeeded"].as_u64().unwrap_or(0) >= 5
    })
    .await;
    a.stop().await;
    let mut done = serde_json::Value::Null;
    wait_until_within("B finishes the job", Duration::from_secs(60), async || {
        done = reqwest::get(&url).await.unwrap().json().await.unwrap();
        done["state"] != "in_progress"
    })
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    for i in 1..=30 {
        let list: serde_json::Value = reqwest::get(format!(
            "{}/api/v1/commands?device=jmv-{i:05}",
            b.http_url()
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        assert_eq!(
            list["commands"].as_array().unwrap().len(),
            1,
            "jmv-{i:05}: {list}"
        );
    }
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, fleet).await;
}

/// A line-protocol write to one hub never claims a device streaming to
/// another: it is refused (409, naming that hub) and the stream goes on;
/// once the stream has ended, the write is stored after its mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_one_hub_leaves_a_stream_on_another_alone() {
    let Some((mut a, mut b)) = two_hubs().await else {
        return;
    };
    let (mut dev, _) = RawDevice::connect(&b, "both").await;
    dev.send(readings(1..=10)).await;
    assert_eq!(dev.ack_through(10).await.0, 10);

    let line = format!("m,device=both v=1 {}", (now_ms() - 1_000) * 1_000_000);
    let (status, json, _) = crate::lines::post(&a.http_url(), "", line.clone(), &[]).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{json}");
    let said = crate::lines::message(&json);
    assert!(said.contains(b.hub().hub_id()), "names the hub: {said}");

    // B's stream was not fenced: it goes on writing.
    dev.send(readings(11..=20)).await;
    assert_eq!(dev.ack_through(20).await.0, 20);
    dev.half_close();
    dev.end_code().await;

    // Offline now (B records it as the stream ends): the write goes in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, json, _) = crate::lines::post(&a.http_url(), "", line.clone(), &[]).await;
        if status == reqwest::StatusCode::NO_CONTENT {
            break;
        }
        assert_eq!(status, reqwest::StatusCode::CONFLICT, "{json}");
        assert!(Instant::now() < deadline, "still refused: {json}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seqs(&a, "both").await, (1..=21).collect::<Vec<_>>());

    // A hub whose lease looks run out (its heartbeat stalled) holds nothing:
    // the write goes in, and clears that hub's online mark, so once its
    // heartbeat is fresh again writes are not refused for a stream it lost.
    let (mut dev, _) = RawDevice::connect(&b, "both").await;
    let mut db = DbConn::open(&a.settings).await;
    let sql = format!(
        "UPDATE hubs SET heartbeat_ms = 0 WHERE id = '{}' RETURNING 1",
        b.hub().hub_id()
    );
    assert_eq!(db.scalar::<i32>(&sql).await, 1);
    let (status, json, _) = crate::lines::post(&a.http_url(), "", line.clone(), &[]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{json}");
    assert_eq!(dev.end_code().await, Code::Aborted, "B let go of it");
    let online: Option<i64> = db
        .scalar("SELECT online_since_ms FROM devices WHERE external_id = 'both'")
        .await;
    assert_eq!(online, None);
    a.stop().await;
    b.stop().await;
}
