//! The operator CLI's output, run in-process against a real hub.

use hub::cli::{self, Cli, Command};
use serde_json::Value;

use crate::harness::*;

pub(crate) fn parse(args: &[&str]) -> Command {
    use clap::Parser;
    Cli::try_parse_from(args).unwrap().command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_devices_print_json_lines_csv_and_tables() {
    let hub = spawn_hub().await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-cli").await;
    let base = 1_767_225_600_000i64; // 2026-01-01T00:00:00Z
    dev.send(batch(vec![
        reading(1, "temperature", base + 1, 20.5),
        reading(2, "humidity", base + 2, 40.0),
        reading(3, "temperature", base + 61_000, 21.5),
    ]))
    .await;
    dev.ack_through(3).await;
    let url = hub.url();

    let Command::Query(args) = parse(&[
        "hub", "query", "--hub", &url, "--device", "dev-cli", "--format", "json",
    ]) else {
        panic!("query args")
    };
    let mut out = Vec::new();
    cli::query(&args, &mut out).await.unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        serde_json::json!({"device": "dev-cli", "sensor": "temperature", "seq": 1,
            "ts": "2026-01-01T00:00:00.001Z", "value": 20.5})
    );

    let Command::Query(args) = parse(&[
        "hub",
        "query",
        "--hub",
        &url,
        "--device",
        "dev-cli",
        "--sensor",
        "temperature",
        "--bucket",
        "1m",
        "--agg",
        "avg,max,count",
        "--format",
        "json",
    ]) else {
        panic!("query args")
    };
    let mut out = Vec::new();
    cli::query(&args, &mut out).await.unwrap();
    let buckets: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        buckets,
        vec![
            serde_json::json!({"device": "dev-cli", "sensor": "temperature",
                "bucket_start": "2026-01-01T00:00:00.000Z", "count": 1, "avg": 20.5, "max": 20.5}),
            serde_json::json!({"device": "dev-cli", "sensor": "temperature",
                "bucket_start": "2026-01-01T00:01:00.000Z", "count": 1, "avg": 21.5, "max": 21.5}),
        ]
    );

    let Command::Query(args) = parse(&[
        "hub", "query", "--hub", &url, "--device", "dev-cli", "--format", "csv", "--limit", "1",
    ]) else {
        panic!("query args")
    };
    let mut out = Vec::new();
    cli::query(&args, &mut out).await.unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "device,sensor,seq,ts,value\ndev-cli,temperature,1,2026-01-01T00:00:00.001Z,20.5\n"
    );

    let Command::Devices(args) = parse(&["hub", "devices", "--hub", &url, "--format", "json"])
    else {
        panic!("devices args")
    };
    let mut out = Vec::new();
    cli::devices(&args.list, &args.filter, &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let device: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(device["device_id"], "dev-cli");
    assert_eq!(device["online"], true);
    assert_eq!(device["acked_seq"], 3);
    assert_eq!(device["readings"], 3);
    assert_eq!(device["firmware"], "test-fw/1");
    assert!(device["connected_since"].is_string());
    assert!(device["last_seen"].is_string());

    let Command::Devices(args) = parse(&["hub", "devices", "--hub", &url]) else {
        panic!("devices args")
    };
    let mut out = Vec::new();
    cli::devices(&args.list, &args.filter, &mut out)
        .await
        .unwrap();
    let table = String::from_utf8(out).unwrap();
    assert!(table.starts_with("DEVICE_ID"), "{table}");
    assert!(
        table.lines().nth(1).unwrap().starts_with("dev-cli "),
        "{table}"
    );

    let Command::Stats(args) = parse(&["hub", "stats", "--hub", &url, "--format", "json"]) else {
        panic!("stats args")
    };
    let mut out = Vec::new();
    cli::stats(&args, &mut out).await.unwrap();
    let stats: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(stats["live_sessions"], 1);
    assert_eq!(stats["readings_stored"], 3);
    assert_eq!(stats["mqtt_connected"], false);
    assert_eq!(stats["storage_ok"], true);
    assert_eq!(stats["commit_failures"], 0);
    assert!(
        stats["live_tasks"].as_u64().unwrap() >= 2,
        "at least the device stream's two tasks: {stats}"
    );

    // An unknown device is a clear error, not an empty listing.
    let Command::Query(args) = parse(&["hub", "query", "--hub", &url, "--device", "ghost"]) else {
        panic!("query args")
    };
    let err = cli::query(&args, &mut Vec::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("NotFound") && err.contains("ghost"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_and_tag_commands_change_and_show_the_twin() {
    let hub = spawn_hub().await;
    hub.register_offline("dev-tw").await;
    hub.register_offline("dev-other").await;
    let url = hub.url();
    let Command::Devices(cmd) = parse(&[
        "hub",
        "devices",
        "tag",
        "--hub",
        &url,
        "dev-tw",
        "site=plant-7",
        "rack=r1",
    ]) else {
        panic!("devices tag args")
    };
    let mut out = Vec::new();
    cli::device_action(cmd.action.as_ref().unwrap(), &mut out)
        .await
        .unwrap();
    let tags: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(tags, serde_json::json!({"rack": "r1", "site": "plant-7"}));
    let Command::Devices(cmd) = parse(&["hub", "devices", "tag", "--hub", &url, "dev-tw", "rack-"])
    else {
        panic!("devices tag args")
    };
    let mut out = Vec::new();
    cli::device_action(cmd.action.as_ref().unwrap(), &mut out)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap().trim(),
        r#"{"site":"plant-7"}"#
    );

    let Command::Twin(action) = parse(&[
        "hub",
        "twin",
        "set",
        "--hub",
        &url,
        "dev-tw",
        r#"{"sample_rate_hz": 2}"#,
        "--if-version",
        "0",
    ]) else {
        panic!("twin set args")
    };
    let mut out = Vec::new();
    cli::twin(&action, &mut out).await.unwrap();
    let twin: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(twin["desired_version"], 1);
    assert_eq!(twin["delta"], serde_json::json!({"sample_rate_hz": 2}));
    // The same version again is stale now.
    let err = cli::twin(&action, &mut Vec::new()).await.unwrap_err();
    assert!(err.to_string().contains("FailedPrecondition"), "{err}");

    let Command::Twin(action) = parse(&["hub", "twin", "get", "--hub", &url, "dev-tw"]) else {
        panic!("twin get args")
    };
    let mut out = Vec::new();
    cli::twin(&action, &mut out).await.unwrap();
    let twin: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(twin["desired"], serde_json::json!({"sample_rate_hz": 2}));
    assert_eq!(twin["tags"], serde_json::json!({"site": "plant-7"}));
    assert_eq!(twin["reported"]["hello"]["firmware"], "test-fw/1");

    let Command::Devices(cmd) = parse(&[
        "hub",
        "devices",
        "--hub",
        &url,
        "--format",
        "json",
        "--where",
        "tags.site = plant-7 and in_sync = false",
    ]) else {
        panic!("devices args")
    };
    let mut out = Vec::new();
    cli::devices(&cmd.list, &cmd.filter, &mut out)
        .await
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["device_id"], "dev-tw");
    assert_eq!(lines[0]["in_sync"], false);
    let Command::Devices(cmd) = parse(&[
        "hub",
        "devices",
        "--hub",
        &url,
        "--where",
        "tags.site = x = y",
    ]) else {
        panic!("devices args")
    };
    let err = cli::devices(&cmd.list, &cmd.filter, &mut Vec::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("where"), "{err}");
}

/// Runs `hub alarm ...` in-process; its JSON lines.
async fn alarm_cli(args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut argv = vec!["hub", "alarm"];
    argv.extend_from_slice(args);
    let Command::Alarm(action) = parse(&argv) else {
        panic!("alarm args")
    };
    let mut out = Vec::new();
    cli::alarm(&action, &mut out).await?;
    Ok(String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_rules_and_alarms_through_the_cli() {
    let hub = spawn_hub().await;
    let url = hub.url();
    let rule = alarm_cli(&[
        "rule-set",
        "--hub",
        &url,
        r#"{"name": "cli-hot", "severity": "critical", "threshold": {"sensor": "t", "raise": "> 5"}}"#,
    ])
    .await
    .unwrap();
    assert_eq!(rule[0]["version"], 1);
    assert_eq!(rule[0]["threshold"]["raise"], "> 5");
    let err = alarm_cli(&["rule-set", "--hub", &url, r#"{"name": "x"}"#])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("severity"), "{err}");
    let rules = alarm_cli(&["rules", "--hub", &url]).await.unwrap();
    assert_eq!(rules.len(), 1);

    let (mut dev, _) = RawDevice::connect(&hub, "dev-alarm").await;
    dev.send(batch(vec![reading(1, "t", now_ms() - 1_000, 9.0)]))
        .await;
    dev.ack_through(1).await;
    let open = alarm_cli(&["list", "--hub", &url, "--state", "open"])
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["device_id"], "dev-alarm");
    let id = open[0]["id"].to_string();
    let acked = alarm_cli(&["ack", "--hub", &url, &id, "--note", "looking"])
        .await
        .unwrap();
    assert_eq!(acked[0]["state"], "acknowledged");
    assert_eq!(acked[0]["ack_note"], "looking");
    let cleared = alarm_cli(&["clear", "--hub", &url, &id]).await.unwrap();
    assert_eq!(cleared[0]["state"], "cleared");
    assert!(
        alarm_cli(&["list", "--hub", &url, "--state", "open"])
            .await
            .unwrap()
            .is_empty()
    );
    let gone = alarm_cli(&["rule-rm", "--hub", &url, "cli-hot"])
        .await
        .unwrap();
    assert_eq!(gone[0]["name"], "cli-hot");
    assert!(
        alarm_cli(&["rules", "--hub", &url])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_through_the_cli() {
    let hub = spawn_hub().await;
    let url = hub.url();
    let run = async |args: &[&str]| -> anyhow::Result<Vec<Value>> {
        let mut argv = vec!["hub", "job"];
        argv.extend_from_slice(args);
        let Command::Job(action) = parse(&argv) else {
            panic!("job args")
        };
        let mut out = Vec::new();
        cli::job(&action, &mut out).await?;
        Ok(String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect())
    };
    for id in ["cj-1", "cj-2"] {
        hub.register_offline(id).await;
        let mut ops = hub.operator().await;
        ops.update_tags(telemetry_proto::v1::UpdateTagsRequest {
            device_id: id.into(),
            set: [("ring".to_owned(), "0".to_owned())].into(),
            remove: vec![],
        })
        .await
        .unwrap();
    }
    let err = run(&[
        "create",
        "--hub",
        &url,
        r#"{"name": "x", "target": {"tags": {"ring": "9"}}, "command": {"name": "ping"}}"#,
    ])
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no device matches"), "{err}");
    // Offline devices: the job starts them and waits (paused here first).
    let job = run(&[
        "create",
        "--hub",
        &url,
        r#"{"name": "ring0", "target": {"tags": {"ring": "0"}}, "command": {"name": "ping"}, "rollout": {"per_minute": 1}}"#,
    ])
    .await
    .unwrap();
    assert_eq!(job[0]["total"], 2);
    let id = job[0]["id"].to_string();
    let paused = run(&["pause", "--hub", &url, &id]).await.unwrap();
    assert_eq!(paused[0]["state"], "paused");
    let listed = run(&["list", "--hub", &url, "--active"]).await.unwrap();
    assert_eq!(listed.len(), 1);
    let shown = run(&["show", "--hub", &url, &id, "--devices"])
        .await
        .unwrap();
    assert_eq!(shown.len(), 3, "the job and its 2 devices: {shown:?}");
    assert_eq!(shown[1]["device_id"], "cj-1");
    let cancelled = run(&["cancel", "--hub", &url, &id]).await.unwrap();
    assert_eq!(cancelled[0]["state"], "cancelled");
    assert_eq!(cancelled[0]["counts"]["cancelled"], 2, "{cancelled:?}");
    let err = run(&["resume", "--hub", &url, &id]).await.unwrap_err();
    assert!(err.to_string().contains("FailedPrecondition"), "{err}");
}
