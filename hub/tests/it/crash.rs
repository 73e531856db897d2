//! `hub serve` SIGKILLed at random moments, in the middle of a compaction
//! and in the middle of a graceful shutdown, while a fleet streams and
//! commands are in flight. Nothing acked may be lost or stored twice, and
//! every command ends in a true state, executed once.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use telemetry_proto::v1::{self as pb, operator_client::OperatorClient};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::harness::*;

/// `hub serve` as a child process, with its log lines on a channel.
pub(crate) struct ChildHub {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl ChildHub {
    pub(crate) fn start(db: &TestDb, port: u16) -> ChildHub {
        Self::spawn(db.env(), port)
    }

    /// `start` with more settings (`HUB__...` variables).
    pub(crate) fn start_with_env(
        db: &TestDb,
        port: u16,
        extra: &[(&'static str, &str)],
    ) -> ChildHub {
        let mut env = db.env();
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Self::spawn(env, port)
    }

    /// Waits for the process to exit; its status and the log lines not
    /// read yet.
    pub(crate) async fn exit(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        let mut lines = Vec::new();
        while let Ok(Some(line)) = tokio::time::timeout(WAIT, self.lines.recv()).await {
            lines.push(line);
        }
        (self.child.wait().unwrap(), lines)
    }

    /// A `hub serve` on the storage `settings` name.
    pub(crate) fn start_with(settings: &hub::Settings, port: u16) -> ChildHub {
        let st = &settings.storage;
        let mut env = vec![
            ("HUB__STORAGE__PATH", st.path.display().to_string()),
            ("HUB__STORAGE__URL", st.url.as_str().to_owned()),
        ];
        if st.backend == hub::config::Backend::Postgres {
            env.push(("HUB__STORAGE__BACKEND", "postgres".to_owned()));
        }
        Self::spawn(env, port)
    }

    /// `start_with_env` over a settings file (`--config`).
    pub(crate) fn start_with_config(
        db: &TestDb,
        port: u16,
        config: &std::path::Path,
        extra: &[(&'static str, &str)],
    ) -> ChildHub {
        let mut env = db.env();
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Self::spawn_args(env, port, &["--config", &config.display().to_string()])
    }

    fn spawn(env: Vec<(&'static str, String)>, port: u16) -> ChildHub {
        Self::spawn_args(env, port, &[])
    }

    fn spawn_args(env: Vec<(&'static str, String)>, port: u16, args: &[&str]) -> ChildHub {
        let mut child = crate::harness::hub_process()
            .arg("serve")
            .args(args)
            .envs(env)
            .env("HUB__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("HUB__STORAGE__COMPACT_ROWS", "3000")
            .env("HUB__COMMANDS__MAX_ATTEMPTS", "50")
            .env("HUB__COMMANDS__ACK_TIMEOUT", "2s")
            .env("RUST_LOG", "info,hub::ingest=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hub serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildHub { child, lines }
    }

    /// Forgets the log lines read so far: the next wait sees new ones only.
    fn skip_backlog(&mut self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// Reads log lines until one contains `what`.
    pub(crate) async fn wait_line(&mut self, what: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no log line with {what:?}"))
                .unwrap_or_else(|| panic!("the hub exited before logging {what:?}"));
            if line.contains(what) {
                return;
            }
        }
    }

    /// SIGKILL; returns the log lines it wrote that were not read yet, and
    /// whether the kill is what ended it (not an exit of its own before).
    pub(crate) async fn kill(&mut self) -> (Vec<String>, bool) {
        use std::os::unix::process::ExitStatusExt;
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        let mut rest = Vec::new();
        while let Some(line) = self.lines.recv().await {
            rest.push(line);
        }
        (rest, status.signal() == Some(9))
    }

    pub(crate) fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for ChildHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn operator(url: &str) -> OperatorClient<Channel> {
    let channel = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    OperatorClient::new(channel)
}

async fn live_sessions(url: &str) -> u64 {
    match Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
    {
        Ok(channel) => OperatorClient::new(channel)
            .get_hub_stats(pb::GetHubStatsRequest {})
            .await
            .map_or(0, |s| s.into_inner().live_sessions),
        Err(_) => 0,
    }
}

/// A pseudo-random delay of `base_ms` plus up to `spread_ms`, from the
/// clock (no seed to keep: the kill points that matter are the
/// deterministic ones).
fn jitter(base_ms: u64, spread_ms: u64) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    Duration::from_millis(base_ms + nanos % spread_ms)
}

#[derive(Debug, Clone, Copy)]
enum KillPoint {
    Anytime,
    DuringCompaction,
    DuringShutdown,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_loses_no_acked_reading_and_no_command() {
    let db = TestDb::new().await;
    // Held for the test: each restart finds it free.
    let reserved = reserve_port();
    let port = reserved.port;
    let url = format!("http://127.0.0.1:{port}");
    let mut hub = ChildHub::start(&db, port);
    hub.wait_line("listening on").await;

    let devices = 10;
    let fleet = SimFleet::start_with(device_sim::FleetConfig {
        hub: url.clone(),
        devices,
        rate_hz: 300.0,
        id_prefix: "crash-".into(),
        batch_interval: Duration::from_millis(50),
        connections: Some(2),
        ..Default::default()
    })
    .await;
    fleet.wait_for_acks(3_000).await;

    let points = [
        KillPoint::Anytime,
        KillPoint::DuringCompaction,
        KillPoint::Anytime,
        KillPoint::DuringShutdown,
        KillPoint::DuringCompaction,
        KillPoint::Anytime,
        KillPoint::DuringShutdown,
    ];
    let mut commands = Vec::new();
    let mut kills = 0u64;
    for (round, point) in points.into_iter().enumerate() {
        // Commands in flight when the hub dies.
        let mut op = operator(&url).await;
        for d in [round % devices + 1, (round + 3) % devices + 1] {
            let info = op
                .send_command(pb::SendCommandRequest {
                    device_id: device_sim::device_id("crash-", d),
                    name: "ping".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            commands.push(info.command_id);
        }
        // A kill meant for a compaction that came too late (the compaction
        // had finished), or for a shutdown that had completed (the process
        // exited by itself), is tried again.
        for attempt in 0.. {
            match point {
                KillPoint::Anytime => tokio::time::sleep(jitter(50, 700)).await,
                KillPoint::DuringCompaction => {
                    hub.skip_backlog();
                    hub.wait_line("compacting staged readings").await;
                }
                KillPoint::DuringShutdown => {
                    hub.skip_backlog();
                    hub.terminate();
                    hub.wait_line("shutting down").await;
                    // A graceful shutdown of this small fleet takes tens of
                    // ms: the kill comes within the first few (and is tried
                    // again if the process was gone already).
                    tokio::time::sleep(jitter(0, 10)).await;
                }
            }
            let (after, landed) = hub.kill().await;
            let missed = !landed
                || match point {
                    KillPoint::Anytime => false,
                    KillPoint::DuringCompaction => after
                        .iter()
                        .any(|l| l.contains("compacted staged readings")),
                    KillPoint::DuringShutdown => {
                        after.iter().any(|l| l.contains("shutdown complete"))
                    }
                };
            if landed {
                kills += 1;
            }
            drop(hub);
            hub = ChildHub::start(&db, port);
            hub.wait_line("listening on").await;
            wait_until(
                &format!("fleet back after kill {round} ({point:?})"),
                || async { live_sessions(&url).await == devices as u64 },
            )
            .await;
            fleet.wait_for_acks(1_000).await;
            if !missed {
                break;
            }
            assert!(attempt < 10, "no kill landed inside a {point:?}");
        }
    }

    // Every command ends SUCCEEDED while the devices are still there,
    // executed once however often it was delivered again.
    let op = operator(&url).await;
    for id in &commands {
        wait_until("command final", || async {
            let info = op
                .clone()
                .get_command(pb::GetCommandRequest {
                    command_id: id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            pb::CommandState::try_from(info.state) == Ok(pb::CommandState::Succeeded)
        })
        .await;
    }
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert!(summary.reconnects >= devices as u64 * kills, "{summary:?}");
    assert_eq!(
        summary.commands_executed,
        commands.len() as u64,
        "{summary:?}"
    );

    // A clean stop, then the database is checked by a hub of the test's own.
    hub.terminate();
    assert!(hub.child.wait().unwrap().success(), "SIGTERM exits 0");
    drop(hub);
    let mut checker = spawn_hub_in(db, |_| {}).await;
    assert_fleet_stored_exactly(&checker, "crash-", &summary).await;
    eprintln!(
        "crash: {kills} SIGKILLs survived; {} readings acked and checked; {} commands, each run once",
        summary.acked,
        commands.len()
    );
    checker.stop().await;
}

/// The SQLite database is the hub's alone: its files are 0600 in a 0700
/// directory the hub made, and a second `hub serve` on it refuses to start,
/// naming the file (two writers would each trust their own marks and store
/// readings twice). Metrics off loopback start with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_database_is_private_and_served_by_one_process() {
    use std::os::unix::fs::PermissionsExt;
    if sqlite_only("file modes and the lock file") {
        return;
    }
    let db = TestDb::new().await;
    // In the test's own temp dir (`path()` is that dir), not beside it.
    let data_dir = db.path().join("private");
    let path = data_dir.join("hub.db");
    let path_text = path.display().to_string();
    let (first_port, second_port) = (reserve_port(), reserve_port());
    let port = first_port.port;
    let mut first = ChildHub::start_with_env(
        &db,
        port,
        &[
            ("HUB__STORAGE__PATH", &path_text),
            ("HUB__METRICS__ENABLED", "true"),
            ("HUB__METRICS__LISTEN", "0.0.0.0:0"),
        ],
    );
    first
        .wait_line("metrics.listen is not a loopback address")
        .await;
    first.wait_line("listening on").await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data_dir), 0o700, "the directory the hub made");
    for file in ["hub.db", "hub.db-wal", "hub-commands.db", "hub.db.lock"] {
        let file = data_dir.join(file);
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }

    let mut second =
        ChildHub::start_with_env(&db, second_port.port, &[("HUB__STORAGE__PATH", &path_text)]);
    let (status, lines) = second.exit().await;
    assert!(!status.success(), "a second hub on one file must not start");
    let text = lines.join("\n");
    assert!(
        text.contains(&path_text) && text.contains("another hub process"),
        "{text}"
    );
    // The first one still serves.
    let stats = operator(&format!("http://127.0.0.1:{port}"))
        .await
        .get_hub_stats(pb::GetHubStatsRequest {})
        .await;
    assert!(stats.is_ok(), "{stats:?}");
}
