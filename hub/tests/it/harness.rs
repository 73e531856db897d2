//! Starting hubs, raw device streams and waiting on conditions.

use std::net::SocketAddr;
use std::time::Duration;

use hub::{Hub, Settings};
use telemetry_proto::v1::{
    self as pb, device_gateway_client::DeviceGatewayClient, device_message::Msg as DeviceMsg,
    hub_message::Msg as HubMsg, operator_client::OperatorClient,
};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

pub const WAIT: Duration = Duration::from_secs(20);

/// CI sets HUB_TEST_REQUIRE_ALL=1: every test that would skip for want of
/// an outside service (or a fallback) fails instead.
pub fn require_all() -> bool {
    std::env::var("HUB_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Says a test is skipped because `service` is missing (or fails it under
/// HUB_TEST_REQUIRE_ALL).
pub fn skip(service: &str, addr: &str) {
    assert!(
        !require_all(),
        "{service} not reachable at {addr} (HUB_TEST_REQUIRE_ALL=1 forbids skipping)"
    );
    eprintln!("SKIPPED: {service} not reachable at {addr}");
}

/// The suite runs against one storage backend: SQLite (the default) or,
/// with `HUB_TEST_BACKEND=postgres`, PostgreSQL at `HUB_TEST_PG_URL`
/// (default postgres://postgres@127.0.0.1:5432/test), each test in a
/// database of its own that is dropped after it. CI runs the suite once
/// per backend.
pub fn on_postgres() -> bool {
    std::env::var("HUB_TEST_BACKEND").is_ok_and(|v| v == "postgres")
}

/// Says that a test of a SQLite-only mechanism (its file, its PRAGMAs,
/// VACUUM INTO backups) does not apply; true when the test should return.
/// Such tests are named `sqlite_*`, so CI's PostgreSQL pass leaves them out
/// by name (`--skip sqlite_`) and they show as skipped, not passed.
pub fn sqlite_only(what: &str) -> bool {
    if on_postgres() {
        eprintln!("SQLite only ({what}): nothing to test on PostgreSQL");
    }
    on_postgres()
}

fn pg_admin_url() -> String {
    std::env::var("HUB_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A port held for a test: no other test (in any process) and no `:0`
/// bind of the kernel's can take it while this lives, so a hub restarted
/// on it, a broker restarted on it or a child process told to listen on it
/// finds it free. Picked below the kernel's ephemeral range (which `:0`
/// binds draw from) and locked by a file under the temp dir (tests run in
/// several processes).
pub struct ReservedPort {
    pub port: u16,
    _lock: std::fs::File,
}

pub fn reserve_port() -> ReservedPort {
    let dir = std::env::temp_dir().join("telemetry-hub-test-ports");
    std::fs::create_dir_all(&dir).unwrap();
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (first, last) = (10_000u16, ephemeral_from.saturating_sub(1).max(10_001));
    let span = u32::from(last - first);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    for step in 0..span {
        let port = first + ((seed.wrapping_add(step)) % span) as u16;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(port.to_string()))
            .unwrap();
        if lock.try_lock().is_err() {
            continue;
        }
        // Someone outside this scheme may hold it.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return ReservedPort { port, _lock: lock };
        }
    }
    panic!("no free port between {first} and {last}");
}

/// Where a test hub keeps its data: a temp dir (SQLite's files, backups,
/// certificates) and, on PostgreSQL, a database made for this test.
pub struct TestDb {
    dir: TempDir,
    pg: Option<String>,
}

impl TestDb {
    pub async fn new() -> TestDb {
        if !on_postgres() {
            let dir = tempfile::tempdir().unwrap();
            return TestDb { dir, pg: None };
        }
        Self::create_postgres().await
    }

    /// A PostgreSQL database whatever HUB_TEST_BACKEND says (tests of
    /// several hubs on one database); None, after saying SKIPPED, when
    /// PostgreSQL is not reachable.
    pub async fn postgres() -> Option<TestDb> {
        use sqlx::Connection;
        let admin = pg_admin_url();
        match sqlx::PgConnection::connect(&admin).await {
            Ok(conn) => {
                let _ = conn.close().await;
                Some(Self::create_postgres().await)
            }
            Err(_) => {
                skip("PostgreSQL", &admin);
                None
            }
        }
    }

    async fn create_postgres() -> TestDb {
        use sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "hub_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            rand::random::<u32>()
        );
        let admin = pg_admin_url();
        let mut conn = match sqlx::PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) => panic!("HUB_TEST_BACKEND=postgres but PostgreSQL at {admin}: {e}"),
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        TestDb {
            dir,
            pg: Some(name),
        }
    }

    /// A SQLite database the test prepared in `dir` (`dir/hub.db`).
    /// The test's temp dir.
    pub fn dir_path(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn sqlite_in(dir: TempDir) -> TestDb {
        TestDb { dir, pg: None }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The database's URL on PostgreSQL.
    pub fn pg_url(&self) -> Option<String> {
        let name = self.pg.as_ref()?;
        let admin = pg_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Some(format!("{base}/{name}"))
    }

    /// Points settings at this database.
    pub fn apply(&self, s: &mut Settings) {
        s.storage.path = self.dir.path().join("hub.db");
        if let Some(url) = self.pg_url() {
            s.storage.backend = hub::config::Backend::Postgres;
            s.storage.url = hub::config::DatabaseUrl(url);
        }
    }

    /// The same as environment variables, for a `hub` process.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![(
            "HUB__STORAGE__PATH",
            self.dir.path().join("hub.db").display().to_string(),
        )];
        if let Some(url) = self.pg_url() {
            env.push(("HUB__STORAGE__BACKEND", "postgres".to_owned()));
            env.push(("HUB__STORAGE__URL", url));
        }
        env
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg.take() else { return };
        // On a thread of its own: Drop cannot await, and may run inside the
        // test's runtime.
        let admin = pg_admin_url();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database: {dropped:?}");
        }
    }
}

