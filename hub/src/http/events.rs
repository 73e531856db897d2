//! `GET /api/v1/events`: Server-Sent Events of committed readings, command
//! state changes, presence changes, twin changes and (on request) the
//! hub's counters.
//!
//! One task per stream reads the hub's broadcasts and writes events into a
//! small bounded channel that the response drains. A slow client fills the
//! channel, the task waits, and the broadcasts move on without it: it then
//! tells the client what it missed (`skipped` for readings, `resync` for
//! commands and presence, whose current state the client reads again)
//! instead of holding memory for it. Each stream holds a slot of the
//! hub's live streams (`server.max_watches`, shared with gRPC's watches):
//! past it a stream is refused with 503; every stream ends when the hub
//! shuts down.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use super::api::{CommandJson, empty_as_none};
use super::{ApiError, ApiState};
use crate::domain::{CommittedBatch, Presence};
use crate::operator::alarms::{AlarmWatch, AlarmWatchEvent};
use crate::operator::{
    LiveEvent, ReadingsWatch, STALLED_CLIENT, TwinWatch, TwinWatchEvent, live_readings,
};

/// Events buffered per stream before its task waits for the client.
const STREAM_BUFFER: usize = 16;
/// Readings per `readings` event at most: a large commit is split.
const READINGS_PER_EVENT: usize = 500;

pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new().route("/events", get(events))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventParams {
    /// Only this device's readings, commands and presence.
    #[serde(default, deserialize_with = "empty_as_none")]
    device: Option<String>,
    /// Only this sensor's readings.
    #[serde(default, deserialize_with = "empty_as_none")]
    sensor: Option<String>,
    /// Comma-separated kinds: readings, commands, presence, twin, alarm,
    /// stats (default readings,commands,presence; stats sends the counters
    /// every second, twin each committed twin change, alarm each change of
    /// an alarm).
    #[serde(default, deserialize_with = "empty_as_none")]
    kinds: Option<String>,
}

#[derive(Clone, Copy, Default)]
struct Kinds {
    readings: bool,
    commands: bool,
    presence: bool,
    twin: bool,
    alarm: bool,
    stats: bool,
}

impl Kinds {
    fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
            return Ok(Kinds {
                readings: true,
                commands: true,
                presence: true,
                // Asked for by name, so a stream of older clients is as it was.
                twin: false,
                alarm: false,
                stats: false,
            });
        };
        let mut kinds = Kinds::default();
        for kind in raw.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            match kind {
                "readings" => kinds.readings = true,
                "commands" => kinds.commands = true,
                "presence" => kinds.presence = true,
                "twin" => kinds.twin = true,
                "alarm" => kinds.alarm = true,
                "stats" => kinds.stats = true,
                other => {
                    return Err(ApiError::invalid(format!(
                        "unknown event kind {other:?} (readings, commands, presence, twin, alarm, stats)"
                    )));
                }
            }
        }
        Ok(kinds)
    }
}

/// One committed reading (the `readings` event's `readings`).
#[derive(Serialize, ToSchema)]
pub(super) struct LiveReadingJson<'a> {
    device_id: &'a str,
    sensor: &'a str,
    seq: u64,
    ts_ms: i64,
    value: f64,
}

/// A device's stream came or went (the `presence` event).
#[derive(Serialize, ToSchema)]
pub(super) struct PresenceJson<'a> {
    device_id: &'a str,
    online: bool,
    since_ms: i64,
    firmware: &'a str,
}

