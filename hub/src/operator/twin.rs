//! Twins as operators see them: read a twin, patch its desired document,
//! set its tags, watch changes. Every door calls these.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{OpError, Operations, WatchSlot};
use crate::domain::{MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS};
use crate::ingest::{TwinOp, TwinOutcome};
use crate::twin::{TwinEvent, TwinView, doc};

/// Checks tags an operator sets: the bounds devices' labels had (at most
/// [`MAX_LABELS`], keys 1 to [`MAX_LABEL_KEY_LEN`] bytes, values at most
/// [`MAX_LABEL_VALUE_LEN`], no control characters).
pub fn check_tags<'a>(
    tags: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), OpError> {
    let mut n = 0;
    for (key, value) in tags {
        n += 1;
        if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
            return Err(OpError::Invalid(format!(
                "a tag key is 1 to {MAX_LABEL_KEY_LEN} bytes"
            )));
        }
        if value.len() > MAX_LABEL_VALUE_LEN {
            return Err(OpError::Invalid(format!(
                "the value of tag {key:?} is longer than {MAX_LABEL_VALUE_LEN} bytes"
            )));
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            return Err(OpError::Invalid(format!(
                "tag {:?} holds a control character",
                key.escape_debug().to_string()
            )));
        }
    }
    if n > MAX_LABELS {
        return Err(OpError::Invalid(format!(
            "a device has at most {MAX_LABELS} tags"
        )));
    }
    Ok(())
}

impl Operations {
    /// A device's twin, with its delta and metadata.
    pub async fn get_twin(&self, device_id: &str) -> Result<TwinView, OpError> {
        if device_id.is_empty() {
            return Err(OpError::Invalid("device_id is required".into()));
        }
        self.store
            .twin(device_id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("unknown device {device_id:?}")))
    }

    /// Applies a merge patch to a device's desired document (committed
    /// before this returns; the device gets it at once if it is online,
    /// else after its next Hello). With `if_version`, only if that is the
    /// desired version now: else [`OpError::Precondition`].
    pub async fn update_desired(
        &self,
        device_id: &str,
        patch_json: &str,
        if_version: Option<u64>,
    ) -> Result<TwinView, OpError> {
        let patch = doc::parse_patch(patch_json, &self.twin_limits)
            .map_err(|e| OpError::Invalid(format!("desired patch: {e}")))?;
        let device = self.device(device_id).await?;
        let op = TwinOp::Desired {
            device: device.key,
            patch,
            if_version,
        };
        self.change_twin(device_id, op).await
    }

    /// Applies one merge patch to the desired document of every device
    /// `selector` matches (the rules of [`Operations::selector_targets`]);
    /// each device's result, in id order. A patch the limits refuse is
    /// refused before any device is changed. The changes run on the hub's
    /// tracker: a caller that goes away midway does not leave an arbitrary
    /// subset changed.
    pub async fn update_desired_to_selector(
        self: &Arc<Self>,
        selector: &super::DeviceFilter,
        patch_json: String,
    ) -> Result<Vec<(String, Result<TwinView, OpError>)>, OpError> {
        doc::parse_patch(&patch_json, &self.twin_limits)
            .map_err(|e| OpError::Invalid(format!("desired patch: {e}")))?;
        let targets = self.selector_targets(selector).await?;
        let ops = Arc::clone(self);
        let changing = self.tracker.spawn(async move {
            let mut changed = Vec::with_capacity(targets.len());
            for device_id in targets {
                let result = ops.update_desired(&device_id, &patch_json, None).await;
                changed.push((device_id, result));
            }
            changed
        });
        changing.await.map_err(|e| {
            tracing::error!(error = %e, "changing desired state by selector failed");
            OpError::Internal("the hub failed while changing; see its log".into())
        })
    }

    /// Sets and removes a device's tags (operator-owned: selectors match
    /// on them).
    pub async fn update_tags(
        &self,
        device_id: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<TwinView, OpError> {
        check_tags(&set)?;
        if set.is_empty() && remove.is_empty() {
            return Err(OpError::Invalid("name a tag to set or remove".into()));
        }
        if let Some(both) = remove.iter().find(|k| set.contains_key(*k)) {
            return Err(OpError::Invalid(format!(
                "tag {both:?} is both set and removed"
            )));
        }
        let device = self.device(device_id).await?;
        let op = TwinOp::Tags {
            device: device.key,
            set,
            remove,
        };
        self.change_twin(device_id, op).await
    }

    async fn change_twin(&self, device_id: &str, op: TwinOp) -> Result<TwinView, OpError> {
        let outcome = self.ingest.change_twin(op).await.map_err(|e| {
            tracing::warn!(error = %e, "a twin change failed");
            OpError::Unavailable(format!("the change was not stored: {e}; try again"))
        })?;
        match outcome {
            TwinOutcome::Done(view) => Ok(Arc::unwrap_or_clone(view)),
            TwinOutcome::Gone => Err(OpError::NotFound(format!("unknown device {device_id:?}"))),
            TwinOutcome::Stale { current } => Err(OpError::Precondition(format!(
                "the desired document is at version {current}, not the one given (if_version)"
            ))),
            TwinOutcome::Invalid(why) => Err(OpError::Invalid(why)),
        }
    }

    /// Committed twin changes from now on (this hub's, and on PostgreSQL
    /// the other hubs'), of one device or all, for the holder of `_slot`;
    /// with a device, its twin now too (read after the watch began, so no
    /// change falls between). NOT_FOUND for an unknown device.
    pub async fn watch_twin(
        &self,
        _slot: &WatchSlot,
        device_id: Option<&str>,
    ) -> Result<(Option<TwinView>, TwinWatch), OpError> {
        let watch = TwinWatch {
            events: self.twins.subscribe(),
            shutdown: self.shutdown.clone(),
            device: device_id.map(str::to_owned),
        };
        let now = match device_id {
            Some(id) => Some(self.get_twin(id).await?),
            None => None,
        };
        Ok((now, watch))
    }

    /// Devices whose twin's delta is not empty.
    pub async fn out_of_sync_count(&self) -> Result<u64, OpError> {
        Ok(self.store.out_of_sync_count().await?)
    }
}

