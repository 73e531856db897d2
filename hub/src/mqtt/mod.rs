//! The optional MQTT bridge (rumqttc). Never touches tonic or sqlx.
//!
//! Out: committed readings (one message per device per commit), retained
//! device and hub presence, command state changes, and retained twin
//! documents (`{prefix}/devices/{id}/twin/desired` and `…/reported`, each
//! with its version, published by the hub that committed the change), and
//! each alarm change on `{prefix}/alarms/{device}` (as webhooks get it). In
//! (only with `mqtt.commands = true`: whoever may publish there sends
//! commands, so the broker's credentials and ACL are this door's auth):
//! commands on `{prefix}/devices/+/commands` and desired changes on
//! `{prefix}/devices/+/twin/desired/set`, which take exactly the gRPC path
//! ([`Operations::send_command`], [`Operations::update_desired`]), logged
//! `by=mqtt`. Bad input is answered on `{prefix}/errors`.
//!
//! Ingest and acks never wait on the broker: the bridge reads the committed
//! fan-out like any consumer, and what it produces while the broker is away
//! waits in a bounded buffer that drops its oldest message first. The
//! rumqttc event loop runs on its own task (its `poll` is never cancelled
//! mid-way), reconnects with backoff and reports to the bridge, which
//! subscribes again and republishes the retained statuses.

mod topics;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::alarms::AlarmEvent;
use crate::config::MqttSettings;
use crate::domain::{CommandRecord, CommittedBatch, DeviceId, Presence};
use crate::metrics::HubMetrics;
use crate::operator::Operations;
use crate::registry::SessionRegistry;
use crate::twin::{TwinEvent, TwinPart};
pub use topics::Topics;

/// What the rumqttc event loop tells the bridge.
enum Link {
    Connected,
    Disconnected(String),
    Message {
        topic: String,
        payload: bytes::Bytes,
    },
}

struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
}

/// Request ids of commands that came in over MQTT (bounded).
const REMEMBERED_REQUESTS: usize = 10_000;

pub struct Bridge {
    settings: MqttSettings,
    topics: Topics,
    qos: QoS,
    /// The operator core: commands from MQTT take the path every door
    /// takes.
    ops: Arc<Operations>,
    registry: Arc<SessionRegistry>,
    metrics: Arc<HubMetrics>,
    outbox: VecDeque<Outgoing>,
    /// Devices whose retained status says online.
    online: HashMap<String, Presence>,
    request_ids: HashMap<String, String>,
    request_order: VecDeque<String>,
    last_drop_log: Option<Instant>,
}

/// What a command message on MQTT may say.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttCommand {
    name: String,
    #[serde(default)]
    params: Option<Value>,
    #[serde(default)]
    ttl_s: Option<f64>,
    #[serde(default)]
    request_id: Option<String>,
}

