//! What a firmware author relies on: the stream's rules.

use std::time::Duration;

use telemetry_proto::v1::{
    self as pb, device_message::Msg as DeviceMsg, hub_message::Msg as HubMsg,
};
use tonic::Code;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_then_ack_after_commit_and_duplicates_counted() {
    let hub = spawn_hub().await;
    let (mut dev, welcome) = RawDevice::connect(&hub, "dev-a").await;
    assert_eq!(welcome.acked_seq, 0);
    assert_eq!(welcome.max_batch, hub.settings.server.max_batch);
    let now = now_ms();
    dev.send(batch(
        (1..=5).map(|s| reading(s, "t", now, s as f64)).collect(),
    ))
    .await;
    assert_eq!(dev.ack_through(5).await, (5, 0, 0));
    // 4 and 5 again plus 6: two duplicates, one new.
    dev.send(batch(
        (4..=6).map(|s| reading(s, "t", now, s as f64)).collect(),
    ))
    .await;
    assert_eq!(dev.ack_through(6).await, (6, 0, 2));
    let rows = hub.readings("dev-a").await;
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    let info = hub.device("dev-a").await.unwrap();
    assert!(info.online);
    assert_eq!((info.acked_seq, info.readings), (6, 6));
    assert_eq!(info.firmware, "test-fw/1");
    // A Hello's labels are reported state, not tags (operators own those).
    assert!(info.labels.is_empty(), "{:?}", info.labels);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_receives_every_ack_then_ok() {
    let hub = spawn_hub().await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-half").await;
    let now = now_ms();
    for b in 0..20u64 {
        dev.send(batch(
            (1..=50)
                .map(|i| reading(b * 50 + i, "t", now, 1.0))
                .collect(),
        ))
        .await;
    }
    dev.half_close();
    let mut last_ack = 0;
    loop {
        match dev.next().await {
            Ok(Some(HubMsg::Ack(a))) => {
                assert!(a.acked_seq >= last_ack, "acks are cumulative");
                last_ack = a.acked_seq;
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => break,
            Err(status) => panic!("expected OK after half-close, got {status:?}"),
        }
    }
    assert_eq!(last_ack, 1000, "every reading acked before the OK");
    assert_eq!(hub.readings("dev-half").await.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_stream_takes_over_and_nothing_is_stored_twice() {
    let hub = spawn_hub().await;
    let now = now_ms();
    let (mut old, _) = RawDevice::connect(&hub, "dev-t").await;
    old.send(batch((1..=10).map(|s| reading(s, "t", now, 0.5)).collect()))
        .await;
    assert_eq!(old.ack_through(10).await.0, 10);
    // Readings the old stream sends just before the takeover may or may not
    // be committed when the new Welcome is computed; the resend is deduped.
    old.send(batch(
        (11..=15).map(|s| reading(s, "t", now, 0.5)).collect(),
    ))
    .await;

    let (mut new, welcome) = RawDevice::connect(&hub, "dev-t").await;
    assert!(
        welcome.acked_seq == 10 || welcome.acked_seq == 15,
        "{welcome:?}"
    );
    assert_eq!(old.end_code().await, Code::Aborted);

    new.send(batch(
        (welcome.acked_seq + 1..=20)
            .map(|s| reading(s, "t", now, 0.5))
            .collect(),
    ))
    .await;
    assert_eq!(new.ack_through(20).await.0, 20);
    let seqs: Vec<u64> = hub.readings("dev-t").await.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert!(
        hub.device("dev-t").await.unwrap().online,
        "the new stream is live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_end_the_stream_with_clear_codes() {
    let hub = spawn_hub_with(|s| s.server.max_batch = 10).await;
    let now = now_ms();

    // Readings before Hello.
    let mut dev =
        RawDevice::open(hub.channel().await, batch(vec![reading(1, "t", now, 1.0)])).await;
    assert_eq!(dev.end_code().await, Code::FailedPrecondition);

    // An empty message before Hello.
    let mut dev = RawDevice::open(hub.channel().await, pb::DeviceMessage { msg: None }).await;
    assert_eq!(dev.end_code().await, Code::FailedPrecondition);

    // A second Hello.
    let (mut dev, _) = RawDevice::connect(&hub, "dev-v").await;
    dev.send(hello("dev-v")).await;
    assert_eq!(dev.end_code().await, Code::FailedPrecondition);

    // Bad device ids.
    for bad in ["", "has space", "ü", &"x".repeat(65)] {
        let mut dev = RawDevice::open(hub.channel().await, hello(bad)).await;
        assert_eq!(
            dev.end_code().await,
            Code::InvalidArgument,
            "device id {bad:?}"
        );
    }
    assert!(hub.device("has space").await.is_none(), "not registered");

    // A batch over max_batch, after some good readings which stay acked.
    let (mut dev, _) = RawDevice::connect(&hub, "dev-big").await;
    dev.send(batch((1..=10).map(|s| reading(s, "t", now, 1.0)).collect()))
        .await;
    dev.send(batch(
        (11..=21).map(|s| reading(s, "t", now, 1.0)).collect(),
    ))
    .await;
    let mut acked = 0;
    let code = loop {
        match dev.next().await {
            Ok(Some(HubMsg::Ack(a))) => acked = a.acked_seq,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(status) => break status.code(),
        }
    };
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(
        acked, 10,
        "the good batch was acked before the stream ended"
    );
    assert_eq!(hub.readings("dev-big").await.len(), 10);

    // A command reply for a command the hub never sent is ignored.
    let (mut dev, _) = RawDevice::connect(&hub, "dev-reply").await;
    dev.send(pb::DeviceMessage {
        msg: Some(DeviceMsg::CommandReply(pb::CommandReply {
            command_id: "no-such-command".into(),
            status: pb::CommandStatus::Succeeded as i32,
            ..Default::default()
        })),
    })
    .await;
    dev.send(batch(vec![reading(1, "t", now, 1.0)])).await;
    assert_eq!(dev.ack_through(1).await.0, 1, "the stream goes on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_resource_exhausted_and_harms_no_one_else() {
    let hub = spawn_hub_with(|s| s.server.max_message_bytes = 4096).await;
    let now = now_ms();
    let (mut bystander, _) = RawDevice::connect(&hub, "dev-small").await;
    let (mut big, _) = RawDevice::connect(&hub, "dev-huge").await;
    big.send(batch(
        (1..=400)
            .map(|s| reading(s, "temperature", now, 1.0))
            .collect(),
    ))
    .await;
    assert_eq!(big.end_code().await, Code::ResourceExhausted);

    bystander.send(batch(vec![reading(1, "t", now, 2.0)])).await;
    assert_eq!(bystander.ack_through(1).await.0, 1);
    assert!(hub.readings("dev-huge").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_readings_are_rejected_counted_and_the_stream_goes_on() {
    let hub = spawn_hub().await;
    let now = now_ms();
    let (mut dev, _) = RawDevice::connect(&hub, "dev-nan").await;
    dev.send(batch(vec![
        reading(1, "t", now, 1.0),
        reading(2, "t", now, f64::NAN),
        reading(3, "t", now, f64::INFINITY),
        reading(4, "", now, 1.0),
        reading(5, &"s".repeat(65), now, 1.0),
        reading(6, "t", now + 3_600_000, 1.0),
        reading(7, "t", now, 7.0),
    ]))
    .await;
    assert_eq!(dev.ack_through(7).await, (7, 5, 0));
    // The high-water mark moved past the rejected ones: a resend of 2 is a
    // duplicate, not a retry loop.
    dev.send(batch(vec![
        reading(2, "t", now, 2.0),
        reading(8, "t", now, 8.0),
    ]))
    .await;
    assert_eq!(dev.ack_through(8).await, (8, 0, 1));
    let seqs: Vec<u64> = hub
        .readings("dev-nan")
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, vec![1, 7, 8]);
    let stats = hub.stats().await;
    assert_eq!((stats.rejected, stats.duplicates), (5, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_drop_mid_batch_loses_and_duplicates_nothing() {
    let hub = spawn_hub().await;
    let now = now_ms();
    let (mut dev, _) = RawDevice::connect(&hub, "dev-r").await;
    dev.send(batch(
        (1..=100)
            .map(|s| reading(s, "t", now + s as i64, s as f64))
            .collect(),
    ))
    .await;
    assert_eq!(dev.ack_through(100).await.0, 100);
    // The next batch goes out and the connection drops before its ack.
    dev.send(batch(
        (101..=200)
            .map(|s| reading(s, "t", now + s as i64, s as f64))
            .collect(),
    ))
    .await;
    drop(dev);
    // The old stream is gone (its batch committed or dropped) before the
    // device comes back.
    wait_until("the old stream ended", || async {
        hub.hub().metrics().live_sessions() == 0
    })
    .await;

    let (mut dev, welcome) = RawDevice::connect(&hub, "dev-r").await;
    assert!(
        welcome.acked_seq == 100 || welcome.acked_seq == 200,
        "Welcome tells the committed mark: {welcome:?}"
    );
    let stored_now = hub.readings("dev-r").await.len() as u64;
    assert_eq!(stored_now, welcome.acked_seq, "the mark is what is stored");
    // A device that lost track resends from its last certain ack.
    dev.send(batch(
        (101..=250)
            .map(|s| reading(s, "t", now + s as i64, s as f64))
            .collect(),
    ))
    .await;
    let (acked, _, dups) = dev.ack_through(250).await;
    assert_eq!(acked, 250);
    assert_eq!(u64::from(dups), welcome.acked_seq - 100);
    let rows = hub.readings("dev-r").await;
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=250).collect::<Vec<_>>()
    );
    assert!(rows.iter().all(|r| r.value == r.seq as f64));
}

/// The writer sleeps through a group's wait, but a session that finds the
/// queue full wakes it: a device sending flat out is acked at once, not
/// after `max_batch_delay` (here 6 s; the Hello's own group waits it out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_committed_without_waiting_out_the_batch_delay() {
    let hub = spawn_hub_with(|s| {
        s.ingest.queue_capacity = 2;
        s.ingest.max_batch_delay = Duration::from_secs(6);
    })
    .await;
    let now = now_ms();
    let (mut dev, _) = RawDevice::connect(&hub, "dev-full").await;
    let tx = dev.tx.take().expect("send side open");
    let flood = tokio::spawn(async move {
        for b in 0..10u64 {
            let readings = (1..=10)
                .map(|i| reading(b * 10 + i, "t", now, 1.0))
                .collect();
            if tx.send(batch(readings)).await.is_err() {
                break;
            }
        }
        tx
    });
    let started = std::time::Instant::now();
    let (acked, rejected, duplicates) =
        tokio::time::timeout(Duration::from_secs(3), dev.ack_through(30))
            .await
            .expect("batches behind a full queue are acked before the batch delay is out");
    assert!(
        acked >= 30 && rejected == 0 && duplicates == 0,
        "{acked} {rejected} {duplicates}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(flood.await);
}

/// A takeover while the old stream still floods a full queue: what the old
/// stream queues after the new Welcome is fenced, never stored, so a device
/// that lost its state and continues from the Welcome loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_fences_what_the_old_stream_queues_after_the_welcome() {
    // One batch a commit and a queue of two: the old stream's reader is
    // nearly always waiting for room, with a batch queued behind the Hello.
    let hub = spawn_hub_with(|s| {
        s.ingest.queue_capacity = 2;
        s.ingest.max_batch_rows = 100;
    })
    .await;
    let now = now_ms();
    let (mut old, _) = RawDevice::connect(&hub, "dev-race").await;
    old.send(batch(
        (1..=100).map(|s| reading(s, "t", now, 1.0)).collect(),
    ))
    .await;
    old.ack_through(100).await;
    // The old stream sends flat out: its reader waits for room in the queue.
    let tx = old.tx.take().expect("send side open");
    let flood = tokio::spawn(async move {
        for b in 1..300u64 {
            let readings = (1..=100)
                .map(|i| reading(b * 100 + i, "t", now, 1.0))
                .collect();
            if tx.send(batch(readings)).await.is_err() {
                break;
            }
        }
    });
    old.ack_through(2000).await;

    let (mut new, welcome) = RawDevice::connect(&hub, "dev-race").await;
    let w = welcome.acked_seq;
    new.send(batch(
        (w + 1..=w + 10)
            .map(|s| reading(s, "t", now, 777.0))
            .collect(),
    ))
    .await;
    let (acked, rejected, duplicates) = new.ack_through(w + 10).await;
    assert_eq!(
        (acked, rejected, duplicates),
        (w + 10, 0, 0),
        "the new stream's readings after its Welcome are new"
    );
    assert_eq!(old.end_code().await, Code::Aborted);
    flood.abort();
    let rows = hub.readings("dev-race").await;
    let after: Vec<(u64, f64)> = rows
        .iter()
        .filter(|r| r.seq > w)
        .map(|r| (r.seq, r.value))
        .collect();
    assert_eq!(
        after,
        (w + 1..=w + 10).map(|s| (s, 777.0)).collect::<Vec<_>>(),
        "past the Welcome only the new stream's readings are stored"
    );
    assert_eq!(rows.len() as u64, w + 10, "nothing lost before the Welcome");
}

/// The Welcome is the stored mark even when the writer's cache of marks
/// starts over (here past 2 devices; 100,000 by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcomes_carry_the_stored_mark_when_the_writers_cache_starts_over() {
    let hub = spawn_hub_with(|s| s.ingest.cached_devices = 2).await;
    let now = now_ms();
    let ids: Vec<String> = (0..5).map(|i| format!("dev-cache-{i}")).collect();
    for id in &ids {
        let (mut dev, welcome) = RawDevice::connect(&hub, id).await;
        assert_eq!(welcome.acked_seq, 0);
        dev.send(batch((1..=5).map(|s| reading(s, "t", now, 1.0)).collect()))
            .await;
        dev.ack_through(5).await;
    }
    for _round in 0..2 {
        for id in &ids {
            let (_dev, welcome) = RawDevice::connect(&hub, id).await;
            assert_eq!(welcome.acked_seq, 5, "{id}'s stored mark");
        }
    }
}

/// Two hub processes on one SQLite file would each trust their own marks
/// and store readings twice: the second refuses to start, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_file_one_hub_a_second_refuses_to_start() {
    if sqlite_only("one process per database file") {
        return;
    }
    let hub = spawn_hub().await;
    let mut second = hub.settings.clone();
    second.server.listen = "127.0.0.1:0".parse().unwrap();
    let refused = match hub::Hub::start(second).await {
        Ok(_) => panic!("a second hub started on the same database"),
        Err(e) => format!("{e:#}"),
    };
    let path = hub.settings.storage.path.display().to_string();
    assert!(
        refused.contains(&path) && refused.contains("another hub process"),
        "{refused}"
    );
    // The first hub is unharmed.
    let (mut dev, _) = RawDevice::connect(&hub, "dev-one").await;
    dev.send(batch(vec![reading(1, "t", now_ms(), 1.0)])).await;
    assert_eq!(dev.ack_through(1).await.0, 1);
}

/// A device whose small messages the hub reads slowly (here: paced to one
/// reading a second) fills its HTTP/2 stream window and waits; it does
/// not make h2 close the whole connection ("too_many_data_frames", which
/// the 1 MiB default window let ~2,400 unread 40-byte messages trigger,
/// taking every other device on the connection with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_read_slowly_does_not_get_its_connection_closed() {
    let hub = spawn_hub_with(|s| s.server.max_readings_per_sec = 1).await;
    let mut slow = RawDevice::open(hub.channel().await, hello("slow-small")).await;
    assert!(matches!(slow.next().await, Ok(Some(HubMsg::Welcome(_)))));
    let tx = slow.sender();
    let base = now_ms() - 60_000;
    let sending = tokio::spawn(async move {
        for seq in 1..=3000u64 {
            let msg = batch(vec![reading(seq, "t", base + seq as i64, 1.0)]);
            if tx.send(msg).await.is_err() {
                break;
            }
            // One message per DATA frame, as devices send them.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    });
    // 6 s: past where the old window closed the connection.
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(6);
    while let Ok(next) = tokio::time::timeout_at(until, slow.next()).await {
        match next {
            Ok(Some(HubMsg::Ack(_))) => {}
            other => panic!("the slow device's stream broke: {other:?}"),
        }
    }
    sending.abort();
}
