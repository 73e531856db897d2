//! Device management, the one core behind every door that offers it:
//! individual enrollment (a new random token, shown once, stored as its
//! SHA-256), token rotation and removal. Writes go through the ingest
//! writer, the readings database's only writer.

use std::collections::BTreeMap;

use crate::auth::{new_device_token, token_hash};
use crate::domain::{DeviceHello, DeviceId, DeviceIdError, HelloError};
use crate::ingest::{CredentialChange, IngestError, IngestQueue};
use crate::registry::{EndReason, SessionRegistry};

#[derive(Debug, thiserror::Error)]
pub enum DeviceAdminError {
    #[error(transparent)]
    BadId(#[from] DeviceIdError),
    #[error(transparent)]
    BadLabels(#[from] HelloError),
    #[error("unknown device {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

/// Adds a device (or re-adds one) and returns its new token. A stream the
/// device already has (on its old credentials) is ended.
pub async fn add(
    ingest: &IngestQueue,
    registry: &SessionRegistry,
    device_id: &str,
    labels: BTreeMap<String, String>,
) -> Result<String, DeviceAdminError> {
    let id = DeviceId::parse(device_id)?;
    let hello = DeviceHello::new(id.clone(), String::new(), labels, "")?;
    let token = new_device_token();
    ingest
        .change_credentials(CredentialChange::Enroll {
            hello,
            token_sha256: token_hash(&token),
        })
        .await?;
    registry.end(&id, EndReason::CredentialsChanged);
    Ok(token)
}

/// A new token for a device; the old one stops working at once, and a
/// stream that used it is ended.
pub async fn rotate_token(
    ingest: &IngestQueue,
    registry: &SessionRegistry,
    device_id: &str,
) -> Result<String, DeviceAdminError> {
    let id = DeviceId::parse(device_id)?;
    let token = new_device_token();
    let found = ingest
        .change_credentials(CredentialChange::Rotate {
            device_id: id.clone(),
            token_sha256: token_hash(&token),
        })
        .await?;
    if !found {
        return Err(DeviceAdminError::NotFound(device_id.to_owned()));
    }
    registry.end(&id, EndReason::CredentialsChanged);
    Ok(token)
}

/// Removes a device and ends its live stream; whether it had one.
pub async fn remove(
    ingest: &IngestQueue,
    registry: &SessionRegistry,
    device_id: &str,
) -> Result<bool, DeviceAdminError> {
    let id = DeviceId::parse(device_id)?;
    let found = ingest
        .change_credentials(CredentialChange::Remove {
            device_id: id.clone(),
        })
        .await?;
    if !found {
        return Err(DeviceAdminError::NotFound(device_id.to_owned()));
    }
    // After the commit: a reconnect from now on is refused (and a Hello
    // already past its check is refused by the writer).
    Ok(registry.end(&id, EndReason::Removed))
}

/// Pins a device to one client certificate (its SHA-256), or unpins it
/// (None); a stream on another certificate is ended.
pub async fn pin_certificate(
    ingest: &IngestQueue,
    registry: &SessionRegistry,
    device_id: &str,
    sha256: Option<[u8; 32]>,
) -> Result<(), DeviceAdminError> {
    let id = DeviceId::parse(device_id)?;
    let found = ingest
        .change_credentials(CredentialChange::PinCertificate {
            device_id: id.clone(),
            sha256,
        })
        .await?;
    if !found {
        return Err(DeviceAdminError::NotFound(device_id.to_owned()));
    }
    registry.end(&id, EndReason::CredentialsChanged);
    Ok(())
}

/// Refuses a client certificate from now on; whether it was newly revoked,
/// and how many live streams that presented it were ended.
pub async fn revoke_certificate(
    ingest: &IngestQueue,
    registry: &SessionRegistry,
    sha256: [u8; 32],
) -> Result<(bool, u32), DeviceAdminError> {
    let added = ingest
        .change_credentials(CredentialChange::RevokeCertificate { sha256 })
        .await?;
    Ok((added, registry.end_presenting(&sha256)))
}
