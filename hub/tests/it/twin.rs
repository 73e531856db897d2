//! The device twin (issue 20): desired state reaches the device on the
//! stream (at its next connect, or within a second when online), reported
//! patches are acked after their commit and never applied twice, tags
//! belong to operators, limits and versions hold. Run on SQLite and, with
//! HUB_TEST_BACKEND=postgres, on PostgreSQL.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use telemetry_proto::v1::{self as pb, hub_message::Msg as HubMsg};
use tonic::Code;

use crate::crash::ChildHub;
use crate::harness::*;

pub(crate) async fn connect_twin(hub: &TestHub, id: &str, held: u64) -> (RawDevice, pb::Welcome) {
    let mut dev = RawDevice::open(hub.channel().await, hello_twin(id, held)).await;
    match dev.next().await {
        Ok(Some(HubMsg::Welcome(w))) => (dev, w),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The next DesiredState (acks in between are passed over).
pub(crate) async fn next_desired(dev: &mut RawDevice) -> pb::DesiredState {
    loop {
        match dev.next().await {
            Ok(Some(HubMsg::Desired(d))) => return d,
            Ok(Some(HubMsg::Ack(_) | HubMsg::ReportedAck(_))) => {}
            other => panic!("expected DesiredState, got {other:?}"),
        }
    }
}

/// ReportedAcks until one covers `seq`: the last, with the rejections of
/// all of them and the last error.
pub(crate) async fn reported_through(dev: &mut RawDevice, seq: u64) -> pb::ReportedAck {
    let mut rejected = 0;
    let mut error = String::new();
    loop {
        match dev.next().await {
            Ok(Some(HubMsg::ReportedAck(mut a))) => {
                rejected += a.rejected;
                if !a.error.is_empty() {
                    error = a.error.clone();
                }
                if a.seq >= seq {
                    a.rejected = rejected;
                    a.error = error;
                    return a;
                }
            }
            Ok(Some(HubMsg::Ack(_))) => {}
            other => panic!("expected ReportedAck, got {other:?}"),
        }
    }
}

/// Sends a batch and reads until its Ack: nothing else may come first.
async fn only_ack_follows(dev: &mut RawDevice, seq: u64) {
    dev.send(batch(vec![reading(seq, "t", now_ms(), 1.0)]))
        .await;
    match dev.next().await {
        Ok(Some(HubMsg::Ack(a))) => assert!(a.acked_seq >= seq),
        other => panic!("expected only the Ack, got {other:?}"),
    }
}

pub(crate) async fn get_twin(hub: &TestHub, id: &str) -> pb::Twin {
    hub.operator()
        .await
        .get_twin(pb::GetTwinRequest {
            device_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn set_desired(
    hub: &TestHub,
    id: &str,
    patch: Value,
    if_version: Option<u64>,
) -> Result<pb::Twin, tonic::Status> {
    hub.operator()
        .await
        .update_desired(pb::UpdateDesiredRequest {
            device_id: id.into(),
            patch_json: patch.to_string(),
            if_version,
        })
        .await
        .map(tonic::Response::into_inner)
}

pub(crate) fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_change_made_offline_is_applied_at_the_next_connect() {
    let hub = spawn_hub().await;
    hub.register_offline("tw-off").await;
    let twin = set_desired(
        &hub,
        "tw-off",
        json!({"sample_rate_hz": 2, "led": {"on": true}}),
        None,
    )
    .await
    .unwrap();
    assert_eq!(twin.desired_version, 1);
    let twin = set_desired(&hub, "tw-off", json!({"led": {"color": "red"}}), None)
        .await
        .unwrap();
    assert_eq!(twin.desired_version, 2);
    assert_eq!(
        parsed(&twin.delta_json),
        json!({"sample_rate_hz": 2, "led": {"on": true, "color": "red"}}),
        "nothing reported yet: everything desired is the delta"
    );

    // The device holds nothing: the whole document after the Welcome.
    let (mut dev, welcome) = connect_twin(&hub, "tw-off", 0).await;
    assert_eq!(welcome.reported_seq, 0);
    let desired = next_desired(&mut dev).await;
    assert!(desired.full);
    assert_eq!(desired.version, 2);
    assert_eq!(
        parsed(&desired.json),
        json!({"sample_rate_hz": 2, "led": {"on": true, "color": "red"}})
    );
    dev.send(reported(
        1,
        json!({"sample_rate_hz": 2, "led": {"on": true, "color": "red"}}),
    ))
    .await;
    let ack = reported_through(&mut dev, 1).await;
    assert_eq!(ack.rejected, 0, "{}", ack.error);
    let twin = get_twin(&hub, "tw-off").await;
    assert_eq!(ack.version, twin.reported_version);
    assert_eq!(parsed(&twin.delta_json), json!({}), "converged");
    assert!(hub.device("tw-off").await.unwrap().in_sync);
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);

    // Holding the current version: nothing is sent again.
    let (mut dev, welcome) = connect_twin(&hub, "tw-off", 2).await;
    assert_eq!(welcome.reported_seq, 1);
    only_ack_follows(&mut dev, 1).await;
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_online_reaches_the_device_within_a_second_as_a_patch() {
    let hub = spawn_hub().await;
    let (mut dev, _) = connect_twin(&hub, "tw-on", 0).await;
    for version in 1..=3u64 {
        let started = Instant::now();
        let twin = set_desired(&hub, "tw-on", json!({"step": version}), Some(version - 1))
            .await
            .unwrap();
        assert_eq!(twin.desired_version, version);
        let desired = next_desired(&mut dev).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(desired.version, version);
        assert!(
            !desired.full,
            "the device holds the version before: a patch"
        );
        assert_eq!(parsed(&desired.json), json!({"step": version}));
    }
    // A twin-unaware stream of another device hears nothing of it.
    let (mut old, _) = RawDevice::connect(&hub, "tw-old").await;
    set_desired(&hub, "tw-old", json!({"a": 1}), None)
        .await
        .unwrap();
    only_ack_follows(&mut old, 1).await;
    old.half_close();
    assert_eq!(old.end_code().await, Code::Ok);
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_patches_are_acked_after_commit_once_each_and_bad_ones_rejected() {
    let hub = spawn_hub().await;
    let (mut dev, _) = connect_twin(&hub, "tw-rep", 0).await;
    let before = get_twin(&hub, "tw-rep").await;
    assert_eq!(
        parsed(&before.reported_json)["hello"],
        json!({"firmware": "test-fw/1", "labels": {"site": "lab"}}),
        "the Hello's firmware and labels are reported state"
    );
    let base = before.reported_version;

    dev.send(reported(1, json!({"battery": 50, "fw": {"main": "1.3"}})))
        .await;
    let ack = reported_through(&mut dev, 1).await;
    assert_eq!((ack.seq, ack.version, ack.rejected), (1, base + 1, 0));
    // Sent again (the device missed the ack): acked, not applied again.
    dev.send(reported(1, json!({"battery": 50, "fw": {"main": "1.3"}})))
        .await;
    let ack = reported_through(&mut dev, 1).await;
    assert_eq!((ack.seq, ack.version), (1, base + 1));
    // null deletes; nested keys merge.
    dev.send(reported(
        2,
        json!({"battery": null, "fw": {"radio": "0.9"}}),
    ))
    .await;
    let ack = reported_through(&mut dev, 2).await;
    assert_eq!(ack.version, base + 2);
    let twin = get_twin(&hub, "tw-rep").await;
    let doc = parsed(&twin.reported_json);
    assert!(doc.get("battery").is_none(), "{doc}");
    assert_eq!(doc["fw"], json!({"main": "1.3", "radio": "0.9"}));
    let meta = parsed(&twin.metadata_json);
    assert!(meta["reported"]["fw"]["radio"].is_i64(), "{meta}");
    assert!(meta["reported"].get("battery").is_none(), "{meta}");

    // Not JSON, not an object, too deep, too large: rejected with the
    // reason, the mark moves past them, the document is unchanged.
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let bad = [
        pb::ReportedPatch {
            seq: 3,
            patch_json: "{nope".into(),
        },
        pb::ReportedPatch {
            seq: 4,
            patch_json: "[1]".into(),
        },
        pb::ReportedPatch {
            seq: 5,
            patch_json: deep.to_string(),
        },
        // (PostgreSQL's jsonb cannot store a NUL: refused, not a failed
        // commit for every device in the group.)
        pb::ReportedPatch {
            seq: 6,
            patch_json: json!({"name": "a\u{0}b"}).to_string(),
        },
        pb::ReportedPatch {
            seq: 7,
            patch_json: json!({"blob": "x".repeat(33 * 1024)}).to_string(),
        },
    ];
    for patch in bad {
        dev.send(pb::DeviceMessage {
            msg: Some(pb::device_message::Msg::Reported(patch)),
        })
        .await;
    }
    let ack = reported_through(&mut dev, 7).await;
    assert_eq!((ack.rejected, ack.version), (5, base + 2));
    assert!(ack.error.contains("32768"), "{}", ack.error);
    // A reported seq out of range ends the stream, like a reading's.
    dev.send(reported(0, json!({}))).await;
    assert_eq!(dev.end_code().await, Code::InvalidArgument);

    // After a reconnect the Welcome says how far the hub got.
    let (mut dev, welcome) = connect_twin(&hub, "tw-rep", 0).await;
    assert_eq!(
        (welcome.reported_seq, welcome.reported_version),
        (7, base + 2)
    );
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_if_version_is_refused_and_documents_keep_their_limits() {
    let hub = spawn_hub().await;
    hub.register_offline("tw-ver").await;
    set_desired(&hub, "tw-ver", json!({"a": 1}), Some(0))
        .await
        .unwrap();
    let stale = set_desired(&hub, "tw-ver", json!({"a": 2}), Some(0))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("version 1"), "{}", stale.message());
    // Deleting a key is a change: the version goes on growing.
    let twin = set_desired(&hub, "tw-ver", json!({"a": null}), Some(1))
        .await
        .unwrap();
    assert_eq!(
        (twin.desired_version, twin.desired_json.as_str()),
        (2, "{}")
    );

    let too_big = set_desired(&hub, "tw-ver", json!({"b": "x".repeat(33 * 1024)}), None)
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert!(too_big.message().contains("32768"), "{}", too_big.message());
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    let too_deep = set_desired(&hub, "tw-ver", deep, None).await.unwrap_err();
    assert_eq!(too_deep.code(), Code::InvalidArgument);
    assert!(
        too_deep.message().contains("10 levels"),
        "{}",
        too_deep.message()
    );
    let long_key = set_desired(&hub, "tw-ver", json!({"k".repeat(129): 1}), None)
        .await
        .unwrap_err();
    assert_eq!(long_key.code(), Code::InvalidArgument);
    let control = set_desired(&hub, "tw-ver", json!({"a\u{1b}[2J": 1}), None)
        .await
        .unwrap_err();
    assert_eq!(control.code(), Code::InvalidArgument);
    let unknown = set_desired(&hub, "nobody", json!({"a": 1}), None)
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        get_twin(&hub, "tw-ver").await.desired_version,
        2,
        "nothing refused counted"
    );

    // Versions survive a restart.
    let mut hub = hub;
    hub.restart().await;
    let twin = set_desired(&hub, "tw-ver", json!({"c": 3}), Some(2))
        .await
        .unwrap();
    assert_eq!(twin.desired_version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_never_changes_tags_and_a_tag_selector_cannot_be_joined() {
    let hub = spawn_hub().await;
    let mut op = hub.operator().await;
    op.add_device(pb::AddDeviceRequest {
        device_id: "tw-tag".into(),
        labels: [("site".to_owned(), "plant-7".to_owned())].into(),
    })
    .await
    .unwrap();
    // Open auth: a device that says other labels in its Hello.
    let mut hello = hello_twin("tw-evil", 0);
    if let Some(pb::device_message::Msg::Hello(h)) = &mut hello.msg {
        h.labels = [("site".to_owned(), "plant-7".to_owned())].into();
    }
    let mut evil = RawDevice::open(hub.channel().await, hello).await;
    assert!(matches!(evil.next().await, Ok(Some(HubMsg::Welcome(_)))));
    // It cannot report its way in either.
    evil.send(reported(
        1,
        json!({"tags": {"site": "plant-7"}, "site": "plant-7"}),
    ))
    .await;
    reported_through(&mut evil, 1).await;

    let listed = op
        .list_devices(pb::ListDevicesRequest {
            r#where: "tags.site = plant-7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(ids, ["tw-tag"], "only the operator's tag counts");
    let twin = get_twin(&hub, "tw-evil").await;
    assert!(twin.tags.is_empty(), "{:?}", twin.tags);
    assert_eq!(
        parsed(&twin.reported_json)["hello"]["labels"],
        json!({"site": "plant-7"})
    );

    // Tags set and removed by an operator; a Hello after leaves them.
    let twin = op
        .update_tags(pb::UpdateTagsRequest {
            device_id: "tw-tag".into(),
            set: [("rack".to_owned(), "r1".to_owned())].into(),
            remove: vec!["site".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(twin.tags, [("rack".to_owned(), "r1".to_owned())].into());
    let (mut dev, _) = RawDevice::connect(&hub, "tw-tag").await;
    let info = hub.device("tw-tag").await.unwrap();
    assert_eq!(info.labels, [("rack".to_owned(), "r1".to_owned())].into());
    let bad = op
        .update_tags(pb::UpdateTagsRequest {
            device_id: "tw-tag".into(),
            set: [("k".to_owned(), "v\u{7}".to_owned())].into(),
            remove: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    dev.half_close();
    evil.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    assert_eq!(evil.end_code().await, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_filters_answer_the_operators_questions() {
    let hub = spawn_hub().await;
    let mut op = hub.operator().await;
    for (id, site, fw, battery) in [
        ("ff-1", "plant-7", "1.4", 80),
        ("ff-2", "plant-7", "1.3", 15),
        ("ff-3", "plant-8", "1.3", 10),
    ] {
        op.add_device(pb::AddDeviceRequest {
            device_id: id.into(),
            labels: [("site".to_owned(), site.to_owned())].into(),
        })
        .await
        .unwrap();
        let (mut dev, _) = connect_twin(&hub, id, 0).await;
        dev.send(reported(1, json!({"firmware": fw, "battery": battery})))
            .await;
        reported_through(&mut dev, 1).await;
        dev.half_close();
        assert_eq!(dev.end_code().await, Code::Ok);
    }
    set_desired(&hub, "ff-2", json!({"firmware": "1.4"}), None)
        .await
        .unwrap();
    set_desired(&hub, "ff-1", json!({"firmware": "1.4"}), None)
        .await
        .unwrap();
    let (mut online, _) = connect_twin(&hub, "ff-3", 0).await;
    let ask = |filter: &'static str| {
        let mut op = op.clone();
        async move {
            let page = op
                .list_devices(pb::ListDevicesRequest {
                    r#where: filter.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            page.devices
                .into_iter()
                .map(|d| d.device_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(ask("reported.firmware != 1.4").await, ["ff-2", "ff-3"]);
    assert_eq!(
        ask("tags.site = plant-7 and in_sync = false").await,
        ["ff-2"]
    );
    assert_eq!(ask("reported.battery < 20").await, ["ff-2", "ff-3"]);
    assert_eq!(
        ask("reported.battery > 20 and desired.firmware exists").await,
        ["ff-1"]
    );
    assert_eq!(ask("online = true").await, ["ff-3"]);
    assert_eq!(
        ask("online = false and reported.battery < 20").await,
        ["ff-2"]
    );
    assert_eq!(ask("reported.firmware = \"1.4\"").await, ["ff-1"]);
    let bad = op
        .list_devices(pb::ListDevicesRequest {
            r#where: "reported.battery ~ 3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    online.half_close();
    assert_eq!(online.end_code().await, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_twin_changes_and_the_simulator_converges() {
    let hub = spawn_hub().await;
    let fleet = SimFleet::start(&hub, "tw-sim-", 1).await;
    let id = "tw-sim-00001";
    wait_until("the sim's first report", || async {
        parsed(&get_twin(&hub, id).await.reported_json)
            .get("uptime_s")
            .is_some()
    })
    .await;
    let mut watch = hub
        .operator()
        .await
        .watch_twin(pb::WatchTwinRequest {
            device_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.part, pb::TwinPart::Unspecified as i32);
    set_desired(
        &hub,
        id,
        json!({"sample_rate_hz": 20, "sensors": {"humidity": false}, "color": "blue"}),
        None,
    )
    .await
    .unwrap();
    let mut parts = Vec::new();
    let converged = loop {
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("a twin event")
            .unwrap()
            .unwrap();
        parts.push(event.part);
        let twin = event.twin.unwrap();
        if event.part == pb::TwinPart::Reported as i32
            && parsed(&twin.reported_json)["sample_rate_hz"] == json!(20)
        {
            break twin;
        }
    };
    assert!(parts.contains(&(pb::TwinPart::Desired as i32)), "{parts:?}");
    // It applied what it understands; the rest stays in the delta.
    assert_eq!(parsed(&converged.delta_json), json!({"color": "blue"}));
    assert_eq!(
        parsed(&converged.reported_json)["sensors"],
        json!({"humidity": false})
    );
    drop(watch);
    fleet.finish().await;
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_between_reported_patches_and_their_acks_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let reserved = reserve_port();
    let url = format!("http://127.0.0.1:{}", reserved.port);
    let channel = || async {
        tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    let mut hub = ChildHub::start(&db, reserved.port);
    hub.wait_line("listening on").await;
    let total = 400u64;
    let mut dev = RawDevice::open(channel().await, hello_twin("tw-kill", 0)).await;
    assert!(matches!(dev.next().await, Ok(Some(HubMsg::Welcome(_)))));
    // Patches go out as fast as the stream takes them; the hub dies while
    // some are committed and acked, some committed and not acked, some
    // not committed.
    let mut acked = 0;
    for seq in 1..=total {
        dev.send(reported(
            seq,
            json!({"n": seq, format!("k{}", seq % 7): seq}),
        ))
        .await;
        if seq == total / 2 {
            acked = reported_through(&mut dev, 1).await.seq;
            break;
        }
    }
    let (_, killed) = hub.kill().await;
    assert!(killed, "the kill ended it");
    drop(dev);
    let mut hub = ChildHub::start(&db, reserved.port);
    hub.wait_line("listening on").await;

    // Back: the Welcome says how far the hub got; never below an ack.
    let mut dev = RawDevice::open(channel().await, hello_twin("tw-kill", 0)).await;
    let welcome = match dev.next().await {
        Ok(Some(HubMsg::Welcome(w))) => w,
        other => panic!("expected Welcome, got {other:?}"),
    };
    assert!(
        welcome.reported_seq >= acked,
        "{} < {acked}",
        welcome.reported_seq
    );
    for seq in 1..=total {
        // The device resends everything it holds; the hub takes each once.
        dev.send(reported(
            seq,
            json!({"n": seq, format!("k{}", seq % 7): seq}),
        ))
        .await;
    }
    let last = reported_through(&mut dev, total).await;
    let twin = crate::crash::operator(&url)
        .await
        .get_twin(pb::GetTwinRequest {
            device_id: "tw-kill".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The first Hello wrote reported.hello (version 1), then one version
    // per patch: a patch applied twice would show as a version more.
    assert_eq!(twin.reported_version, 1 + total, "each patch applied once");
    assert_eq!(last.version, 1 + total);
    assert_eq!(parsed(&twin.reported_json)["n"], json!(total));
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    hub.terminate();
    let (status, _) = hub.exit().await;
    assert!(status.success());
}

/// Hellos that arrive together are registered in bulk (a reconnect storm):
/// each device still gets its own mark, a desired document it does not
/// hold, and its Hello as reported state, new devices and known alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hellos_arriving_together_register_each_device_as_alone() {
    // One group holds them all.
    let hub = spawn_hub_with(|s| s.ingest.max_batch_delay = Duration::from_millis(300)).await;
    let ids: Vec<String> = (0..24).map(|i| format!("storm-{i}")).collect();
    let connect_all = |held: u64| {
        let ids = ids.clone();
        let hub = &hub;
        async move {
            let opens = ids.iter().map(|id| async move {
                let mut dev = RawDevice::open(hub.channel().await, hello_twin(id, held)).await;
                match dev.next().await {
                    Ok(Some(HubMsg::Welcome(w))) => (dev, w),
                    other => panic!("{id}: expected Welcome, got {other:?}"),
                }
            });
            futures_util::future::join_all(opens).await
        }
    };
    let mut first = connect_all(0).await;
    for (i, (dev, welcome)) in first.iter_mut().enumerate() {
        assert_eq!(welcome.acked_seq, 0);
        let n = i as u64 + 1;
        let readings = (1..=n)
            .map(|s| reading(s, "t", now_ms(), s as f64))
            .collect();
        dev.send(batch(readings)).await;
    }
    for (i, (dev, _)) in first.iter_mut().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(dev.ack_through(n).await.0, n);
    }
    set_desired(&hub, "storm-3", json!({"rate": 5}), None)
        .await
        .unwrap();
    drop(first);
    // Known devices now, all at once again (the held desired version 0).
    let again = connect_all(0).await;
    for (i, (mut dev, welcome)) in again.into_iter().enumerate() {
        assert_eq!(welcome.acked_seq, i as u64 + 1, "{}", ids[i]);
        if i == 3 {
            let d = next_desired(&mut dev).await;
            assert!(d.full && d.version == 1, "{d:?}");
            assert_eq!(parsed(&d.json)["rate"], json!(5));
        }
    }
    for id in &ids {
        let twin = get_twin(&hub, id).await;
        assert_eq!(
            parsed(&twin.reported_json)["hello"]["firmware"],
            json!("test-fw/1"),
            "{id}"
        );
    }
}
