//! Hostile and broken input, table-driven: every malformed or out-of-range
//! field of every device message, raw bytes that are not protobuf, streams
//! opened and abandoned by the thousand, garbage on the port, bad CLI
//! arguments. For each: a precise status, the hub still serving a bystander
//! whose acked readings are all stored, and no task left behind.

use std::collections::HashMap;
use std::time::Duration;

use bytes::BufMut;
use prost::Message;
use telemetry_proto::v1::{
    self as pb, CommandState as S, CommandStatus, device_message::Msg as DeviceMsg,
    hub_message::Msg as HubMsg,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::harness::*;

/// Sends bytes as they are, so a message can be anything at all.
#[derive(Default)]
struct RawCodec;
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = pb::HubMessage;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::HubMessage>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Opens a Connect stream that sends `messages` (raw bytes each), then
/// half-closes if `close`, and returns what the hub said: whether a Welcome
/// came, and the status the stream ended with.
async fn raw_exchange(channel: Channel, messages: Vec<Vec<u8>>, close: bool) -> (bool, Code) {
    let (tx, rx) = mpsc::channel(messages.len().max(1));
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/telemetry.v1.DeviceGateway/Connect");
    let keep_open = (!close).then_some(tx);
    let mut inbound: Streaming<pb::HubMessage> = grpc
        .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawCodec)
        .await
        .unwrap()
        .into_inner();
    let mut welcomed = false;
    let code = loop {
        match tokio::time::timeout(WAIT, inbound.message()).await {
            Ok(Ok(Some(m))) => welcomed |= matches!(m.msg, Some(HubMsg::Welcome(_))),
            Ok(Ok(None)) => break Code::Ok,
            Ok(Err(status)) => break status.code(),
            Err(_) => panic!("the hub said nothing within {WAIT:?}"),
        }
    };
    drop(keep_open);
    (welcomed, code)
}

fn encode(msg: pb::DeviceMessage) -> Vec<u8> {
    msg.encode_to_vec()
}

fn hello_with(id: &str, f: impl FnOnce(&mut pb::Hello)) -> Vec<u8> {
    let mut h = pb::Hello {
        device_id: id.into(),
        firmware: "fw/1".into(),
        ..Default::default()
    };
    f(&mut h);
    encode(pb::DeviceMessage {
        msg: Some(DeviceMsg::Hello(h)),
    })
}

fn labels(n: usize, key_len: usize, value: &str) -> HashMap<String, String> {
    (0..n)
        .map(|i| (format!("{i:0key_len$}"), value.to_owned()))
        .collect()
}

fn readings_msg(readings: Vec<pb::Reading>) -> Vec<u8> {
    encode(batch(readings))
}

/// (case, messages, half-close after them, Welcome expected, status)
type StreamCase<'a> = (&'a str, Vec<Vec<u8>>, bool, bool, Code);
/// (arguments, environment, exit code, what stderr says)
type CliCase<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, i32, &'a str);

/// The bystander: a device that streams through every case and must see
/// every one of its readings acked and stored.
struct Bystander {
    dev: RawDevice,
    seq: u64,
}

impl Bystander {
    async fn new(hub: &TestHub) -> Bystander {
        let (dev, _) = RawDevice::connect(hub, "bystander").await;
        Bystander { dev, seq: 0 }
    }

