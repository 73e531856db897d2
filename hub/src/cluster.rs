//! Several hubs on one PostgreSQL database (`storage.backend = "postgres"`).
//!
//! PostgreSQL does the coordination; the hubs never talk to each other:
//! - every accepted Hello claims its device: the device's session epoch
//!   goes up by one in the writer's transaction, and the claim is announced
//!   with NOTIFY ([`crate::store::CLAIMS_CHANNEL`]) when it commits;
//! - [`listen`] ends this hub's stream of a device another hub claimed
//!   (ABORTED), so the device's old stream does not linger, and passes
//!   other hubs' command changes to the commands task (`crate::commands`);
//! - passes other hubs' twin changes ([`crate::store::TWINS_CHANNEL`]) to
//!   this hub's [`TwinHub`]: the twin is read as committed, so a device
//!   stream here gets the desired document and watchers the change;
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
use crate::domain::{DeviceId, now_ms};
use crate::registry::EndReason;
use crate::registry::SessionRegistry;
use crate::store::{
    CLAIMS_CHANNEL, CREDENTIALS_CHANGED, Claim, REVOKED, Store, StoreError, TWINS_CHANNEL,
    TwinNotice,
};
use crate::twin::TwinHub;

pub use crate::domain::HUB_LEASE as LEASE;
/// How often a hub renews its heartbeat (a third of the lease).
const HEARTBEAT: Duration = Duration::from_secs(3);

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
    twins: Arc<TwinHub>,
    stop: CancellationToken,
) -> Result<Option<impl Future<Output = ()> + use<>>, StoreError> {
    let Some(mut listener) = store.listen_cluster().await? else {
        return Ok(None);
    };
    let store = store.clone();
    Ok(Some(async move {
        loop {
            let notice = tokio::select! {
                _ = stop.cancelled() => break,
                notice = listener.recv() => notice,
            };
            match notice {
                Ok(notice) if notice.channel() == CLAIMS_CHANNEL => {
                    if let Some(revoked) = notice.payload().strip_prefix(REVOKED) {
                        on_revoked(revoked, &hub_id, &registry);
                        continue;
                    }
                    let Some(claim) = Claim::parse(notice.payload()) else {
                        tracing::warn!(
                            payload = notice.payload(),
                            "a claim notice that does not parse"
                        );
                        continue;
                    };
                    // A Hello on another hub, or an operator's credential
                    // change through some hub.
                    let (by, reason) = match claim.hub.strip_suffix(CREDENTIALS_CHANGED) {
                        Some(by) => (by, EndReason::CredentialsChanged),
                        None => (claim.hub.as_str(), EndReason::MovedAway),
                    };
                    // This hub's own notices are no news: it ended its own
                    // streams when it made the change (`crate::devices`).
                    if by == &*hub_id {
                        continue;
                    }
                    if let Ok(device) = DeviceId::parse(&claim.device_id)
                        && registry.end_if_older(&device, claim.epoch, reason)
                    {
                        tracing::debug!(device_id = %device, by = claim.hub, "device moved to another hub");
                    }
                }
                Ok(notice) if notice.channel() == TWINS_CHANNEL => {
                    match TwinNotice::parse(notice.payload()) {
                        Some(n) if n.hub == *hub_id => {}
                        Some(n) => on_twin(&store, &twins, n).await,
                        None => tracing::warn!(
                            payload = notice.payload(),
                            "a twin notice that does not parse"
                        ),
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

/// Another hub committed a change of a device's twin: read as it is now
/// and handed to this hub's streams and watchers (a desired change as the
/// whole document: this hub does not know the patch).
async fn on_twin(store: &Store, twins: &TwinHub, notice: TwinNotice) {
    if !twins.wants(notice.part, &notice.device_id) {
        return;
    }
    match store.twin(&notice.device_id).await {
        Ok(Some(view)) => twins.committed(notice.part, Arc::new(view), None, false),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(device_id = notice.device_id, error = %e,
                "cannot read a twin another hub changed; its stream here gets it at its next Hello")
        }
    }
}

/// Another hub revoked a client certificate (`" {hub} {sha256 hex}"`):
/// this hub's streams that presented it end too. The hub that revoked it
/// ended its own.
fn on_revoked(notice: &str, hub_id: &str, registry: &SessionRegistry) {
    let Some((by, sha256)) = notice.trim_start().split_once(' ') else {
        tracing::warn!(notice, "a revocation notice that does not parse");
        return;
    };
    let Some(sha256) = hex::decode(sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    else {
        tracing::warn!(notice, "a revocation notice that does not parse");
        return;
    };
    if by != hub_id {
        let ended = registry.end_presenting(&sha256);
        tracing::info!(by, ended, "a certificate revoked through another hub");
    }
}

/// PostgreSQL: keeps this hub's heartbeat fresh and the devices' presence
/// in the database true (a stream that ends clears its device's
/// `online_since_ms`), until `stop`; then the heartbeat is withdrawn, so
/// whatever this hub still showed online is offline at once. The first
/// heartbeat is written before this returns. None on SQLite.
pub async fn keep_presence(
    store: Store,
    hub_id: Arc<str>,
    registry: Arc<SessionRegistry>,
    stop: CancellationToken,
) -> Result<Option<impl Future<Output = ()> + use<>>, StoreError> {
    if store.backend() != crate::config::Backend::Postgres {
        return Ok(None);
    }
    store.heartbeat(&hub_id, now_ms()).await?;
    // Made ahead here; if it fails now, the writer makes the month with its
    // first block (and this task tries again next month).
    if let Err(e) = store.prepare_partitions(now_ms()).await {
        tracing::warn!(error = %e, "cannot make this month's partitions ahead");
    }
    let mut prepared = crate::store::month_of(now_ms());
    // Hubs gone for a day: their rows are of no use (their devices have
    // been offline since their lease ran out).
    store
        .forget_hubs_before(now_ms().saturating_sub(24 * 3600 * 1000))
        .await?;
    let mut presence = registry.subscribe();
    Ok(Some(async move {
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = beat.tick() => {
                    if let Err(e) = store.heartbeat(&hub_id, now_ms()).await {
                        tracing::warn!(error = %e, "cannot renew this hub's heartbeat");
                    }
                    // A new month: its partition and the next one's, ahead.
                    let month = crate::store::month_of(now_ms());
                    if month != prepared {
                        match store.prepare_partitions(now_ms()).await {
                            Ok(()) => prepared = month,
                            Err(e) => tracing::warn!(error = %e, "cannot make the next months' partitions"),
                        }
                    }
                }
                event = presence.recv() => match event {
                    Ok(p) if !p.online && !p.moved_away => {
                        if let Err(e) = store.went_offline(&hub_id, &p.device_id, p.epoch).await {
                            tracing::warn!(device_id = p.device_id, error = %e, "cannot record a device offline");
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let live: Vec<String> = registry.online().into_keys().collect();
                        if let Err(e) = store.only_online(&hub_id, &live).await {
                            tracing::warn!(error = %e, "cannot resync devices' presence");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        // Gone: every device still shown on this hub is offline now.
        if let Err(e) = store.heartbeat(&hub_id, 0).await {
            tracing::warn!(error = %e, "cannot withdraw this hub's heartbeat");
        }
    }))
}
