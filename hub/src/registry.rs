//! Which device has a live stream: one per device, a newer one takes over.
//! Every change is published as a [`Presence`] event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::domain::{DeviceId, Presence, now_ms};

struct LiveStream {
    id: u64,
    /// The device's session epoch when this stream registered.
    epoch: u64,
    since_ms: i64,
    firmware: String,
    superseded: CancellationToken,
    ended_by: Arc<AtomicU8>,
    /// The SHA-256 of the client certificate it presented (mTLS).
    certificate: Option<[u8; 32]>,
}

/// Why a live stream was told to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// A newer stream of the same device took over.
    Superseded,
    /// An operator removed the device.
    Removed,
    /// An operator changed the device's credentials (rotated or re-added):
    /// the stream authenticated with the old ones.
    CredentialsChanged,
    /// The device connected to another hub (on a shared PostgreSQL database).
    MovedAway,
}

impl EndReason {
    fn from_u8(raw: u8) -> Self {
        // Superseded is 0, what a stream's cell starts as.
        match raw {
            1 => EndReason::Removed,
            2 => EndReason::CredentialsChanged,
            3 => EndReason::MovedAway,
            _ => EndReason::Superseded,
        }
    }
}

pub struct SessionRegistry {
    live: Mutex<HashMap<DeviceId, LiveStream>>,
    presence: broadcast::Sender<Presence>,
    /// The newest epoch other hubs claimed each device with (bounded): a
    /// stream of this hub registered with an older one, whose claim comes
    /// after the notice, is refused at once.
    claimed_elsewhere: Mutex<HashMap<DeviceId, u64>>,
}

/// Devices whose claims by other hubs are remembered, at most.
const MAX_REMEMBERED_CLAIMS: usize = 100_000;

/// Held by a session while it is the device's live stream; dropping it
/// unregisters the stream unless a newer one took over already.
pub struct StreamClaim {
    registry: Arc<SessionRegistry>,
    device: DeviceId,
    id: u64,
    /// Cancelled when a newer stream of the same device takes over, or an
    /// operator ends it ([`StreamClaim::end_reason`] says which).
    pub superseded: CancellationToken,
    ended_by: Arc<AtomicU8>,
}

