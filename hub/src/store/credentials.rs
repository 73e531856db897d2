//! Device credentials for admission, read many to a statement.
//!
//! Every Hello and every line-protocol write reads its device's stored
//! credentials before the writer registers it. One statement per Hello
//! was the ramp's limit: 100,000 devices connecting at once queued for
//! the reader pool's four connections (up to 8 s, and a warning each).
//! [`CredentialReads`] gathers the lookups that arrive while a statement
//! runs and answers them with the next one, up to 256 at a time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::db::{Val, bind_vals, with_pool};
use super::write::{chunks, multi_row_sql};
use super::{Store, StoreError};
use crate::domain::StoredCredentials;

/// Most lookups one statement answers.
const LOOKUP_CHUNK: usize = 256;

/// A device id and the SHA-256 of the certificate it presented, if any.
pub type Lookup = (String, Option<[u8; 32]>);

impl Store {
    /// What is stored of a device's credentials (default: unknown device),
    /// and whether `certificate` (the SHA-256 of the one it presented, if
    /// any) is revoked.
    pub async fn credentials(
        &self,
        external_id: &str,
        certificate: Option<&[u8; 32]>,
    ) -> Result<StoredCredentials, StoreError> {
        let mut found = self
            .credentials_of(&[(external_id.to_owned(), certificate.copied())])
            .await?;
        Ok(found.pop().unwrap_or_default())
    }

    /// [`Store::credentials`] of many lookups, in their order.
    pub async fn credentials_of(
        &self,
        lookups: &[Lookup],
    ) -> Result<Vec<StoredCredentials>, StoreError> {
        type Row = (String, Option<Vec<u8>>, Option<i64>, Option<Vec<u8>>);
        let sha256 = |h: Option<Vec<u8>>| h.and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok());
        let ids: Vec<&str> = lookups
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut stored: HashMap<String, StoredCredentials> = HashMap::new();
        for chunk in chunks(&ids, LOOKUP_CHUNK) {
            let sql = in_list(
                "SELECT external_id, token_sha256, removed_ms, cert_sha256 FROM devices \
                 WHERE external_id IN (VALUES ",
                chunk.len(),
                self.backend(),
            );
            let vals: Vec<Val<'_>> = chunk.iter().map(|id| Val::T(id)).collect();
            let rows: Vec<Row> = with_pool!(&self.read, pool, _Db => {
                let rows = bind_vals(sqlx::query(&sql), &vals).fetch_all(pool).await?;
                rows.iter()
                    .map(<Row as sqlx::FromRow<_>>::from_row)
                    .collect::<Result<Vec<_>, _>>()?
            });
            for (id, token, removed, cert) in rows {
                stored.insert(
                    id,
                    StoredCredentials {
                        token_sha256: sha256(token),
                        removed: removed.is_some(),
                        cert_sha256: sha256(cert),
                        cert_revoked: false,
                    },
                );
            }
        }
        let certificates: Vec<&[u8]> = lookups
            .iter()
            .filter_map(|(_, c)| c.as_ref().map(|c| c.as_slice()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut revoked: HashSet<Vec<u8>> = HashSet::new();
        for chunk in chunks(&certificates, LOOKUP_CHUNK) {
            let sql = in_list(
                "SELECT sha256 FROM revoked_certs WHERE sha256 IN (VALUES ",
                chunk.len(),
                self.backend(),
            );
            let vals: Vec<Val<'_>> = chunk.iter().map(|c| Val::B(c)).collect();
            let rows: Vec<(Vec<u8>,)> = with_pool!(&self.read, pool, _Db => {
                let rows = bind_vals(sqlx::query(&sql), &vals).fetch_all(pool).await?;
                rows.iter()
                    .map(<(Vec<u8>,) as sqlx::FromRow<_>>::from_row)
                    .collect::<Result<Vec<_>, _>>()?
            });
            revoked.extend(rows.into_iter().map(|(sha256,)| sha256));
        }
        Ok(lookups
            .iter()
            .map(|(id, certificate)| StoredCredentials {
                cert_revoked: certificate.is_some_and(|c| revoked.contains(c.as_slice())),
                ..stored.get(id).copied().unwrap_or_default()
            })
            .collect())
    }
}

/// `head` followed by `n` one-value rows and `)`.
fn in_list(head: &str, n: usize, backend: crate::config::Backend) -> String {
    multi_row_sql(head, 1, n, ")", backend == crate::config::Backend::Postgres)
}

struct Pending {
    lookup: Lookup,
    reply: oneshot::Sender<Result<StoredCredentials, StoreError>>,
}

/// Credential lookups, answered many to a statement by
/// [`CredentialReads::serve`]. Cheap to clone.
#[derive(Clone)]
pub struct CredentialReads {
    tx: mpsc::Sender<Pending>,
}

impl CredentialReads {
    /// The handle, and the task that answers it: it ends when `stop` is
    /// cancelled or every handle is gone (lookups still waiting then fail).
    pub fn new(
        store: Store,
        stop: CancellationToken,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(4 * LOOKUP_CHUNK);
        (Self { tx }, async move {
            tokio::select! {
                _ = Self::serve(store, rx) => {}
                _ = stop.cancelled() => {}
            }
        })
    }

    /// [`Store::credentials`], gathered with the lookups of other callers.
    pub async fn get(
        &self,
        device_id: &str,
        certificate: Option<&[u8; 32]>,
    ) -> Result<StoredCredentials, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            lookup: (device_id.to_owned(), certificate.copied()),
            reply,
        };
        let gone = || StoreError::Shared(Arc::new(StoreError::Sqlx(sqlx::Error::PoolClosed)));
        self.tx.send(pending).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn serve(store: Store, mut rx: mpsc::Receiver<Pending>) {
        let mut batch: Vec<Pending> = Vec::with_capacity(LOOKUP_CHUNK);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < LOOKUP_CHUNK {
                match rx.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let lookups: Vec<Lookup> = batch.iter().map(|p| p.lookup.clone()).collect();
            match store.credentials_of(&lookups).await {
                Ok(found) => {
                    for (pending, stored) in batch.drain(..).zip(found) {
                        let _ = pending.reply.send(Ok(stored));
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for pending in batch.drain(..) {
                        let _ = pending.reply.send(Err(StoreError::Shared(Arc::clone(&e))));
                    }
                }
            }
        }
    }
}