/// What a desired change on MQTT may say.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttDesired {
    /// A JSON merge patch of the desired document.
    desired: Value,
    #[serde(default)]
    if_version: Option<u64>,
    /// Echoed on the errors topic (read there from the raw payload).
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Bridge {
    /// `cluster` is this hub's id when it is one of several on a PostgreSQL
    /// database: its MQTT client id and status topic are then its own, and
    /// commands come through a shared subscription.
    pub fn new(
        mut settings: MqttSettings,
        ops: Arc<Operations>,
        registry: Arc<SessionRegistry>,
        metrics: Arc<HubMetrics>,
        cluster: Option<&str>,
    ) -> Self {
        let topics = match cluster {
            Some(hub_id) => {
                let topics =
                    Topics::in_cluster(&settings.topic_prefix, hub_id, &settings.client_id);
                settings.client_id = format!("{}-{hub_id}", settings.client_id);
                topics
            }
            None => Topics::new(&settings.topic_prefix),
        };
        Self {
            topics,
            qos: qos(settings.qos),
            settings,
            ops,
            registry,
            metrics,
            outbox: VecDeque::new(),
            online: HashMap::new(),
            request_ids: HashMap::new(),
            request_order: VecDeque::new(),
            last_drop_log: None,
        }
    }

    fn options(&self) -> Result<MqttOptions, String> {
        let (host, port) = self.settings.host_port()?;
        let mut options = MqttOptions::new(&self.settings.client_id, host, port);
        options
            .set_keep_alive(Duration::from_secs(10))
            .set_clean_session(true)
            .set_max_packet_size(
                self.settings.max_payload_bytes + 1024,
                self.settings.max_payload_bytes.max(1 << 20) + 1024,
            )
            .set_last_will(LastWill::new(
                self.topics.hub_status(),
                "offline",
                self.qos,
                true,
            ));
        if !self.settings.username.is_empty() {
            options.set_credentials(&self.settings.username, &self.settings.password);
        }
        if self.settings.tls() {
            let ca = std::fs::read(&self.settings.ca)
                .map_err(|e| format!("cannot read mqtt.ca {}: {e}", self.settings.ca.display()))?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Simple {
                    ca,
                    alpn: None,
                    client_auth: None,
                },
            ));
        }
        Ok(options)
    }

    /// Runs until `stop`; then marks every device and the hub offline and
    /// disconnects (bounded).
    pub async fn run(
        mut self,
        mut committed: broadcast::Receiver<Arc<CommittedBatch>>,
        mut presence: broadcast::Receiver<Presence>,
        mut command_events: broadcast::Receiver<CommandRecord>,
        mut twins: broadcast::Receiver<TwinEvent>,
        mut alarms: broadcast::Receiver<Arc<AlarmEvent>>,
        stop: CancellationToken,
    ) {
        let options = match self.options() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "MQTT bridge not started");
                return;
            }
        };
        let (client, eventloop) = AsyncClient::new(options, 256);
        let (link_tx, mut link) = mpsc::channel(256);
        let poll_stop = CancellationToken::new();
        let poller = tokio::spawn(poll_events(eventloop, link_tx, poll_stop.clone()));
        let mut connected = false;
        // The live statuses as of now; changes arrive on `presence`.
        for p in self.registry.live_streams() {
            self.on_presence(p);
        }
        let mut retry = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                event = link.recv() => match event {
                    Some(Link::Connected) => {
                        tracing::info!(url = %self.settings.url, "MQTT connected");
                        connected = true;
                        self.metrics.mqtt_connected.store(true, Ordering::Relaxed);
                        self.on_connected(&client);
                    }
                    Some(Link::Disconnected(why)) => {
                        HubMetrics::add(&self.metrics.mqtt_connection_errors, 1);
                        if connected {
                            tracing::warn!(error = %why, "MQTT connection lost; buffering, will reconnect");
                        }
                        connected = false;
                        self.metrics.mqtt_connected.store(false, Ordering::Relaxed);
                    }
                    Some(Link::Message { topic, payload }) => self.on_message(&topic, &payload).await,
                    None => break,
                },
                batch = committed.recv() => match batch {
                    Ok(batch) => self.on_committed(&batch),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(commits = n, "MQTT bridge fell behind the committed readings; some were not published");
                        self.count_dropped(n);
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                p = presence.recv() => match p {
                    Ok(p) => self.on_presence(p),
                    Err(broadcast::error::RecvError::Lagged(_)) => self.resync_presence(),
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                rec = command_events.recv() => match rec {
                    Ok(rec) => self.on_command_event(&rec),
                    Err(broadcast::error::RecvError::Lagged(n)) => self.count_dropped(n),
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                event = twins.recv() => match event {
                    Ok(event) => self.on_twin(&event),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(changes = n, "MQTT bridge fell behind the twin changes; some were not published");
                        self.count_dropped(n);
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                event = alarms.recv() => match event {
                    Ok(event) => {
                        let topic = self.topics.alarms(&event.alarm.device);
                        self.push(topic, event.to_json().into_bytes(), false);
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(events = n, "MQTT bridge fell behind the alarm events; some were not published");
                        self.count_dropped(n);
                    }
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                _ = retry.tick(), if connected && !self.outbox.is_empty() => {}
                _ = stop.cancelled() => break,
            }
            if connected {
                self.flush(&client);
            }
        }
        // Streams ended before the stop: their presence changes (a move
        // to another hub among them) count, even those not read yet.
        loop {
            match presence.try_recv() {
                Ok(p) => self.on_presence(p),
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.resync_presence(),
                Err(_) => break,
            }
        }
        self.shut_down(&client, connected, &mut link).await;
        poll_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
        self.metrics.mqtt_connected.store(false, Ordering::Relaxed);
    }

    /// Clean shutdown: every device offline, the hub offline, disconnect.
    async fn shut_down(
        &mut self,
        client: &AsyncClient,
        connected: bool,
        link: &mut mpsc::Receiver<Link>,
    ) {
        let devices: Vec<Presence> = self.online.drain().map(|(_, p)| p).collect();
        for mut p in devices {
            p.online = false;
            p.since_ms = crate::domain::now_ms();
            self.push(
                self.topics.device_status(&p.device_id),
                status_payload(&p),
                true,
            );
        }
        self.push(self.topics.hub_status(), b"offline".to_vec(), true);
        if !connected {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.outbox.is_empty() && Instant::now() < deadline {
            self.flush(client);
            if !self.outbox.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = client.try_disconnect();
        // Let the event loop write what it holds before the disconnect.
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(event) = link.recv().await {
                if let Link::Disconnected(_) = event {
                    break;
                }
            }
        })
        .await;
    }

    fn on_connected(&mut self, client: &AsyncClient) {
        if self.settings.commands
            && let Err(e) = client.try_subscribe(self.topics.command_subscription(), self.qos)
        {
            tracing::error!(error = %e, "cannot subscribe to MQTT commands");
        }
        if self.settings.commands
            && let Err(e) = client.try_subscribe(self.topics.twin_set_subscription(), self.qos)
        {
            tracing::error!(error = %e, "cannot subscribe to MQTT desired changes");
        }
        // Retained statuses first, ahead of anything buffered.
        let mut statuses = vec![Outgoing {
            topic: self.topics.hub_status(),
            payload: b"online".to_vec(),
            retain: true,
        }];
        for p in self.online.values() {
            statuses.push(Outgoing {
                topic: self.topics.device_status(&p.device_id),
                payload: status_payload(p),
                retain: true,
            });
        }
        for msg in statuses.into_iter().rev() {
            self.outbox.push_front(msg);
        }
    }

    fn flush(&mut self, client: &AsyncClient) {
        while let Some(msg) = self.outbox.front() {
            match client.try_publish(&msg.topic, self.qos, msg.retain, msg.payload.clone()) {
                Ok(()) => {
                    self.outbox.pop_front();
                    HubMetrics::add(&self.metrics.mqtt_published, 1);
                }
                // rumqttc's own queue is full: keep ours, try again soon.
                Err(_) => break,
            }
        }
    }

    fn push(&mut self, topic: String, payload: Vec<u8>, retain: bool) {
        if self.outbox.len() >= self.settings.buffer {
            self.outbox.pop_front();
            self.count_dropped(1);
        }
        self.outbox.push_back(Outgoing {
            topic,
            payload,
            retain,
        });
    }

    fn count_dropped(&mut self, n: u64) {
        HubMetrics::add(&self.metrics.mqtt_dropped, n);
        let now = Instant::now();
        if self
            .last_drop_log
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            tracing::warn!(
                total = HubMetrics::get(&self.metrics.mqtt_dropped),
                buffer = self.settings.buffer,
                "MQTT buffer full: oldest messages dropped"
            );
            self.last_drop_log = Some(now);
        }
    }

    fn on_committed(&mut self, batch: &CommittedBatch) {
        for device in &batch.devices {
            let readings: Vec<Value> = device
                .readings
                .iter()
                .map(|r| json!({"seq": r.seq, "sensor": &*r.sensor, "ts_ms": r.ts_ms, "value": r.value}))
                .collect();
            let payload = json!({"device_id": &*device.device_id, "readings": readings});
            self.push(
                self.topics.device_readings(&device.device_id),
                payload.to_string().into_bytes(),
                false,
            );
        }
    }

    fn on_presence(&mut self, p: Presence) {
        if p.moved_away {
            // Another hub holds it and says so; nothing to take back on
            // this hub's shutdown either.
            self.online.remove(&p.device_id);
            return;
        }
        if p.online {
            self.online.insert(p.device_id.clone(), p.clone());
        } else {
            self.online.remove(&p.device_id);
        }
        self.push(
            self.topics.device_status(&p.device_id),
            status_payload(&p),
            true,
        );
    }

    /// Missed presence events: the registry has the truth.
    fn resync_presence(&mut self) {
        let live: HashMap<String, Presence> = self
            .registry
            .live_streams()
            .into_iter()
            .map(|p| (p.device_id.clone(), p))
            .collect();
        let gone: Vec<Presence> = self
            .online
            .values()
            .filter(|p| !live.contains_key(&p.device_id))
            .cloned()
            .collect();
        for mut p in gone {
            p.online = false;
            p.since_ms = crate::domain::now_ms();
            self.on_presence(p);
        }
        for p in live.into_values() {
            self.on_presence(p);
        }
    }

    fn on_command_event(&mut self, rec: &CommandRecord) {
        let payload = json!({
            "command_id": rec.command_id,
            "request_id": self.request_ids.get(&rec.command_id),
            "state": rec.state.as_str(),
            "at_ms": rec.updated_at_ms,
            "detail": rec.detail,
            "result": if rec.result.is_empty() { Value::Null } else {
                serde_json::from_str(&rec.result).unwrap_or_else(|_| Value::String(rec.result.clone()))
            },
        });
        self.push(
            self.topics.command_events(&rec.device_id),
            payload.to_string().into_bytes(),
            false,
        );
    }

    /// A twin change this hub committed (another hub's change is that
    /// hub's to publish): its document, retained.
    fn on_twin(&mut self, event: &TwinEvent) {
        let (view, twin) = (&event.view, &event.view.twin);
        let (topic, payload) = match event.part {
            TwinPart::Desired => (
                self.topics.twin_desired(&view.device_id),
                json!({"version": twin.desired_version, "desired": twin.desired}),
            ),
            TwinPart::Reported => (
                self.topics.twin_reported(&view.device_id),
                json!({"version": twin.reported_version, "reported": twin.reported}),
            ),
            TwinPart::Tags => return,
        };
        self.push(topic, payload.to_string().into_bytes(), true);
    }

    /// A message on the commands topic: into the same command path as gRPC,
    /// or a reason on the errors topic.
    async fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if !self.settings.commands {
            // Not subscribed; a broker's stored session may still deliver.
            return;
        }
        let request_id = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
            v.get("request_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let handled = if self.topics.device_of_twin_set_topic(topic).is_some() {
            self.desired_from_mqtt(topic, payload).await
        } else {
            self.command_from_mqtt(topic, payload).await
        };
        if let Err(reason) = handled {
            HubMetrics::add(&self.metrics.mqtt_bad_messages, 1);
            tracing::warn!(topic, %reason, "bad MQTT command");
            let error = json!({"error": reason, "topic": topic, "request_id": request_id});
            self.push(self.topics.errors(), error.to_string().into_bytes(), false);
        }
    }

    /// The device an incoming message's topic names (None: not one of the
    /// door's topics), with its payload within `mqtt.max_payload_bytes`.
    fn device_of(&self, named: Option<&str>, payload: &[u8]) -> Result<DeviceId, String> {
        let device = named.ok_or_else(|| "not a topic this door takes".to_owned())?;
        let device = DeviceId::parse(device).map_err(|e| e.to_string())?;
        if payload.len() > self.settings.max_payload_bytes {
            return Err(format!(
                "payload of {} bytes is over the limit of {} bytes",
                payload.len(),
                self.settings.max_payload_bytes
            ));
        }
        Ok(device)
    }

    /// `{"desired": {merge patch}, "if_version": n}` on a device's
    /// `twin/desired/set`: the gRPC path of a desired change.
    async fn desired_from_mqtt(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let device = self.device_of(self.topics.device_of_twin_set_topic(topic), payload)?;
        let change: MqttDesired =
            serde_json::from_slice(payload).map_err(|e| format!("not a desired change: {e}"))?;
        let view = self
            .ops
            .update_desired(
                device.as_str(),
                &change.desired.to_string(),
                change.if_version,
            )
            .await
            .map_err(|e| e.public_message())?;
        tracing::info!(by = "mqtt", device_id = ?view.device_id,
            version = view.twin.desired_version, "desired state changed (mqtt)");
        Ok(())
    }

    async fn command_from_mqtt(&mut self, topic: &str, payload: &[u8]) -> Result<(), String> {
        let device = self.device_of(self.topics.device_of_command_topic(topic), payload)?;
        let cmd: MqttCommand =
            serde_json::from_slice(payload).map_err(|e| format!("not a command: {e}"))?;
        let params = match cmd.params {
            None | Some(Value::Null) => String::new(),
            Some(Value::Object(map)) => Value::Object(map).to_string(),
            Some(_) => return Err("params must be a JSON object".into()),
        };
        // The range is the core's rule (commands::send); only the number
        // itself is checked here.
        let ttl = match cmd.ttl_s {
            None => None,
            Some(s) => Some(
                Duration::try_from_secs_f64(s)
                    .map_err(|_| "ttl_s must be a number of seconds".to_owned())?,
            ),
        };
        let rec = self
            .ops
            .send_command(device.as_str().to_owned(), cmd.name, params, ttl)
            .await
            .map_err(|e| e.public_message())?;
        tracing::info!(by = "mqtt", command_id = rec.command_id, device_id = ?rec.device_id,
            name = ?rec.name, "command sent (mqtt)");
        if let Some(request_id) = cmd.request_id {
            if self.request_order.len() >= REMEMBERED_REQUESTS
                && let Some(old) = self.request_order.pop_front()
            {
                self.request_ids.remove(&old);
            }
            self.request_order.push_back(rec.command_id.clone());
            self.request_ids.insert(rec.command_id, request_id);
        }
        Ok(())
    }
}

fn status_payload(p: &Presence) -> Vec<u8> {
    json!({"online": p.online, "since": crate::domain::rfc3339_ms(p.since_ms), "firmware": p.firmware})
        .to_string()
        .into_bytes()
}

/// Drives the rumqttc event loop; reconnects with backoff (100 ms to 5 s).
async fn poll_events(
    mut eventloop: rumqttc::EventLoop,
    link: mpsc::Sender<Link>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = stop.cancelled() => return,
        };
        let report = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                Some(Link::Connected)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => Some(Link::Message {
                topic: p.topic,
                payload: p.payload,
            }),
            Ok(_) => None,
            Err(e) => {
                if link.send(Link::Disconnected(e.to_string())).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                None
            }
        };
        if let Some(report) = report
            && link.send(report).await.is_err()
        {
            return;
        }
    }
}
