//! The device twin: per device, operator-owned `tags`, a `desired`
//! document written by operators and a `reported` one written by the
//! device, each with a version that only grows.
//!
//! - [`doc`] and [`filter`] are plain code (merge patches, limits, the
//!   delta; the fleet filter language), like `domain`.
//! - Every change is written by the ingest writer, in its group commit:
//!   desired and tag changes come from the operator core, reported patches
//!   from device streams (acked after the commit, like readings).
//! - After each commit the writer hands [`TwinHub`] what changed: a device
//!   stream of this hub gets its desired change ([`DesiredFeed`]), watchers
//!   get a [`TwinEvent`]. On PostgreSQL the change is also announced to the
//!   other hubs (`store::TWINS_CHANNEL`), whose `cluster` listener reads the
//!   twin and hands it to their own [`TwinHub`].

pub mod doc;
pub mod filter;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::{broadcast, watch};

pub use doc::{Doc, DocError, DocLimits};

/// A device's twin documents as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Twin {
    pub desired: Doc,
    pub desired_meta: Doc,
    pub desired_version: u64,
    pub reported: Doc,
    pub reported_meta: Doc,
    pub reported_version: u64,
    /// The highest ReportedPatch seq committed.
    pub reported_seq: u64,
}

impl Twin {
    pub fn delta(&self) -> Doc {
        doc::delta(&self.desired, &self.reported)
    }

    pub fn in_sync(&self) -> bool {
        self.delta().is_empty()
    }

    /// `{"desired": …, "reported": …}`: each key's last update.
    pub fn metadata(&self) -> Value {
        serde_json::json!({
            "desired": self.desired_meta,
            "reported": self.reported_meta,
        })
    }
}

/// A twin with its device, as operators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinView {
    pub device_id: String,
    pub tags: BTreeMap<String, String>,
    pub twin: Twin,
}

/// Which part of a twin a change touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwinPart {
    Desired,
    Reported,
    Tags,
}

impl TwinPart {
    pub fn as_str(self) -> &'static str {
        match self {
            TwinPart::Desired => "desired",
            TwinPart::Reported => "reported",
            TwinPart::Tags => "tags",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [TwinPart::Desired, TwinPart::Reported, TwinPart::Tags]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A committed change, with the twin after it.
#[derive(Debug, Clone)]
pub struct TwinEvent {
    pub part: TwinPart,
    pub view: Arc<TwinView>,
    /// Committed by this hub (not read after another hub's notice).
    pub local: bool,
}

/// A desired version for a device's stream: the patch from the version
/// before (None when this hub does not know it: another hub made the
/// change) and the whole document.
#[derive(Debug)]
pub struct DesiredUpdate {
    pub version: u64,
    pub patch: Option<Arc<str>>,
    pub full: Arc<str>,
}

type Slot = watch::Sender<Option<Arc<DesiredUpdate>>>;

/// Where committed twin changes go: the streams of this hub's devices
/// (the latest desired version per device, so a stream that is slow to
/// send never holds more than one) and the watchers.
pub struct TwinHub {
    feeds: Mutex<HashMap<String, Slot>>,
    /// Every change (watchers).
    events: broadcast::Sender<TwinEvent>,
    /// This hub's own changes only (the MQTT bridge publishes those).
    local: broadcast::Sender<TwinEvent>,
}

impl TwinHub {
    /// `capacity`: changes a watcher may fall behind by before it skips.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            feeds: Mutex::new(HashMap::new()),
            events: broadcast::channel(capacity.max(1)).0,
            local: broadcast::channel(capacity.max(1)).0,
        })
    }

    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A panic while holding it leaves a map of senders, nothing torn.
        self.feeds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows a device's desired versions from now on. A stream takes
    /// this before its registration reads the twin, so no change that
    /// commits after that read can pass it by.
    pub fn follow(self: &Arc<Self>, device_id: &str) -> DesiredFeed {
        let rx = self
            .feeds()
            .entry(device_id.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        DesiredFeed {
            hub: Arc::clone(self),
            device_id: device_id.to_owned(),
            rx: Some(rx),
        }
    }

    /// A committed change: to the device's stream on this hub (desired
    /// only; an older version than one already handed over is ignored)
    /// and to the watchers.
    pub fn committed(
        &self,
        part: TwinPart,
        view: Arc<TwinView>,
        patch: Option<Arc<str>>,
        local: bool,
    ) {
        if part == TwinPart::Desired
            && let Some(slot) = self.feeds().get(&view.device_id)
        {
            let version = view.twin.desired_version;
            slot.send_if_modified(|latest| {
                if latest.as_ref().is_some_and(|l| l.version >= version) {
                    return false;
                }
                *latest = Some(Arc::new(DesiredUpdate {
                    version,
                    patch: patch.clone(),
                    full: Arc::from(doc::encode(&view.twin.desired)),
                }));
                true
            });
        }
        let event = TwinEvent { part, view, local };
        if local && self.local.receiver_count() > 0 {
            let _ = self.local.send(event.clone());
        }
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }

    /// Every committed change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TwinEvent> {
        self.events.subscribe()
    }

    /// This hub's own committed changes from now on.
    pub fn subscribe_local(&self) -> broadcast::Receiver<TwinEvent> {
        self.local.subscribe()
    }

    /// Whether another hub's change of `part` of a device is of use here:
    /// a desired change for a stream of the device on this hub, or any
    /// change while someone watches (else it is not worth reading).
    pub fn wants(&self, part: TwinPart, device_id: &str) -> bool {
        self.events.receiver_count() > 0
            || (part == TwinPart::Desired && self.feeds().contains_key(device_id))
    }

    /// Devices followed right now (streams of twin-aware devices).
    pub fn followed(&self) -> usize {
        self.feeds().len()
    }
}