pub struct TestHub {
    hub: Option<Hub>,
    pub addr: SocketAddr,
    /// The gRPC port, held so that a restart finds it free.
    _port: ReservedPort,
    pub settings: Settings,
    /// Kept for the hub's life (shared with its peers): dropping the last
    /// reference deletes the data.
    db: std::sync::Arc<TestDb>,
}

fn test_settings(db: &TestDb) -> Settings {
    let mut s = Settings::defaults().unwrap();
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    db.apply(&mut s);
    s.server.shutdown_timeout = Duration::from_secs(10);
    s
}

pub async fn spawn_hub() -> TestHub {
    spawn_hub_with(|_| {}).await
}

pub async fn spawn_hub_with(adjust: impl FnOnce(&mut Settings)) -> TestHub {
    spawn_hub_in(TestDb::new().await, adjust).await
}

/// A hub on the database `db`, which it may already hold.
pub async fn spawn_hub_in(db: TestDb, adjust: impl FnOnce(&mut Settings)) -> TestHub {
    spawn_hub_on(std::sync::Arc::new(db), adjust).await
}

async fn spawn_hub_on(db: std::sync::Arc<TestDb>, adjust: impl FnOnce(&mut Settings)) -> TestHub {
    let mut settings = test_settings(&db);
    let port = reserve_port();
    settings.server.listen = SocketAddr::from(([127, 0, 0, 1], port.port));
    adjust(&mut settings);
    let hub = Hub::start(settings.clone()).await.unwrap();
    TestHub {
        addr: hub.local_addr(),
        _port: port,
        hub: Some(hub),
        settings,
        db,
    }
}

/// The `hub` binary, with its HTTP console on a free port (parallel tests
/// would collide on the default 8080).
pub fn hub_process() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_hub"));
    command.env("HUB__HTTP__LISTEN", "127.0.0.1:0");
    command
}