/// Live events, as `text/event-stream`. Event names: `readings`
/// (`{"readings": [LiveReadingJson]}`), `skipped` (`{"readings": n}`:
/// committed readings of the whole hub, matching the filter or not, this
/// stream missed while the client was slow; `{"readings": null,
/// "commits": n}` when it fell behind before its first batch),
/// `command` (a command, as `GET /commands/{id}` without history),
/// `presence` (PresenceJson), `twin` (`{"part": "desired" | "reported" |
/// "tags", "twin": TwinJson}`: a committed change and the twin after it),
/// `alarm` (`{"id", "kind": "raised" | "retriggered" | "acknowledged" |
/// "cleared", "at_ms", "alarm"}`: as webhooks get it),
/// `resync` (`{"kind": "commands" | "presence" | "twin" | "alarm"}`: changes were
/// missed; read the current state again) and `stats` (as `GET /stats`).
#[utoipa::path(get, path = "/events", params(EventParams), responses(
    (status = 200, description = "Server-Sent Events", content_type = "text/event-stream"),
    (status = 400, body = super::api::ErrorBody),
    (status = 503, body = super::api::ErrorBody, description = "too many event streams are open")
))]
pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let kinds = Kinds::parse(p.kinds.as_deref())?;
    let (device, sensor) = (p.device, p.sensor);
    let slot = state.ops.watch_slot()?;
    // Subscribe before answering, so nothing committed after the answer
    // is missed.
    let mut readings = kinds.readings.then(|| state.ops.watch_readings(&slot));
    let mut commands = kinds.commands.then(|| state.ops.watch_commands(&slot));
    let mut presence = kinds.presence.then(|| state.ops.watch_presence(&slot));
    let mut twins = match kinds.twin {
        true => Some(state.ops.watch_twin(&slot, None).await?.1),
        false => None,
    };
    let mut alarms = kinds.alarm.then(|| state.ops.watch_alarms(&slot, None));
    let (tx, rx) = mpsc::channel::<Event>(STREAM_BUFFER);
    let shutdown = state.shutdown.clone();
    let ops = Arc::clone(&state.ops);
    let shared = Arc::clone(&state.all_readings);
    state.tracker.spawn(async move {
        let _slot = slot;
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let events: Vec<Event> = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                event = next_readings(&mut readings) => match event {
                    Some(LiveEvent::Batch(batch)) => {
                        let data = if device.is_none() && sensor.is_none() {
                            shared.encode(&batch)
                        } else {
                            readings_data(&batch, device.as_deref(), sensor.as_deref()).into()
                        };
                        data.iter().map(|d| Event::default().event("readings").data(d)).collect()
                    }
                    Some(LiveEvent::Missed { readings: Some(n), .. }) => {
                        vec![json_event("skipped", &serde_json::json!({ "readings": n }))]
                    }
                    Some(LiveEvent::Missed { readings: None, commits }) => {
                        vec![json_event("skipped", &serde_json::json!({
                            "readings": null, "commits": commits
                        }))]
                    }
                    None => return,
                },
                rec = recv(&mut commands) => match rec {
                    Ok(rec) if device.as_ref().is_none_or(|d| *d == rec.device_id) => {
                        vec![json_event("command", &CommandJson::new(rec, None))]
                    }
                    Ok(_) => Vec::new(),
                    Err(RecvError::Lagged(_)) => {
                        vec![json_event("resync", &serde_json::json!({ "kind": "commands" }))]
                    }
                    Err(RecvError::Closed) => return,
                },
                change = recv(&mut presence) => match change {
                    // A move to another hub is that hub's to announce.
                    Ok(p) if !p.moved_away
                        && device.as_ref().is_none_or(|d| *d == p.device_id) => {
                        vec![json_event("presence", &presence_json(&p))]
                    }
                    Ok(_) => Vec::new(),
                    Err(RecvError::Lagged(_)) => {
                        vec![json_event("resync", &serde_json::json!({ "kind": "presence" }))]
                    }
                    Err(RecvError::Closed) => return,
                },
                change = next_twin(&mut twins) => match change {
                    Some(TwinWatchEvent::Change(c)) if device.as_ref().is_none_or(|d| *d == c.view.device_id) => {
                        vec![json_event("twin", &serde_json::json!({
                            "part": c.part.as_str(),
                            "twin": super::twin::TwinJson::new(&c.view),
                        }))]
                    }
                    Some(TwinWatchEvent::Change(_)) => Vec::new(),
                    Some(TwinWatchEvent::Missed(_)) => {
                        vec![json_event("resync", &serde_json::json!({ "kind": "twin" }))]
                    }
                    None => return,
                },
                event = next_alarm(&mut alarms) => match event {
                    Some(AlarmWatchEvent::Event(e)) if device.as_ref().is_none_or(|d| *d == e.alarm.device) => {
                        vec![json_event("alarm", &*e)]
                    }
                    Some(AlarmWatchEvent::Event(_)) => Vec::new(),
                    Some(AlarmWatchEvent::Missed(_)) => {
                        vec![json_event("resync", &serde_json::json!({ "kind": "alarm" }))]
                    }
                    None => return,
                },
                _ = stats_tick.tick(), if kinds.stats => match ops.stats().await {
                    Ok(stats) => vec![json_event("stats", &stats)],
                    Err(e) => {
                        tracing::warn!(error = %e, "stats for an event stream");
                        Vec::new()
                    }
                },
            };
            for event in events {
                // A slow client makes this wait; meanwhile the broadcasts
                // move on, and what is missed is told when it resumes. One
                // that takes nothing for STALLED_CLIENT is dropped.
                let sent = tokio::select! {
                    sent = tokio::time::timeout(STALLED_CLIENT, tx.send(event)) => {
                        matches!(sent, Ok(Ok(())))
                    }
                    _ = shutdown.cancelled() => false,
                };
                if !sent {
                    return;
                }
            }
        }
    });
    let stream = futures_util::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, Infallible>,
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[derive(Serialize)]
struct ReadingsData<'a> {
    readings: &'a [LiveReadingJson<'a>],
}