impl SessionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            live: Mutex::default(),
            presence: broadcast::channel(1024).0,
            claimed_elsewhere: Mutex::default(),
        })
    }

    /// Presence changes from now on (a lagging receiver can re-read
    /// [`SessionRegistry::live_streams`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Presence> {
        self.presence.subscribe()
    }

    /// Every live stream as an online Presence.
    pub fn live_streams(&self) -> Vec<Presence> {
        self.lock()
            .iter()
            .map(|(d, s)| Presence {
                device_id: d.as_str().to_owned(),
                online: true,
                moved_away: false,
                epoch: s.epoch,
                since_ms: s.since_ms,
                firmware: s.firmware.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, LiveStream>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes stream `id` the device's live one; an older stream is told to
    /// end (its `superseded` token is cancelled). Stream ids follow the
    /// order in which the writer registered the Hellos, so of two streams of
    /// one device the later Hello wins, whichever claims first; a claim by
    /// an older stream than the live one is refused (None).
    /// `certificate`: the SHA-256 of the client certificate the stream
    /// presented, so revoking it ends the stream (set with the claim: a
    /// revocation cannot fall in between).
    pub fn claim(
        self: &Arc<Self>,
        device: &DeviceId,
        id: u64,
        epoch: u64,
        now_ms: i64,
        firmware: &str,
        certificate: Option<[u8; 32]>,
    ) -> Option<StreamClaim> {
        let superseded = CancellationToken::new();
        let ended_by = Arc::new(AtomicU8::new(0));
        let elsewhere = self
            .claimed_elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .copied();
        if elsewhere.is_some_and(|newer| newer > epoch) {
            return None;
        }
        let previous = {
            let mut live = self.lock();
            if live.get(device).is_some_and(|s| s.id > id) {
                return None;
            }
            let previous = live.insert(
                device.clone(),
                LiveStream {
                    id,
                    epoch,
                    since_ms: now_ms,
                    firmware: firmware.to_owned(),
                    superseded: superseded.clone(),
                    ended_by: Arc::clone(&ended_by),
                    certificate,
                },
            );
            // Sent under the lock, so events of one device keep their order.
            let _ = self.presence.send(Presence {
                device_id: device.as_str().to_owned(),
                online: true,
                moved_away: false,
                epoch,
                since_ms: now_ms,
                firmware: firmware.to_owned(),
            });
            previous
        };
        if let Some(old) = previous {
            old.superseded.cancel();
        }
        Some(StreamClaim {
            registry: Arc::clone(self),
            device: device.clone(),
            id,
            superseded,
            ended_by,
        })
    }

    /// Ends the device's live stream for `reason` (an operator's doing);
    /// whether it had one.
    pub fn end(&self, device: &DeviceId, reason: EndReason) -> bool {
        let live = self.lock();
        match live.get(device) {
            Some(stream) => {
                stream.ended_by.store(reason as u8, Ordering::Relaxed);
                stream.superseded.cancel();
                true
            }
            None => false,
        }
    }

    /// Ends the device's live stream if it registered before session
    /// `epoch` (another hub claimed the device with it); whether it did.
    pub fn end_if_older(&self, device: &DeviceId, epoch: u64, reason: EndReason) -> bool {
        {
            let mut heard = self
                .claimed_elsewhere
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if heard.len() >= MAX_REMEMBERED_CLAIMS {
                heard.clear();
            }
            let newest = heard.entry(device.clone()).or_default();
            *newest = (*newest).max(epoch);
        }
        let live = self.lock();
        match live.get(device) {
            // One an operator ended already keeps its reason.
            Some(stream) if stream.epoch < epoch && !stream.superseded.is_cancelled() => {
                stream.ended_by.store(reason as u8, Ordering::Relaxed);
                stream.superseded.cancel();
                true
            }
            _ => false,
        }
    }

    /// Ends every live stream that presented this client certificate (it
    /// was revoked); how many.
    pub fn end_presenting(&self, certificate: &[u8; 32]) -> u32 {
        let live = self.lock();
        let mut ended = 0;
        for stream in live.values() {
            if stream.certificate.as_ref() == Some(certificate) {
                stream
                    .ended_by
                    .store(EndReason::CredentialsChanged as u8, Ordering::Relaxed);
                stream.superseded.cancel();
                ended += 1;
            }
        }
        ended
    }

    /// Devices with a live stream.
    pub fn live_count(&self) -> usize {
        self.lock().len()
    }

    pub fn is_live(&self, device: &DeviceId) -> bool {
        self.lock().contains_key(device)
    }

    /// Live devices and since when (ms since the epoch).
    pub fn online(&self) -> HashMap<String, i64> {
        self.lock()
            .iter()
            .map(|(d, s)| (d.as_str().to_owned(), s.since_ms))
            .collect()
    }
}

/// Why a stream was told to end, as its tasks read it.
#[derive(Clone)]
pub struct EndProbe {
    ended_by: Arc<AtomicU8>,
    superseded: CancellationToken,
    moves: bool,
}

impl EndProbe {
    /// Why the stream's batch was fenced (its epoch is no longer the
    /// device's): what ended it here; when nothing here has said yet,
    /// another hub's claim whose notice has not come (if devices can move)
    /// or an operator's change whose end has not come (a local one bumped
    /// the epoch).
    /// Waits (at most `within`) until something here says why the stream
    /// ends: a takeover's claim comes a moment after the writer fenced the
    /// old stream's batch, an operator's end a moment after the commit.
    pub async fn settled(&self, within: std::time::Duration) {
        let said = |p: &Self| {
            p.superseded.is_cancelled()
                || EndReason::from_u8(p.ended_by.load(Ordering::Relaxed)) != EndReason::Superseded
        };
        if !said(self) {
            let _ = tokio::time::timeout(within, self.superseded.cancelled()).await;
        }
    }

    pub fn fenced_because(&self) -> EndReason {
        match EndReason::from_u8(self.ended_by.load(Ordering::Relaxed)) {
            EndReason::Superseded if !self.superseded.is_cancelled() => {
                if self.moves {
                    EndReason::MovedAway
                } else {
                    EndReason::CredentialsChanged
                }
            }
            reason => reason,
        }
    }
}

impl StreamClaim {
    /// The stream ends because another hub claimed its device (its batch
    /// was fenced): no offline event, the other hub said it is online. An
    /// operator's reason, set already, stays.
    pub fn moved_away(&self) {
        let _ = self.ended_by.compare_exchange(
            EndReason::Superseded as u8,
            EndReason::MovedAway as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// How the stream's tasks read why it ended; `moves`: whether another
    /// hub may claim the device (several hubs on PostgreSQL).
    pub fn probe(&self, moves: bool) -> EndProbe {
        EndProbe {
            ended_by: Arc::clone(&self.ended_by),
            superseded: self.superseded.clone(),
            moves,
        }
    }

    /// Unique per stream for the life of the hub.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Why the stream was told to end (a takeover unless an operator did it).
    pub fn end_reason(&self) -> EndReason {
        EndReason::from_u8(self.ended_by.load(Ordering::Relaxed))
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        let mut live = self.registry.lock();
        if live.get(&self.device).is_some_and(|s| s.id == self.id)
            && let Some(stream) = live.remove(&self.device)
        {
            let _ = self.registry.presence.send(Presence {
                device_id: self.device.as_str().to_owned(),
                online: false,
                // A device that moved to another hub is not offline: that
                // hub said it is online.
                moved_away: self.end_reason() == EndReason::MovedAway,
                epoch: stream.epoch,
                since_ms: now_ms(),
                firmware: stream.firmware,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_stream_takes_over_and_old_drop_keeps_it() {
        let reg = SessionRegistry::new();
        let mut events = reg.subscribe();
        let dev = DeviceId::parse("d1").unwrap();
        let first = reg.claim(&dev, 1, 1, 1, "fw1", None).unwrap();
        assert!(!first.superseded.is_cancelled());
        let second = reg.claim(&dev, 2, 2, 2, "fw2", None).unwrap();
        assert!(first.superseded.is_cancelled());
        drop(first);
        assert_eq!(reg.online().get("d1"), Some(&2));
        assert_eq!(reg.live_streams()[0].firmware, "fw2");
        drop(second);
        assert!(reg.online().is_empty());
        let seen: Vec<(bool, String)> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|p| (p.online, p.firmware))
            .collect();
        assert_eq!(
            seen,
            vec![
                (true, "fw1".into()),
                (true, "fw2".into()),
                (false, "fw2".into())
            ],
            "a takeover is one more online, never an offline in between"
        );
    }

    #[test]
    fn an_older_stream_claiming_late_is_refused() {
        let reg = SessionRegistry::new();
        let dev = DeviceId::parse("d1").unwrap();
        let newer = reg.claim(&dev, 7, 7, 1, "new", None).unwrap();
        assert!(reg.claim(&dev, 6, 6, 2, "old", None).is_none());
        assert!(!newer.superseded.is_cancelled());
        assert_eq!(reg.live_streams()[0].firmware, "new");
    }
}