    async fn still_served(&mut self) {
        self.seq += 1;
        self.dev
            .send(batch(vec![reading(self.seq, "t", now_ms(), 1.0)]))
            .await;
        assert_eq!(self.dev.ack_through(self.seq).await.0, self.seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_device_message_gets_a_precise_status() {
    let hub = spawn_hub_with(|s| {
        s.server.max_batch = 10;
        s.server.max_message_bytes = 4096;
        s.server.hello_timeout = Duration::from_secs(1);
    })
    .await;
    let mut bystander = Bystander::new(&hub).await;
    let now = now_ms();
    let ok_reading = |seq| reading(seq, "t", now, 1.0);
    let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01, 0x02];
    let empty = encode(pb::DeviceMessage { msg: None });
    let reply = encode(pb::DeviceMessage {
        msg: Some(DeviceMsg::CommandReply(pb::CommandReply::default())),
    });
    let too_big = readings_msg((1..=200).map(ok_reading).collect());
    // (case, messages, half-close after them, Welcome expected, status)
    let cases: Vec<StreamCase> = vec![
        (
            "readings before Hello",
            vec![readings_msg(vec![ok_reading(1)])],
            true,
            false,
            Code::FailedPrecondition,
        ),
        (
            "empty message before Hello",
            vec![empty.clone()],
            true,
            false,
            Code::FailedPrecondition,
        ),
        (
            "a reply before Hello",
            vec![reply],
            true,
            false,
            Code::FailedPrecondition,
        ),
        (
            "not protobuf before Hello",
            vec![garbage.clone()],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "oversized first message",
            vec![too_big.clone()],
            true,
            false,
            Code::ResourceExhausted,
        ),
        (
            "no Hello in time",
            vec![],
            false,
            false,
            Code::DeadlineExceeded,
        ),
        ("closed before Hello", vec![], true, false, Code::Ok),
        (
            "empty device id",
            vec![hello_with("", |_| {})],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "device id with a space",
            vec![hello_with("a b", |_| {})],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "device id not ASCII",
            vec![hello_with("dév", |_| {})],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "device id of 65 bytes",
            vec![hello_with(&"x".repeat(65), |_| {})],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "firmware of 129 bytes",
            vec![hello_with("bad-fw", |h| h.firmware = "f".repeat(129))],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "firmware with an escape",
            vec![hello_with("bad-esc", |h| h.firmware = "fw\u{1b}[2J".into())],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "33 labels",
            vec![hello_with("bad-n", |h| h.labels = labels(33, 2, "v"))],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "empty label key",
            vec![hello_with("bad-k0", |h| {
                h.labels = labels(1, 0, "v")
                    .into_values()
                    .map(|v| (String::new(), v))
                    .collect()
            })],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "label key of 65 bytes",
            vec![hello_with("bad-k", |h| h.labels = labels(1, 65, "v"))],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "label value of 257 bytes",
            vec![hello_with("bad-v", |h| {
                h.labels = labels(1, 3, &"v".repeat(257))
            })],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "label value with a newline",
            vec![hello_with("bad-nl", |h| h.labels = labels(1, 3, "a\nb"))],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "token of 1025 bytes",
            vec![hello_with("bad-t", |h| h.token = "t".repeat(1025))],
            true,
            false,
            Code::InvalidArgument,
        ),
        (
            "a second Hello",
            vec![
                hello_with("two-hellos", |_| {}),
                hello_with("two-hellos", |_| {}),
            ],
            true,
            true,
            Code::FailedPrecondition,
        ),
        (
            "a batch over max_batch",
            vec![
                hello_with("big-batch", |_| {}),
                readings_msg((1..=11).map(ok_reading).collect()),
            ],
            true,
            true,
            Code::InvalidArgument,
        ),
        (
            "seq 0",
            vec![
                hello_with("seq-0", |_| {}),
                readings_msg(vec![ok_reading(0)]),
            ],
            true,
            true,
            Code::InvalidArgument,
        ),
        (
            "seq 2^63",
            vec![
                hello_with("seq-2-63", |_| {}),
                readings_msg(vec![ok_reading(1), ok_reading(1 << 63)]),
            ],
            true,
            true,
            Code::InvalidArgument,
        ),
        (
            "seq 2^64-1",
            vec![
                hello_with("seq-max", |_| {}),
                readings_msg(vec![ok_reading(u64::MAX)]),
            ],
            true,
            true,
            Code::InvalidArgument,
        ),
        (
            "oversized message",
            vec![hello_with("oversized", |_| {}), too_big],
            true,
            true,
            Code::ResourceExhausted,
        ),
        (
            "not protobuf after Hello",
            vec![hello_with("garbage", |_| {}), garbage],
            true,
            true,
            Code::InvalidArgument,
        ),
        (
            "empty message after Hello (ignored)",
            vec![hello_with("empty-ok", |_| {}), empty],
            true,
            true,
            Code::Ok,
        ),
    ];
    for (name, messages, close, welcome, code) in cases {
        let got = raw_exchange(hub.channel().await, messages, close).await;
        assert_eq!(got, (welcome, code), "{name}");
        bystander.still_served().await;
    }
    for refused in ["", "a b", "bad-fw", "bad-n", "bad-t"] {
        assert!(
            hub.device(refused).await.is_none(),
            "{refused:?} not registered"
        );
    }
    for marked in ["seq-0", "seq-2-63", "seq-max"] {
        let info = hub.device(marked).await.unwrap();
        assert_eq!(info.acked_seq, 0, "{marked}: no mark moved");
        assert!(
            hub.readings(marked).await.is_empty(),
            "{marked}: nothing of the batch stored"
        );
    }
    // The device whose seq was refused is not bricked: it goes on.
    let (mut dev, welcome) = RawDevice::connect(&hub, "seq-max").await;
    assert_eq!(welcome.acked_seq, 0);
    dev.send(batch(vec![ok_reading(1), ok_reading(2)])).await;
    assert_eq!(dev.ack_through(2).await.0, 2);
    drop(dev);
    assert_eq!(hub.readings("bystander").await.len() as u64, bystander.seq);
    drop(bystander);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_readings_are_rejected_without_harm_and_out_of_range_times_too() {
    let hub = spawn_hub_with(|s| s.ingest.max_sensors_per_device = 3).await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-bad").await;
    let now = now_ms();
    let valid = |seq, sensor: &str| reading(seq, sensor, now, seq as f64);
    dev.send(batch(vec![
        valid(1, "a"),
        reading(2, "a", now, f64::NAN),
        reading(3, "a", now, f64::INFINITY),
        reading(4, "a", now, f64::NEG_INFINITY),
        reading(5, "", now, 1.0),
        reading(6, &"s".repeat(65), now, 1.0),
        reading(7, "a", now + 3_600_000, 1.0),
        reading(8, "a", 946_684_799_999, 1.0),
        reading(9, "a", i64::MIN, 1.0),
        reading(10, "a", i64::MAX, 1.0),
        valid(11, "b"),
        valid(11, "b"),
        valid(10, "b"),
        valid(12, "c"),
        // A fourth sensor is over this device's limit.
        valid(13, "d"),
        valid(14, "a"),
    ]))
    .await;
    let (acked, rejected, duplicates) = dev.ack_through(14).await;
    assert_eq!((acked, rejected, duplicates), (14, 10, 2));
    let seqs: Vec<u64> = hub
        .readings("dev-bad")
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, vec![1, 11, 12, 14]);
    // Another device is not limited by this one's sensors.
    let (mut other, _) = RawDevice::connect(&hub, "dev-other").await;
    other
        .send(batch(vec![valid(1, "d"), valid(2, "e"), valid(3, "f")]))
        .await;
    assert_eq!(other.ack_through(3).await, (3, 0, 0));
    // Buckets over any stored range never overflow.
    let chunks = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-bad".into(),
            bucket_ms: i64::MAX,
            since_ms: Some(i64::MIN),
            until_ms: Some(i64::MAX),
            ..Default::default()
        })
        .await;
    let counted: u64 = chunks
        .iter()
        .flat_map(|c| &c.buckets)
        .map(|b| b.count)
        .sum();
    assert_eq!(counted, 4);
    drop((dev, other));
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_flooding_replies_cost_only_their_own_stream() {
    let hub = spawn_hub_with(|s| s.server.max_replies_per_sec = 20).await;
    let mut bystander = Bystander::new(&hub).await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-chatty").await;
    let cmd = hub
        .send_command("dev-chatty", "ping", "", None)
        .await
        .unwrap();
    assert_eq!(dev.next_command().await.command_id, cmd.command_id);
    // Replies with bad statuses, unknown ids, and a flood: all ignored or
    // paced; none reaches another device's command.
    hub.register_offline("dev-quiet").await;
    let theirs = hub
        .send_command("dev-quiet", "ping", "", None)
        .await
        .unwrap();
    let bad = |id: &str, status: i32| pb::DeviceMessage {
        msg: Some(DeviceMsg::CommandReply(pb::CommandReply {
            command_id: id.into(),
            status,
            ..Default::default()
        })),
    };
    dev.send(bad(&cmd.command_id, 0)).await;
    dev.send(bad(&cmd.command_id, 99)).await;
    dev.send(bad(&theirs.command_id, CommandStatus::Succeeded as i32))
        .await;
    let started = std::time::Instant::now();
    for i in 0..60 {
        dev.send(bad(&format!("bogus-{i}"), CommandStatus::Received as i32))
            .await;
    }
    // Then a real final reply with a result too big to keep and a long
    // detail: the state is kept, the result dropped, and it says so.
    dev.reply(
        &cmd.command_id,
        CommandStatus::Succeeded,
        &"d".repeat(5000),
        &format!("\"{}\"", "r".repeat(100_000)),
    )
    .await;
    let last = hub.watch_until_final(&cmd.command_id).await.pop().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "63 replies at 20/s (a burst of 20) take over two seconds: the stream was paced ({:?})",
        started.elapsed()
    );
    assert_eq!(state(&last), S::Succeeded);
    bystander.still_served().await;
    assert!(last.result_json.is_empty());
    assert!(
        last.detail
            .ends_with("result dropped: larger than 65536 bytes"),
        "{}",
        last.detail
    );
    assert!(last.detail.len() < 1200);
    assert_eq!(state(&hub.command(&theirs.command_id).await), S::Queued);
    drop(dev);
    drop(bystander);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_abandoned_streams_leave_nothing_behind() {
    let hub = spawn_hub().await;
    let mut bystander = Bystander::new(&hub).await;
    let channels = [hub.channel().await, hub.channel().await];
    let now = now_ms();
    for round in 0..4 {
        let mut open = Vec::new();
        for i in 0..500 {
            let channel = channels[i % 2].clone();
            let id = format!("ab-{round}-{i}");
            match i % 4 {
                // Dropped right after opening, before or after Hello.
                0 => drop(RawDevice::open(channel, pb::DeviceMessage { msg: None }).await),
                1 => drop(RawDevice::open(channel, hello(&id)).await),
                // Dropped with a batch in flight, or kept open for now.
                2 => {
                    let mut dev = RawDevice::open(channel, hello(&id)).await;
                    assert!(matches!(dev.next().await, Ok(Some(HubMsg::Welcome(_)))));
                    dev.send(batch(vec![reading(1, "t", now, 1.0)])).await;
                }
                _ => open.push(RawDevice::open(channel, hello(&id)).await),
            }
        }
        bystander.still_served().await;
        drop(open);
    }
    // A device whose batch was in flight has a consistent mark: what is
    // stored is what its Welcome says.
    for i in (2..500).step_by(4) {
        let id = format!("ab-0-{i}");
        let (_, welcome) = RawDevice::connect(&hub, &id).await;
        assert_eq!(
            hub.readings(&id).await.len() as u64,
            welcome.acked_seq,
            "{id}"
        );
    }
    drop(bystander);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_does_not_disturb_the_hub() {
    let hub = spawn_hub().await;
    let mut bystander = Bystander::new(&hub).await;
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x01\x00\x00\x00\x00\x00garbage".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\x00\x00\x00\x00\x00\x01".to_vec(),
    ];
    for payload in payloads {
        let mut socket = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        let _ = socket.write_all(&payload).await;
        let _ = socket.shutdown().await;
        drop(socket);
        bystander.still_served().await;
    }
    drop(bystander);
    hub.assert_no_leaks().await;
}

/// Runs the real `hub` binary; returns (exit code, stderr).
fn hub_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = crate::harness::hub_process()
        .args(args)
        .envs(env.iter().copied())
        .env_remove("HUB_ADDR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cli_arguments_get_a_clear_error_and_exit_code() {
    let hub = spawn_hub().await;
    hub.register_offline("cli-dev").await;
    let url = hub.url();
    let u = url.as_str();
    // (arguments, environment, exit code, what stderr says); 64 is a usage
    // error, never confused with `command send --wait`'s 2 (FAILED).
    let cases: Vec<CliCase> = vec![
        (vec!["frobnicate"], vec![], 64, "unrecognized subcommand"),
        (vec!["query", "--hub", u], vec![], 64, "--device"),
        (
            vec![
                "query",
                "--hub",
                u,
                "--device",
                "cli-dev",
                "--since",
                "yesterday",
            ],
            vec![],
            64,
            "neither a duration",
        ),
        (
            vec![
                "query", "--hub", u, "--device", "cli-dev", "--format", "xml",
            ],
            vec![],
            64,
            "invalid value 'xml'",
        ),
        (
            vec![
                "query", "--hub", u, "--device", "cli-dev", "--bucket", "1m", "--agg", "median",
            ],
            vec![],
            64,
            "invalid value 'median'",
        ),
        (
            vec!["query", "--hub", u, "--device", "cli-dev", "--bucket", "0s"],
            vec![],
            64,
            "a bucket is 1ms to 100years",
        ),
        (
            vec!["query", "--hub", u, "--device", "cli-dev", "--limit", "-5"],
            vec![],
            64,
            "unexpected argument '-5'",
        ),
        (
            vec!["query", "--hub", u, "--device", "nobody"],
            vec![],
            1,
            "unknown device",
        ),
        (
            vec!["query", "--hub", "not a url", "--device", "cli-dev"],
            vec![],
            1,
            "invalid hub URL",
        ),
        (
            vec!["devices", "--hub", "http://127.0.0.1:1"],
            vec![],
            1,
            "error",
        ),
        (
            vec![
                "command", "send", "--hub", u, "--device", "cli-dev", "--name", "ping", "--params",
                "[1]",
            ],
            vec![],
            1,
            "JSON object",
        ),
        (
            vec![
                "command", "send", "--hub", u, "--device", "cli-dev", "--name", "ping", "--ttl",
                "100years",
            ],
            vec![],
            1,
            "ttl must be between",
        ),
        (
            vec![
                "command", "send", "--hub", u, "--device", "nobody", "--name", "ping",
            ],
            vec![],
            1,
            "unknown device",
        ),
        (
            vec!["command", "show", "--hub", u, "no-such-id"],
            vec![],
            1,
            "unknown command",
        ),
        (
            vec!["serve", "--config", "/nonexistent/hub.toml"],
            vec![],
            1,
            "cannot load settings",
        ),
        (
            vec!["print-config"],
            vec![("HUB__SERVER__MAX_BATCH", "0")],
            1,
            "invalid setting server.max_batch: must be between 1 and 100000 (set by the environment variable HUB__SERVER__MAX_BATCH)",
        ),
        (
            vec!["print-config"],
            vec![("HUB__SERVER__LISTEN", "here")],
            1,
            "server.listen` (set by the environment variable HUB__SERVER__LISTEN)",
        ),
        (
            vec!["print-config"],
            vec![("HUB__INGEST__MAX_SENSORS_PER_DEVICE", "0")],
            1,
            "ingest.max_sensors_per_device",
        ),
    ];
    for (args, env, code, says) in cases {
        let (got, stderr) = hub_cli(&args, &env);
        assert_eq!(got, code, "{args:?}: {stderr}");
        if code == 1 {
            assert_eq!(stderr.lines().count(), 1, "{args:?}: said once: {stderr}");
        }
        assert!(
            stderr.contains(says),
            "{args:?}: expected {says:?} in {stderr}"
        );
    }
    assert_eq!(hub.stats().await.live_sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reading_queries_and_commands_get_precise_statuses() {
    let hub = spawn_hub().await;
    let (mut dev, _) = RawDevice::connect(&hub, "q-dev").await;
    dev.send(batch(vec![reading(1, "t", now_ms(), 1.0)])).await;
    dev.ack_through(1).await;
    let mut op = hub.operator().await;
    let query = |f: fn(&mut pb::QueryReadingsRequest)| {
        let mut req = pb::QueryReadingsRequest {
            device_id: "q-dev".into(),
            ..Default::default()
        };
        f(&mut req);
        req
    };
    let cases = [
        (
            query(|r| r.device_id.clear()),
            tonic::Code::InvalidArgument,
            "device_id is required",
        ),
        (
            query(|r| r.bucket_ms = -1),
            tonic::Code::InvalidArgument,
            "bucket_ms must not be negative",
        ),
        (
            query(|r| {
                r.since_ms = Some(10);
                r.until_ms = Some(10);
            }),
            tonic::Code::InvalidArgument,
            "since must be before until",
        ),
        (
            query(|r| r.device_id = "nobody".into()),
            tonic::Code::NotFound,
            "unknown device \"nobody\"",
        ),
    ];
    for (req, code, message) in cases {
        let status = op.query_readings(req.clone()).await.err();
        let status = status.unwrap_or_else(|| panic!("{req:?} was answered"));
        assert_eq!(status.code(), code, "{req:?}");
        assert_eq!(status.message(), message, "{req:?}");
    }
    // A command with a negative TTL is refused the same way.
    let status = op
        .send_command(pb::SendCommandRequest {
            device_id: "q-dev".into(),
            name: "ping".into(),
            ttl_ms: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "ttl_ms must not be negative");
    // And a good query is answered.
    let rows: usize = op
        .query_readings(query(|_| {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .map_or(0, |chunk| chunk.rows.len());
    assert_eq!(rows, 1);
}