/// A stream's view of its device's desired versions; let go on drop.
pub struct DesiredFeed {
    hub: Arc<TwinHub>,
    device_id: String,
    rx: Option<watch::Receiver<Option<Arc<DesiredUpdate>>>>,
}

impl DesiredFeed {
    /// The next version handed over since the last call (None once the
    /// hub let go, which it does not while a feed lives).
    pub async fn next(&mut self) -> Option<Arc<DesiredUpdate>> {
        let rx = self.rx.as_mut()?;
        loop {
            rx.changed().await.ok()?;
            if let Some(update) = rx.borrow_and_update().clone() {
                return Some(update);
            }
        }
    }
}

impl Drop for DesiredFeed {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut feeds = self.hub.feeds();
        if feeds
            .get(&self.device_id)
            .is_some_and(|slot| slot.receiver_count() == 0)
        {
            feeds.remove(&self.device_id);
        }
    }
}

/// The `reported.hello` a Hello makes: its firmware and labels.
pub fn hello_doc(firmware: &str, labels: &BTreeMap<String, String>) -> Value {
    serde_json::json!({ "firmware": firmware, "labels": labels })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(device: &str, version: u64) -> Arc<TwinView> {
        let mut twin = Twin {
            desired_version: version,
            ..Twin::default()
        };
        twin.desired.insert("v".into(), Value::from(version));
        Arc::new(TwinView {
            device_id: device.into(),
            tags: BTreeMap::new(),
            twin,
        })
    }

    #[tokio::test]
    async fn a_feed_sees_the_latest_version_and_is_let_go() {
        let hub = TwinHub::new(8);
        let mut feed = hub.follow("d1");
        let mut other = hub.follow("d1");
        hub.committed(
            TwinPart::Desired,
            view("d1", 1),
            Some(Arc::from("{\"v\":1}")),
            true,
        );
        hub.committed(TwinPart::Desired, view("d1", 3), None, true);
        // An older version after a newer one is not news.
        hub.committed(TwinPart::Desired, view("d1", 2), None, true);
        hub.committed(TwinPart::Desired, view("d2", 9), None, true);
        let got = feed.next().await.unwrap();
        assert_eq!(got.version, 3);
        assert!(got.patch.is_none());
        assert_eq!(&*got.full, "{\"v\":3}");
        assert_eq!(other.next().await.unwrap().version, 3);
        assert_eq!(hub.followed(), 1);
        drop(feed);
        assert_eq!(hub.followed(), 1);
        drop(other);
        assert_eq!(hub.followed(), 0);
    }
}