/// The data of the `readings` events for a batch: the readings a watcher
/// of `device` and `sensor` wants, READINGS_PER_EVENT per event.
fn readings_data(
    batch: &CommittedBatch,
    device: Option<&str>,
    sensor: Option<&str>,
) -> Vec<String> {
    let rows: Vec<LiveReadingJson> = live_readings(batch, device, sensor)
        .map(|r| LiveReadingJson {
            device_id: r.device_id,
            sensor: &r.reading.sensor,
            seq: r.reading.seq,
            ts_ms: r.reading.ts_ms,
            value: r.reading.value,
        })
        .collect();
    rows.chunks(READINGS_PER_EVENT)
        .map(|part| serde_json::to_string(&ReadingsData { readings: part }).unwrap_or_default())
        .collect()
}

/// The `readings` events of the latest batch for every stream without a
/// filter, encoded by the first stream that needs them: twenty open
/// streams cost one encoding per commit, not twenty.
#[derive(Default)]
pub(super) struct AllReadings {
    latest: std::sync::Mutex<Option<(u64, Arc<[String]>)>>,
}

impl AllReadings {
    fn encode(&self, batch: &CommittedBatch) -> Arc<[String]> {
        let cached = |latest: &Option<(u64, Arc<[String]>)>| {
            latest
                .as_ref()
                .filter(|(index, _)| *index == batch.first_index)
                .map(|(_, data)| Arc::clone(data))
        };
        if let Some(data) = cached(&self.latest.lock().unwrap_or_else(|p| p.into_inner())) {
            return data;
        }
        // Encoded outside the lock; two streams may both encode a batch.
        let data: Arc<[String]> = readings_data(batch, None, None).into();
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        if latest
            .as_ref()
            .is_none_or(|(index, _)| *index < batch.first_index)
        {
            *latest = Some((batch.first_index, Arc::clone(&data)));
        }
        data
    }
}

/// The next message of an optional subscription; never ready without one.
async fn next_readings(watch: &mut Option<ReadingsWatch>) -> Option<LiveEvent> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

async fn next_alarm(watch: &mut Option<AlarmWatch>) -> Option<AlarmWatchEvent> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

async fn next_twin(watch: &mut Option<TwinWatch>) -> Option<TwinWatchEvent> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

async fn recv<T: Clone>(
    rx: &mut Option<tokio::sync::broadcast::Receiver<T>>,
) -> Result<T, RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn presence_json(p: &Presence) -> PresenceJson<'_> {
    PresenceJson {
        device_id: &p.device_id,
        online: p.online,
        since_ms: p.since_ms,
        firmware: &p.firmware,
    }
}

fn json_event(name: &str, data: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned()))
}
