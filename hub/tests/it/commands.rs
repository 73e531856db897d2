//! Commands down the same stream: lifecycle, offline queue, TTL, limits,
//! cancel, redelivery, and the CLI's exit codes.

use std::time::Duration;

use hub::cli::{self, Cli, Command};
use telemetry_proto::v1::{self as pb, CommandState as S, CommandStatus};
use tonic::Code;

use crate::harness::*;

fn history(info: &pb::CommandInfo) -> Vec<S> {
    info.history
        .iter()
        .map(|t| S::try_from(t.state).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_to_an_online_device() {
    let hub = spawn_hub().await;
    let fleet = SimFleet::start(&hub, "rt-", 1).await;
    let sent = hub
        .send_command("rt-00001", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(state(&sent), S::Queued);
    assert!(
        sent.expires_at_ms - sent.created_at_ms == 3_600_000,
        "default ttl 1h"
    );

    let seen = hub.watch_until_final(&sent.command_id).await;
    let last = seen.last().unwrap();
    assert_eq!(state(last), S::Succeeded);
    let result: serde_json::Value = serde_json::from_str(&last.result_json).unwrap();
    assert!(result["pong"].as_i64().unwrap() > 0, "{result}");

    let info = hub.command(&sent.command_id).await;
    assert_eq!(
        history(&info),
        vec![S::Queued, S::Sent, S::Received, S::Succeeded]
    );
    assert_eq!(info.attempts, 1);
    assert!(info.history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));

    // An unknown command is REJECTED by the device, with its reason.
    let dance = hub
        .send_command("rt-00001", "dance", "", None)
        .await
        .unwrap();
    let last = hub
        .watch_until_final(&dance.command_id)
        .await
        .pop()
        .unwrap();
    assert_eq!(
        (state(&last), last.detail.as_str()),
        (S::Rejected, "unknown command: dance")
    );

    // set_rate is obeyed.
    let rate = hub
        .send_command("rt-00001", "set_rate", r#"{"hz": 50}"#, None)
        .await
        .unwrap();
    assert_eq!(
        state(
            hub.watch_until_final(&rate.command_id)
                .await
                .last()
                .unwrap()
        ),
        S::Succeeded
    );

    let summary = fleet.finish().await;
    assert_eq!(
        (summary.commands_received, summary.commands_executed),
        (3, 3)
    );
    assert!(summary.all_clean(), "{summary:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_commands_wait_and_go_out_in_order_after_welcome() {
    let hub = spawn_hub().await;
    hub.register_offline("dev-off").await;
    let mut ids = Vec::new();
    for (name, params) in [
        ("set_batch", r#"{"max": 5}"#),
        ("ping", ""),
        ("set_rate", r#"{"hz": 1}"#),
    ] {
        let info = hub
            .send_command("dev-off", name, params, None)
            .await
            .unwrap();
        assert_eq!(state(&info), S::Queued);
        ids.push(info.command_id);
    }
    assert_eq!(
        state(&hub.command(&ids[0]).await),
        S::Queued,
        "still queued while offline"
    );

    let (mut dev, _) = RawDevice::connect(&hub, "dev-off").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(dev.next_command().await);
    }
    assert_eq!(
        got.iter().map(|c| c.command_id.clone()).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(got[0].params_json, r#"{"max":5}"#);
    assert!(got[0].expires_at_ms > now_ms());
    wait_until("SENT recorded", || async {
        state(&hub.command(&ids[2]).await) == S::Sent
    })
    .await;

    dev.reply(&ids[0], CommandStatus::Received, "", "").await;
    wait_until("RECEIVED recorded", || async {
        state(&hub.command(&ids[0]).await) == S::Received
    })
    .await;
    dev.reply(&ids[0], CommandStatus::Succeeded, "", r#"{"max":5}"#)
        .await;
    // A final reply without RECEIVED first still records RECEIVED.
    dev.reply(&ids[1], CommandStatus::Failed, "sensor offline", "")
        .await;
    let first = hub.watch_until_final(&ids[0]).await.pop().unwrap();
    assert_eq!(
        (state(&first), first.result_json.as_str()),
        (S::Succeeded, r#"{"max":5}"#)
    );
    let second = hub.watch_until_final(&ids[1]).await.pop().unwrap();
    assert_eq!(
        (state(&second), second.detail.as_str()),
        (S::Failed, "sensor offline")
    );
    assert_eq!(
        history(&hub.command(&ids[1]).await),
        vec![S::Queued, S::Sent, S::Received, S::Failed]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_never_delivered() {
    let hub = spawn_hub().await;
    hub.register_offline("dev-exp").await;
    let doomed = hub
        .send_command("dev-exp", "ping", "", Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let last = hub
        .watch_until_final(&doomed.command_id)
        .await
        .pop()
        .unwrap();
    assert_eq!(state(&last), S::Expired);
    assert!(last.updated_at_ms >= doomed.expires_at_ms);

    let (mut dev, _) = RawDevice::connect(&hub, "dev-exp").await;
    let fresh = hub.send_command("dev-exp", "ping", "", None).await.unwrap();
    assert_eq!(
        dev.next_command().await.command_id,
        fresh.command_id,
        "the expired one never came"
    );

    // TTL bounds.
    for ttl in [
        Duration::from_millis(500),
        Duration::from_secs(8 * 24 * 3600),
    ] {
        let err = hub
            .send_command("dev-exp", "ping", "", Some(ttl))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{ttl:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_limit_unknown_devices_and_bad_params() {
    let hub = spawn_hub_with(|s| s.commands.max_pending_per_device = 2).await;
    hub.register_offline("dev-full").await;
    let first = hub
        .send_command("dev-full", "ping", "", None)
        .await
        .unwrap();
    hub.send_command("dev-full", "ping", "", None)
        .await
        .unwrap();
    let err = hub
        .send_command("dev-full", "ping", "", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("dev-full") && err.message().contains('2'),
        "{}",
        err.message()
    );
    // Final commands do not count.
    hub.operator()
        .await
        .cancel_command(pb::CancelCommandRequest {
            command_id: first.command_id,
        })
        .await
        .unwrap();
    hub.send_command("dev-full", "ping", "", None)
        .await
        .unwrap();

    let err = hub
        .send_command("nobody", "ping", "", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = hub
        .send_command("dev-full", "ping", "[1, 2]", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_queued_command() {
    let hub = spawn_hub().await;
    hub.register_offline("dev-cx").await;
    let doomed = hub
        .send_command("dev-cx", "reboot", "", None)
        .await
        .unwrap();
    let mut op = hub.operator().await;
    let cancelled = op
        .cancel_command(pb::CancelCommandRequest {
            command_id: doomed.command_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&cancelled), S::Cancelled);
    let again = op
        .cancel_command(pb::CancelCommandRequest {
            command_id: doomed.command_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let unknown = op
        .cancel_command(pb::CancelCommandRequest {
            command_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let (mut dev, _) = RawDevice::connect(&hub, "dev-cx").await;
    let next = hub.send_command("dev-cx", "ping", "", None).await.unwrap();
    assert_eq!(dev.next_command().await.command_id, next.command_id);
    let listed = op
        .list_commands(pb::ListCommandsRequest {
            device_id: "dev-cx".into(),
            state: S::Cancelled as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].command_id, doomed.command_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_command_is_redelivered_after_a_hub_restart_and_runs_once() {
    let mut hub = spawn_hub().await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-rs").await;
    let cmd = hub
        .send_command("dev-rs", "set_rate", r#"{"hz": 3}"#, None)
        .await
        .unwrap();
    let first = dev.next_command().await;
    assert_eq!(first.command_id, cmd.command_id);
    wait_until("SENT", || async {
        state(&hub.command(&cmd.command_id).await) == S::Sent
    })
    .await;
    // The device's runner executes it; the reply is lost with the hub.
    let mut runner = device_sim::commands::CommandRunner::default();
    assert!(runner.handle(&first, now_ms()).executed);

    hub.restart().await;
    assert_eq!(
        state(&hub.command(&cmd.command_id).await),
        S::Sent,
        "no state it did not reach"
    );
    let (mut dev, _) = RawDevice::connect(&hub, "dev-rs").await;
    let again = dev.next_command().await;
    assert_eq!(again.command_id, cmd.command_id, "redelivered");
    let outcome = runner.handle(&again, now_ms());
    assert!(!outcome.executed, "the device runs it once");
    for r in outcome.replies {
        dev.reply(
            &r.command_id,
            CommandStatus::try_from(r.status).unwrap(),
            &r.detail,
            &r.result_json,
        )
        .await;
    }
    let last = hub.watch_until_final(&cmd.command_id).await.pop().unwrap();
    assert_eq!(state(&last), S::Succeeded);
    assert_eq!(last.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_is_retried_then_failed_and_bogus_replies_are_ignored() {
    let hub = spawn_hub_with(|s| {
        s.commands.ack_timeout = Duration::from_secs(1);
        s.commands.max_attempts = 2;
    })
    .await;
    hub.register_offline("dev-other").await;
    let others = hub
        .send_command("dev-other", "ping", "", None)
        .await
        .unwrap();

    let (mut dev, _) = RawDevice::connect(&hub, "dev-quiet").await;
    let cmd = hub
        .send_command("dev-quiet", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(dev.next_command().await.command_id, cmd.command_id);
    // Bogus ids and another device's command: ignored, the stream goes on.
    dev.reply("no-such-id", CommandStatus::Succeeded, "", "")
        .await;
    dev.reply(&others.command_id, CommandStatus::Succeeded, "", "")
        .await;
    dev.send(batch(vec![reading(1, "t", now_ms(), 1.0)])).await;
    assert_eq!(dev.ack_through(1).await.0, 1);
    assert_eq!(state(&hub.command(&others.command_id).await), S::Queued);

    // No RECEIVED within the ack timeout: sent again, then FAILED.
    assert_eq!(dev.next_command().await.command_id, cmd.command_id);
    let last = hub.watch_until_final(&cmd.command_id).await.pop().unwrap();
    assert_eq!(
        (state(&last), last.detail.as_str()),
        (S::Failed, "no response from device")
    );
    assert_eq!(last.attempts, 2);
    assert_eq!(
        history(&hub.command(&cmd.command_id).await),
        vec![S::Queued, S::Sent, S::Failed]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_send_wait_exit_codes() {
    use clap::Parser;
    let hub = spawn_hub().await;
    hub.register_offline("cli-off").await;
    let fleet = SimFleet::start(&hub, "cli-", 2).await;
    let url = hub.url();
    let run = |extra: Vec<&str>| {
        let mut args = vec!["hub", "command", "send", "--hub", &url, "--format", "json"];
        args.extend(extra);
        let Command::Command(action) = Cli::try_parse_from(args).unwrap().command else {
            panic!("command args")
        };
        async move {
            let mut out = Vec::new();
            let code = cli::command(&action, &mut out).await.unwrap();
            let lines: Vec<serde_json::Value> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (code, lines)
        }
    };
    let (code, lines) = run(vec![
        "--device",
        "cli-00001",
        "--device",
        "cli-00002",
        "--name",
        "ping",
        "--wait",
        "10s",
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 2, "one line per device");
    assert_ne!(lines[0]["command_id"], lines[1]["command_id"]);
    for (line, device) in lines.iter().zip(["cli-00001", "cli-00002"]) {
        assert_eq!(line["device_id"], device);
        assert_eq!(line["state"], "SUCCEEDED");
        assert!(line["result"]["pong"].is_i64());
        for key in ["name", "detail", "created_at", "updated_at"] {
            assert!(line.get(key).is_some(), "{key} in {line}");
        }
    }
    let (code, lines) = run(vec![
        "--device",
        "cli-00001",
        "--name",
        "fail",
        "--params",
        r#"{"message":"no"}"#,
        "--wait",
        "10s",
    ])
    .await;
    assert_eq!(
        (
            code,
            lines[0]["state"].as_str(),
            lines[0]["detail"].as_str()
        ),
        (2, Some("FAILED"), Some("no"))
    );
    let (code, lines) = run(vec![
        "--device", "cli-off", "--name", "ping", "--wait", "300ms",
    ])
    .await;
    assert_eq!((code, lines[0]["state"].as_str()), (3, Some("QUEUED")));
    // Tag selectors: the devices are tagged by an operator.
    for id in ["cli-00001", "cli-00002"] {
        hub.operator()
            .await
            .update_tags(pb::UpdateTagsRequest {
                device_id: id.into(),
                set: [("sim".to_owned(), "true".to_owned())].into(),
                remove: Vec::new(),
            })
            .await
            .unwrap();
    }
    let (code, lines) = run(vec![
        "--label", "sim=true", "--name", "ping", "--wait", "10s",
    ])
    .await;
    assert_eq!(code, 0);
    let mut targets: Vec<&str> = lines
        .iter()
        .map(|l| l["device_id"].as_str().unwrap())
        .collect();
    targets.sort_unstable();
    assert_eq!(
        targets,
        vec!["cli-00001", "cli-00002"],
        "every device with the label, no other"
    );
    let (code, lines) = run(vec!["--device", "cli-00002", "--name", "ping"]).await;
    assert_eq!(
        (code, lines[0]["state"].as_str()),
        (0, Some("QUEUED")),
        "without --wait: id and state"
    );

    // Bad params: a clear error before anything is sent.
    let Command::Command(action) = Cli::try_parse_from([
        "hub",
        "command",
        "send",
        "--hub",
        &url,
        "--device",
        "cli-00001",
        "--name",
        "ping",
        "--params",
        "[1]",
    ])
    .unwrap()
    .command
    else {
        panic!()
    };
    let err = cli::command(&action, &mut Vec::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("JSON object"), "{err}");
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_drops_the_stream_and_the_device_comes_back_with_its_seq() {
    let hub = spawn_hub().await;
    let fleet = SimFleet::start(&hub, "rb-", 1).await;
    wait_until("some readings", || async {
        hub.device("rb-00001").await.is_some_and(|d| d.readings > 0)
    })
    .await;
    let cmd = hub
        .send_command("rb-00001", "reboot", r#"{"delay_ms": 200}"#, None)
        .await
        .unwrap();
    let last = hub.watch_until_final(&cmd.command_id).await.pop().unwrap();
    assert_eq!(state(&last), S::Succeeded);
    wait_until("device back after the reboot", || async {
        let d = hub.device("rb-00001").await.unwrap();
        d.online && d.connected_since_ms.unwrap() > last.updated_at_ms
    })
    .await;
    // It goes on where it was: new readings after the reboot.
    let before = hub.device("rb-00001").await.unwrap().acked_seq;
    wait_until("readings after the reboot", || async {
        hub.device("rb-00001").await.unwrap().acked_seq > before
    })
    .await;
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    let rows = hub.readings("rb-00001").await;
    let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=rows.len() as u64).collect::<Vec<_>>(),
        "seq kept, nothing lost or doubled"
    );
    assert_eq!(rows.len() as u64, summary.acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_read_delays_only_its_own_commands() {
    let hub = spawn_hub_with(|s| {
        s.commands.max_pending_per_device = 500;
        s.commands.outbox = 2;
        s.server.outbound_buffer = 2;
    })
    .await;
    // The slow device's connection has a tiny HTTP/2 window and it never
    // reads, so its stream fills up after a few commands.
    let slow_channel = hub.tiny_window_channel().await;
    let mut slow = RawDevice::open(slow_channel, hello("dev-slow")).await;
    assert!(matches!(slow.next().await, Ok(Some(_))), "Welcome");
    let mut slow_ids = Vec::new();
    for _ in 0..200 {
        let info = hub
            .send_command("dev-slow", "set_rate", r#"{"hz": 1}"#, None)
            .await
            .unwrap();
        slow_ids.push(info.command_id);
    }
    let fleet = SimFleet::start(&hub, "fast-", 1).await;
    let ping = hub
        .send_command("fast-00001", "ping", "", None)
        .await
        .unwrap();
    let last = hub.watch_until_final(&ping.command_id).await.pop().unwrap();
    assert_eq!(
        state(&last),
        S::Succeeded,
        "the other device is served at once"
    );
    let still_queued = {
        let mut n = 0;
        for id in slow_ids.iter().rev().take(20) {
            if state(&hub.command(id).await) == S::Queued {
                n += 1;
            }
        }
        n
    };
    assert_eq!(
        still_queued, 20,
        "the slow device's backlog waits in its own queue"
    );
    fleet.finish().await;
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_timeout_does_not_run_while_the_device_is_away() {
    let hub = spawn_hub_with(|s| {
        s.commands.ack_timeout = Duration::from_secs(1);
        s.commands.max_attempts = 2;
    })
    .await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-away").await;
    let cmd = hub
        .send_command("dev-away", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(dev.next_command().await.command_id, cmd.command_id);
    wait_until("SENT", || async {
        state(&hub.command(&cmd.command_id).await) == S::Sent
    })
    .await;
    dev.half_close();
    assert_eq!(dev.end_code().await, Code::Ok);
    wait_until("device offline", || async {
        !hub.device("dev-away").await.unwrap().online
    })
    .await;
    // A device that stays connected and never answers: its command fails
    // after two ack timeouts, which proves the timers ran meanwhile.
    let (mut here, _) = RawDevice::connect(&hub, "dev-here").await;
    let control = hub
        .send_command("dev-here", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(here.next_command().await.command_id, control.command_id);
    let last = hub
        .watch_until_final(&control.command_id)
        .await
        .pop()
        .unwrap();
    assert_eq!(state(&last), S::Failed);
    assert_eq!(
        state(&hub.command(&cmd.command_id).await),
        S::Sent,
        "no timeout while the device was away"
    );

    let (mut dev, _) = RawDevice::connect(&hub, "dev-away").await;
    assert_eq!(
        dev.next_command().await.command_id,
        cmd.command_id,
        "redelivered on return"
    );
    dev.reply(&cmd.command_id, CommandStatus::Succeeded, "", "")
        .await;
    let last = hub.watch_until_final(&cmd.command_id).await.pop().unwrap();
    assert_eq!((state(&last), last.attempts), (S::Succeeded, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_kills_its_stream_fails_after_max_attempts_across_reconnects() {
    let hub = spawn_hub_with(|s| {
        s.commands.max_attempts = 3;
        s.commands.ack_timeout = Duration::from_secs(1);
    })
    .await;
    hub.register_offline("dev-poison").await;
    let poison = hub
        .send_command("dev-poison", "reboot_badly", "", None)
        .await
        .unwrap();
    // The device dies (drops its stream) each time the command arrives.
    let mut attempts = 0;
    while attempts < 3 {
        let (mut dev, _) = RawDevice::connect(&hub, "dev-poison").await;
        assert_eq!(dev.next_command().await.command_id, poison.command_id);
        // The write is recorded (committed) before the device goes: read
        // too early, the count would send the test round once more for a
        // command that is, rightly, not offered again.
        wait_until("the attempt recorded", || async {
            hub.command(&poison.command_id).await.attempts > attempts
        })
        .await;
        attempts = hub.command(&poison.command_id).await.attempts;
        drop(dev);
        wait_until("device offline", || async {
            !hub.device("dev-poison").await.unwrap().online
        })
        .await;
    }
    // Back once more: not offered it again; after an ack timeout with no
    // word it is FAILED, and other commands flow.
    let (mut dev, _) = RawDevice::connect(&hub, "dev-poison").await;
    let last = hub
        .watch_until_final(&poison.command_id)
        .await
        .pop()
        .unwrap();
    assert_eq!(
        (state(&last), last.detail.as_str(), last.attempts),
        (S::Failed, "no response from device", 3)
    );
    let fine = hub
        .send_command("dev-poison", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(dev.next_command().await.command_id, fine.command_id);
}