/// What a twin watcher is told next.
#[derive(Debug, Clone)]
pub enum TwinWatchEvent {
    Change(TwinEvent),
    /// Changes (of all devices) it missed by falling behind.
    Missed(u64),
}

/// Committed twin changes, of one device or all.
pub struct TwinWatch {
    events: broadcast::Receiver<TwinEvent>,
    shutdown: CancellationToken,
    device: Option<String>,
}

impl TwinWatch {
    /// The next change; None once the hub shuts down.
    pub async fn next(&mut self) -> Option<TwinWatchEvent> {
        loop {
            let received = tokio::select! {
                received = self.events.recv() => received,
                _ = self.shutdown.cancelled() => return None,
            };
            match received {
                Ok(event) => {
                    if self
                        .device
                        .as_deref()
                        .is_none_or(|want| want == event.view.device_id)
                    {
                        return Some(TwinWatchEvent::Change(event));
                    }
                }
                Err(RecvError::Lagged(n)) => return Some(TwinWatchEvent::Missed(n)),
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_keep_the_bounds_labels_had() {
        let ok: BTreeMap<String, String> = [("site".into(), "plant-7".into())].into();
        assert!(check_tags(&ok).is_ok());
        let empty_key: BTreeMap<String, String> = [(String::new(), "x".into())].into();
        assert!(check_tags(&empty_key).is_err());
        let long_value: BTreeMap<String, String> = [("k".into(), "v".repeat(257))].into();
        assert!(check_tags(&long_value).is_err());
        let control: BTreeMap<String, String> = [("k".into(), "a\u{1b}".into())].into();
        assert!(check_tags(&control).is_err());
        let many: BTreeMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check_tags(&many).is_err());
    }
}