impl TestHub {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The web console's base URL, e.g. `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        let addr = self.hub().http_addr().expect("http.enabled");
        format!("http://{addr}")
    }

    pub fn hub(&self) -> &Hub {
        self.hub.as_ref().expect("hub is running")
    }

    /// Another hub on the same (PostgreSQL) database, with ports of its own.
    pub async fn spawn_peer(&self, adjust: impl FnOnce(&mut Settings)) -> TestHub {
        spawn_hub_on(std::sync::Arc::clone(&self.db), adjust).await
    }

    /// The running hub itself, to drive its shutdown by hand.
    pub fn take(&mut self) -> Hub {
        self.hub.take().expect("hub is running")
    }

    pub async fn stop(&mut self) {
        if let Some(hub) = self.hub.take() {
            tokio::time::timeout(WAIT, hub.shutdown())
                .await
                .expect("shutdown within the timeout")
                .expect("clean shutdown");
        }
    }

    /// Stops the hub and starts it again on the same database and port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut settings = self.settings.clone();
        settings.server.listen = self.addr;
        let hub = Hub::start(settings).await.unwrap();
        self.addr = hub.local_addr();
        self.hub = Some(hub);
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A connection with 1 KiB HTTP/2 windows: a client that does not read
    /// on it stops the hub's sends after very little.
    pub async fn tiny_window_channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .initial_stream_window_size(Some(1024))
            .initial_connection_window_size(Some(1024))
            .connect()
            .await
            .unwrap()
    }

    pub async fn operator(&self) -> OperatorClient<Channel> {
        OperatorClient::new(self.channel().await)
    }

    pub async fn stats(&self) -> pb::HubStats {
        self.operator()
            .await
            .get_hub_stats(pb::GetHubStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Every raw reading of a device, in query order.
    pub async fn readings(&self, device: &str) -> Vec<pb::ReadingRow> {
        self.query(pb::QueryReadingsRequest {
            device_id: device.into(),
            ..Default::default()
        })
        .await
        .into_iter()
        .flat_map(|c| c.rows)
        .collect()
    }

    pub async fn query(&self, request: pb::QueryReadingsRequest) -> Vec<pb::QueryReadingsChunk> {
        let mut stream = self
            .operator()
            .await
            .query_readings(request)
            .await
            .unwrap()
            .into_inner();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            chunks.push(chunk);
        }
        chunks
    }

    /// One device as ListDevices shows it (the page that starts at it).
    pub async fn device(&self, device: &str) -> Option<pb::DeviceInfo> {
        // Ids sort byte-wise: the page after everything below `device`.
        let mut before = device.to_owned();
        before.pop();
        self.operator()
            .await
            .list_devices(pb::ListDevicesRequest {
                after: before,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .devices
            .into_iter()
            .find(|d| d.device_id == device)
    }
}

/// Polls `check` until it returns true or the deadline passes.
pub async fn wait_until(what: &str, check: impl AsyncFnMut() -> bool) {
    wait_until_within(what, WAIT, check).await;
}

/// [`wait_until`] with a deadline of its own, for the few waits that are
/// long by nature (thousands of devices reconnecting).
pub async fn wait_until_within(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn reading(seq: u64, sensor: &str, ts_ms: i64, value: f64) -> pb::Reading {
    pb::Reading {
        seq,
        sensor: sensor.into(),
        ts_ms,
        value,
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A device stream driven by hand.
pub struct RawDevice {
    pub tx: Option<mpsc::Sender<pb::DeviceMessage>>,
    pub inbound: Streaming<pb::HubMessage>,
}

pub fn hello(device_id: &str) -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(DeviceMsg::Hello(pb::Hello {
            device_id: device_id.into(),
            token: "ignored".into(),
            firmware: "test-fw/1".into(),
            labels: [("site".to_owned(), "lab".to_owned())]
                .into_iter()
                .collect(),
            ..Default::default()
        })),
    }
}

/// A Hello of a twin-aware device that holds desired version `held`.
pub fn hello_twin(device_id: &str, held: u64) -> pb::DeviceMessage {
    let mut msg = hello(device_id);
    if let Some(DeviceMsg::Hello(h)) = &mut msg.msg {
        h.twin = true;
        h.desired_version = held;
    }
    msg
}

/// A reported patch.
pub fn reported(seq: u64, patch: serde_json::Value) -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(DeviceMsg::Reported(pb::ReportedPatch {
            seq,
            patch_json: patch.to_string(),
        })),
    }
}

/// A Hello with a token.
pub fn hello_token(device_id: &str, token: &str) -> pb::DeviceMessage {
    let mut msg = hello(device_id);
    if let Some(DeviceMsg::Hello(h)) = &mut msg.msg {
        h.token = token.into();
    }
    msg
}

pub fn batch(readings: Vec<pb::Reading>) -> pb::DeviceMessage {
    pb::DeviceMessage {
        msg: Some(DeviceMsg::Readings(pb::ReadingBatch { readings })),
    }
}

impl RawDevice {
    /// Opens a stream and sends `first` (usually a Hello).
    pub async fn open(channel: Channel, first: pb::DeviceMessage) -> RawDevice {
        let (tx, rx) = mpsc::channel(64);
        tx.send(first).await.unwrap();
        let inbound = DeviceGatewayClient::new(channel)
            .connect(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        RawDevice {
            tx: Some(tx),
            inbound,
        }
    }

    /// Opens a stream, says Hello and returns the Welcome.
    pub async fn connect(hub: &TestHub, device_id: &str) -> (RawDevice, pb::Welcome) {
        let mut dev = Self::open(hub.channel().await, hello(device_id)).await;
        match dev.next().await {
            Ok(Some(HubMsg::Welcome(w))) => (dev, w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// The stream's send side, for a task of the test's own.
    pub fn sender(&self) -> mpsc::Sender<pb::DeviceMessage> {
        self.tx.clone().expect("send side open")
    }

    pub async fn send(&self, msg: pb::DeviceMessage) {
        self.tx
            .as_ref()
            .expect("send side open")
            .send(msg)
            .await
            .unwrap();
    }

    /// The next hub message; Ok(None) is the end of the stream with OK.
    pub async fn next(&mut self) -> Result<Option<HubMsg>, Status> {
        match tokio::time::timeout(WAIT, self.inbound.message()).await {
            Ok(Ok(Some(m))) => Ok(Some(m.msg.expect("hub messages have content"))),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no message from the hub within {WAIT:?}"),
        }
    }

    /// Reads acks until one covers `seq`; returns (acked_seq, rejected,
    /// duplicates) summed over the acks read.
    pub async fn ack_through(&mut self, seq: u64) -> (u64, u32, u32) {
        let (mut rejected, mut dups) = (0, 0);
        loop {
            match self.next().await {
                Ok(Some(HubMsg::Ack(a))) => {
                    rejected += a.rejected;
                    dups += a.duplicates;
                    if a.acked_seq >= seq {
                        return (a.acked_seq, rejected, dups);
                    }
                }
                other => panic!("expected Ack, got {other:?}"),
            }
        }
    }

    /// Reads until the stream ends with an error status and returns its code.
    pub async fn end_code(&mut self) -> Code {
        loop {
            match self.next().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Code::Ok,
                Err(status) => return status.code(),
            }
        }
    }

    /// Ends the send side (gRPC's half-close).
    pub fn half_close(&mut self) {
        self.tx = None;
    }
}

/// A TCP proxy in front of the hub that can freeze (stop forwarding but keep
/// the sockets open: a silent peer) or cut (close every connection: the
/// network is gone).
pub struct FaultyLink {
    pub addr: SocketAddr,
    freeze: tokio_util::sync::CancellationToken,
    cut: tokio_util::sync::CancellationToken,
    _task: tokio::task::JoinHandle<()>,
}

impl FaultyLink {
    pub async fn to(target: SocketAddr) -> FaultyLink {
        use tokio_util::sync::CancellationToken;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let freeze = CancellationToken::new();
        let cut = CancellationToken::new();
        let (f, c) = (freeze.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = c.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { return };
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (f, c) = (f.clone(), c.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let forward = async {
                        tokio::select! {
                            _ = tokio::io::copy(&mut cr, &mut sw) => {}
                            _ = tokio::io::copy(&mut sr, &mut cw) => {}
                        }
                    };
                    tokio::select! {
                        _ = forward => {}
                        _ = c.cancelled() => return,
                        _ = f.cancelled() => {}
                    }
                    // Frozen: hold the sockets open, say nothing.
                    c.cancelled().await;
                    let _ = (cr, cw, sr, sw);
                });
            }
        });
        FaultyLink {
            addr,
            freeze,
            cut,
            _task: task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub fn freeze(&self) {
        self.freeze.cancel();
    }

    pub fn cut(&self) {
        self.cut.cancel();
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.cut.cancel();
    }
}

/// A fleet of simulated devices (device-sim as a library) running until
/// `stop` is cancelled.
pub struct SimFleet {
    pub stop: tokio_util::sync::CancellationToken,
    pub stats: std::sync::Arc<device_sim::FleetStats>,
    task: tokio::task::JoinHandle<Result<device_sim::FleetSummary, device_sim::FleetError>>,
}

impl SimFleet {
    pub async fn start(hub: &TestHub, prefix: &str, devices: usize) -> SimFleet {
        let stop = tokio_util::sync::CancellationToken::new();
        let stats = std::sync::Arc::new(device_sim::FleetStats::default());
        let cfg = device_sim::FleetConfig {
            hub: hub.url(),
            devices,
            rate_hz: 5.0,
            id_prefix: prefix.into(),
            ..Default::default()
        };
        let task = tokio::spawn(device_sim::run(cfg, stop.clone(), stats.clone()));
        let fleet = SimFleet { stop, stats, task };
        wait_until("simulated devices online", || async {
            device_sim::FleetStats::get(&fleet.stats.online) == devices as u64
        })
        .await;
        fleet
    }

    pub async fn finish(self) -> device_sim::FleetSummary {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }
}

impl RawDevice {
    /// Reads until the next Command, answering nothing.
    pub async fn next_command(&mut self) -> pb::Command {
        loop {
            match self.next().await {
                Ok(Some(HubMsg::Command(c))) => return c,
                Ok(Some(HubMsg::Ack(_))) => continue,
                other => panic!("expected a Command, got {other:?}"),
            }
        }
    }

    pub async fn reply(
        &self,
        command_id: &str,
        status: pb::CommandStatus,
        detail: &str,
        result: &str,
    ) {
        self.send(pb::DeviceMessage {
            msg: Some(DeviceMsg::CommandReply(pb::CommandReply {
                command_id: command_id.into(),
                status: status as i32,
                detail: detail.into(),
                result_json: result.into(),
            })),
        })
        .await;
    }
}

impl TestHub {
    pub async fn send_command(
        &self,
        device: &str,
        name: &str,
        params: &str,
        ttl: Option<Duration>,
    ) -> Result<pb::CommandInfo, Status> {
        self.operator()
            .await
            .send_command(pb::SendCommandRequest {
                device_id: device.into(),
                name: name.into(),
                params_json: params.into(),
                ttl_ms: ttl.map_or(0, |t| t.as_millis() as i64),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn command(&self, id: &str) -> pb::CommandInfo {
        self.operator()
            .await
            .get_command(pb::GetCommandRequest {
                command_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Watches a command until it is final; returns every state seen.
    pub async fn watch_until_final(&self, id: &str) -> Vec<pb::CommandInfo> {
        let mut stream = self
            .operator()
            .await
            .watch_command(pb::WatchCommandRequest {
                command_id: id.into(),
                timeout_ms: WAIT.as_millis() as i64,
            })
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while let Some(info) = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
        {
            seen.push(info);
        }
        seen
    }

    /// Registers a device (one Hello) and leaves it offline.
    pub async fn register_offline(&self, device: &str) {
        let (mut dev, _) = RawDevice::connect(self, device).await;
        dev.half_close();
        assert_eq!(dev.end_code().await, Code::Ok);
        wait_until("device offline", || async {
            !self.device(device).await.unwrap().online
        })
        .await;
    }
}

pub fn state(info: &pb::CommandInfo) -> pb::CommandState {
    pb::CommandState::try_from(info.state).unwrap()
}

impl SimFleet {
    /// A fleet with its own settings against `url`; waits until every
    /// device is online.
    pub async fn start_with(cfg: device_sim::FleetConfig) -> SimFleet {
        let devices = cfg.devices as u64;
        let stop = tokio_util::sync::CancellationToken::new();
        let stats = std::sync::Arc::new(device_sim::FleetStats::default());
        let task = tokio::spawn(device_sim::run(cfg, stop.clone(), stats.clone()));
        let fleet = SimFleet { stop, stats, task };
        // Thousands of devices take a while to say Hello on two cores.
        let within = WAIT.max(Duration::from_millis(20) * devices as u32);
        wait_until_within("simulated devices online", within, || async {
            device_sim::FleetStats::get(&fleet.stats.online) == devices
        })
        .await;
        fleet
    }

    pub fn acked(&self) -> u64 {
        device_sim::FleetStats::get(&self.stats.acked)
    }

    /// Waits until `n` more readings are acked than now.
    pub async fn wait_for_acks(&self, n: u64) {
        let from = self.acked();
        wait_until(&format!("{n} more acks"), || async {
            self.acked() >= from + n
        })
        .await;
    }
}

impl TestHub {
    /// The gRPC health status of `service` ("" is the whole hub).
    pub async fn health(
        &self,
        service: &str,
    ) -> tonic_health::pb::health_check_response::ServingStatus {
        let mut client = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let status = client
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        tonic_health::pb::health_check_response::ServingStatus::try_from(status).unwrap()
    }

    /// Waits until no stream or query of any client has a task left: what
    /// every scenario must come back to.
    pub async fn assert_no_leaks(&self) {
        let hub = self.hub();
        wait_until("sessions and tasks back to none", || async {
            hub.metrics().live_sessions() == 0 && hub.live_tasks() == 0
        })
        .await;
        assert!(hub.registry().online().is_empty());
    }

    pub fn db_path(&self) -> std::path::PathBuf {
        self.settings.storage.path.clone()
    }
}

/// `PRAGMA integrity_check` of a database file, through a connection of
/// the test's own.
pub async fn integrity_check(path: &std::path::Path) -> String {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .unwrap();
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    rows.join("; ")
}

/// What a skeptical user checks after a fleet ran through faults: nothing
/// acked was lost or stored twice. Per device: the stored readings are
/// exactly seqs 1..=n, n is the hub's mark, and everything the devices were
/// told is acked adds up to what is stored. Both database files pass
/// SQLite's integrity check.
pub async fn assert_fleet_stored_exactly(
    hub: &TestHub,
    prefix: &str,
    summary: &device_sim::FleetSummary,
) {
    assert_eq!(
        (summary.lost_acks, summary.bad_acks),
        (0, 0),
        "no acked reading lost, no ack beyond what was sent: {summary:?}"
    );
    let mut total = 0;
    for i in 1..=summary.devices {
        let id = device_sim::device_id(prefix, i);
        let info = hub.device(&id).await.unwrap();
        let seqs: Vec<u64> = hub.readings(&id).await.iter().map(|r| r.seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (1..=info.acked_seq).collect::<Vec<_>>(),
            "{id}: seqs 1..=acked_seq, each once"
        );
        assert_eq!(info.readings, seqs.len() as u64, "{id}: stored count");
        total += seqs.len() as u64;
    }
    assert_eq!(total, summary.acked, "stored == acked: {summary:?}");
    assert_stored_exactly(hub, prefix, summary).await;
}

/// The same promise checked in the database itself, for any number of
/// devices: per device the stored seqs (staged and in blocks together) are
/// exactly 1..=n, n is its mark and its count; the total is what the devices
/// were told is acked. On SQLite both database files pass its integrity
/// check.
pub async fn assert_stored_exactly(
    hub: &TestHub,
    prefix: &str,
    summary: &device_sim::FleetSummary,
) {
    assert_eq!((summary.lost_acks, summary.bad_acks), (0, 0), "{summary:?}");
    let mut db = DbConn::open(&hub.settings).await;
    let devices = db.devices(prefix).await;
    assert_eq!(devices.len(), summary.devices, "every device registered");
    let mut total = 0;
    for (key, id, mark, counted) in devices {
        let mut seqs = db.stored_seqs(key).await;
        seqs.sort_unstable();
        let n = seqs.len() as i64;
        seqs.dedup();
        let distinct = seqs.len() as i64;
        let (min, max) = (
            seqs.first().copied().unwrap_or(1),
            seqs.last().copied().unwrap_or(0),
        );
        assert_eq!(
            (n, distinct, min, max, counted),
            (mark, mark, 1, mark, mark),
            "{id}: seqs exactly 1..={mark}, each once"
        );
        total += n as u64;
    }
    assert_eq!(total, summary.acked, "stored == acked: {summary:?}");
    if hub.settings.storage.backend == hub::config::Backend::Sqlite {
        let path = &hub.settings.storage.path;
        assert_eq!(integrity_check(path).await, "ok");
        assert_eq!(
            integrity_check(&path.with_file_name("hub-commands.db")).await,
            "ok"
        );
    }
}

/// A connection of the test's own to a hub's readings database.
pub enum DbConn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl DbConn {
    pub async fn open(settings: &Settings) -> DbConn {
        use sqlx::{ConnectOptions, Connection};
        match settings.storage.backend {
            hub::config::Backend::Sqlite => DbConn::Sqlite(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&settings.storage.path)
                    .connect()
                    .await
                    .unwrap(),
            ),
            hub::config::Backend::Postgres => DbConn::Postgres(
                sqlx::PgConnection::connect(settings.storage.url.as_str())
                    .await
                    .unwrap(),
            ),
        }
    }

    /// (key, external id, mark, count) of the devices whose id starts
    /// with `prefix`.
    pub async fn devices(&mut self, prefix: &str) -> Vec<(i64, String, i64, i64)> {
        const SQL: &str = "SELECT d.id, d.external_id, m.acked_seq, m.reading_count \
             FROM devices d JOIN device_progress m ON m.id = d.id \
             WHERE substr(d.external_id, 1, length($1)) = $1";
        match self {
            DbConn::Sqlite(c) => sqlx::query_as(SQL).bind(prefix).fetch_all(c).await,
            DbConn::Postgres(c) => sqlx::query_as(SQL).bind(prefix).fetch_all(c).await,
        }
        .unwrap()
    }

    /// Runs a statement of the test's own (DDL, fault injection).
    pub async fn execute(&mut self, sql: &str) {
        match self {
            DbConn::Sqlite(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
            DbConn::Postgres(c) => sqlx::raw_sql(sql).execute(c).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, DbConn::Postgres(_))
    }

    /// A query's one value.
    pub async fn scalar<T>(&mut self, sql: &str) -> T
    where
        T: Send + Unpin,
        for<'r> T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        for<'r> T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
    {
        match self {
            DbConn::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await,
            DbConn::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await,
        }
        .unwrap()
    }

    /// Every seq stored for a device (database key), staged or in blocks.
    pub async fn stored_seqs(&mut self, device: i64) -> Vec<i64> {
        const STAGED: &str = "SELECT seq FROM readings_recent WHERE device_id = $1";
        const BLOCKS: &str = "SELECT data FROM blocks WHERE device_id = $1";
        let (mut seqs, blocks): (Vec<i64>, Vec<Vec<u8>>) = match self {
            DbConn::Sqlite(c) => (
                sqlx::query_scalar(STAGED)
                    .bind(device)
                    .fetch_all(&mut *c)
                    .await
                    .unwrap(),
                sqlx::query_scalar(BLOCKS)
                    .bind(device)
                    .fetch_all(c)
                    .await
                    .unwrap(),
            ),
            DbConn::Postgres(c) => (
                sqlx::query_scalar(STAGED)
                    .bind(device)
                    .fetch_all(&mut *c)
                    .await
                    .unwrap(),
                sqlx::query_scalar(BLOCKS)
                    .bind(device)
                    .fetch_all(c)
                    .await
                    .unwrap(),
            ),
        };
        for block in blocks {
            let points = hub::store::codec::decode(&block).expect("every stored block decodes");
            seqs.extend(points.iter().map(|p| p.seq as i64));
        }
        seqs
    }
}

/// A CA, the hub's certificate (127.0.0.1) and device certificates, in a
/// temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca_cert = params.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca_cert,
            ca_key,
        };
        std::fs::write(pki.ca_path(), pki.ca_cert.pem()).unwrap();
        pki
    }

    pub fn ca_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate signed by this CA: (cert path, key path).
    pub fn issue(
        &self,
        name: &str,
        cn: &str,
        ip_san: bool,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let sans = if ip_san {
            vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())]
        } else {
            Vec::new()
        };
        self.issue_with(name, cn, sans)
    }

    /// A certificate with subject alternative names of its own.
    pub fn issue_with(
        &self,
        name: &str,
        cn: &str,
        sans: Vec<rcgen::SanType>,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let cert_path = self.dir.path().join(format!("{name}.pem"));
        let key_path = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    pub fn ca(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(std::fs::read(self.ca_path()).unwrap())
    }
}
