//! Several hubs on one PostgreSQL database (`storage.backend = "postgres"`).
//!
//! PostgreSQL does the coordination; the hubs never talk to each other:
//! - every accepted Hello claims its device: the device's session epoch
//!   goes up by one in the writer's transaction, and the claim is announced
//!   with NOTIFY ([`crate::store::CLAIMS_CHANNEL`]) when it commits;
//! - [`listen`] ends this hub's stream of a device another hub claimed
//!   (ABORTED), so the device's old stream does not linger, and passes
//!   other hubs' command changes to the commands task (`crate::commands`);
//! - fencing does not depend on the notice: a hub's writer locks the rows
//!   of the devices it commits for and writes a batch only while its
//!   session's epoch is still the device's (`ingest::writer`).
//!
//! ARCHITECTURE.md ("Several hubs") describes the protocol and its failure
//! cases.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::commands::Commands;
use crate::domain::DeviceId;
use crate::registry::SessionRegistry;
use crate::store::{CLAIMS_CHANNEL, Claim, Store, StoreError};

/// A hub's id for the life of its process, written into the devices it
/// claims: no spaces (it is a field of the claim notice).
pub fn new_hub_id() -> Arc<str> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Arc::from(&id[..12])
}

/// Until `stop`: ends this hub's streams of devices other hubs claim, and
/// hands the commands task every command another hub changed. Returns None
/// on SQLite (one hub: nothing to listen for).
pub async fn listen(
    store: &Store,
    hub_id: Arc<str>,
    registry: Arc<SessionRegistry>,
    commands: Commands,
    stop: CancellationToken,
) -> Result<Option<impl Future<Output = ()> + use<>>, StoreError> {
    let Some(mut listener) = store.listen_cluster().await? else {
        return Ok(None);
    };
    Ok(Some(async move {
        loop {
            let notice = tokio::select! {
                _ = stop.cancelled() => break,
                notice = listener.recv() => notice,
            };
            match notice {
                Ok(notice) if notice.channel() == CLAIMS_CHANNEL => {
                    let Some(claim) = Claim::parse(notice.payload()) else {
                        tracing::warn!(
                            payload = notice.payload(),
                            "a claim notice that does not parse"
                        );
                        continue;
                    };
                    if claim.hub == *hub_id {
                        continue;
                    }
                    if let Ok(device) = DeviceId::parse(&claim.device_id)
                        && registry.end_if_older(&device, claim.epoch)
                    {
                        tracing::debug!(device_id = %device, by = claim.hub, "device moved to another hub");
                    }
                }
                Ok(notice) => {
                    // `hub command_id` on COMMANDS_CHANNEL.
                    match notice.payload().split_once(' ') {
                        Some((hub, _)) if hub == &*hub_id => {}
                        Some((_, command_id)) => commands.refresh(command_id.to_owned()).await,
                        None => {
                            tracing::warn!(
                                payload = notice.payload(),
                                "a command notice that does not parse"
                            )
                        }
                    }
                }
                Err(e) => {
                    // The listener reconnects by itself on its next recv;
                    // notices sent meanwhile are lost: fencing covers the
                    // claims, and a device's Hello reloads its commands.
                    tracing::warn!(error = %e, "listening for other hubs failed; trying again");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }))
}
