//! Which device has a live stream: one per device, a newer one takes over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::domain::DeviceId;

struct LiveStream {
    id: u64,
    since_ms: i64,
    superseded: CancellationToken,
}

#[derive(Default)]
pub struct SessionRegistry {
    live: Mutex<HashMap<DeviceId, LiveStream>>,
    next_id: AtomicU64,
}

/// Held by a session while it is the device's live stream; dropping it
/// unregisters the stream unless a newer one took over already.
pub struct StreamClaim {
    registry: Arc<SessionRegistry>,
    device: DeviceId,
    id: u64,
    /// Cancelled when a newer stream of the same device takes over.
    pub superseded: CancellationToken,
}

impl SessionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DeviceId, LiveStream>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes this stream the device's live one; an older stream is told to
    /// end (its `superseded` token is cancelled).
    pub fn claim(self: &Arc<Self>, device: &DeviceId, now_ms: i64) -> StreamClaim {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let superseded = CancellationToken::new();
        let previous = self.lock().insert(
            device.clone(),
            LiveStream {
                id,
                since_ms: now_ms,
                superseded: superseded.clone(),
            },
        );
        if let Some(old) = previous {
            old.superseded.cancel();
        }
        StreamClaim {
            registry: Arc::clone(self),
            device: device.clone(),
            id,
            superseded,
        }
    }

    /// Live devices and since when (ms since the epoch).
    pub fn online(&self) -> HashMap<String, i64> {
        self.lock()
            .iter()
            .map(|(d, s)| (d.as_str().to_owned(), s.since_ms))
            .collect()
    }

    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.lock().contains_key(device)
    }
}

impl StreamClaim {
    /// Unique per stream for the life of the hub.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for StreamClaim {
    fn drop(&mut self) {
        let mut live = self.registry.lock();
        if live.get(&self.device).is_some_and(|s| s.id == self.id) {
            live.remove(&self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_stream_takes_over_and_old_drop_keeps_it() {
        let reg = SessionRegistry::new();
        let dev = DeviceId::parse("d1").unwrap();
        let first = reg.claim(&dev, 1);
        assert!(!first.superseded.is_cancelled());
        let second = reg.claim(&dev, 2);
        assert!(first.superseded.is_cancelled());
        drop(first);
        assert_eq!(reg.online().get("d1"), Some(&2));
        drop(second);
        assert!(!reg.is_online(&dev));
    }
}
