//! Webhook delivery: each notification is POSTed as JSON, signed with the
//! webhook's secret, until the receiver answers 2xx or the notification is
//! older than the webhook's `max_age`. Attempts are recorded through the
//! writer (the outbox rows are the delivery log); a restart picks up what
//! was not delivered. A receiver may see a notification more than once
//! (a crash between its 2xx and the record, a lease moving): it dedupes by
//! the notification's `id`, sent as `X-Hub-Event-Id` too.

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Webhook;
use crate::store::alarms::{Attempt, DueDelivery};

/// The signature header: `sha256=` and the hex HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
pub const EVENT_HEADER: &str = "x-hub-event-id";
pub const ATTEMPT_HEADER: &str = "x-hub-attempt";

/// First retry after 1 s, doubling, at most this long apart.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// When to try again after `attempts` failed ones.
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1)
        .saturating_mul(1u32 << attempts.min(20))
        .min(MAX_BACKOFF)
}

pub struct Sender {
    client: reqwest::Client,
    hooks: HashMap<String, Webhook>,
}

impl Sender {
    pub fn new(hooks: &[Webhook]) -> Self {
        Self {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            hooks: hooks.iter().map(|h| (h.name.clone(), h.clone())).collect(),
        }
    }

    /// One attempt of one delivery.
    pub async fn attempt(&self, due: &DueDelivery, now_ms: i64) -> Attempt {
        let mut out = Attempt {
            event_id: due.event_id,
            webhook: due.webhook.clone(),
            status: None,
            error: None,
            delivered: false,
            next_ms: None,
        };
        let Some(hook) = self.hooks.get(&due.webhook) else {
            // Not in this hub's settings (removed, or another hub's): kept
            // and looked at again in a minute, given up after a day.
            out.error = Some("no such webhook in this hub's settings".into());
            let age = now_ms.saturating_sub(due.created_ms);
            if age < 86_400_000 {
                out.next_ms = Some(now_ms + 60_000);
            }
            return out;
        };
        let body = due.payload();
        let result = self
            .client
            .post(&hook.url)
            .timeout(hook.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                SIGNATURE_HEADER,
                sign(hook.secret.as_bytes(), body.as_bytes()),
            )
            .header(EVENT_HEADER, due.event_id.to_string())
            .header(ATTEMPT_HEADER, (due.attempts + 1).to_string())
            .body(body)
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().is_success() => {
                out.status = Some(i64::from(resp.status().as_u16()));
                out.delivered = true;
                return out;
            }
            Ok(resp) => {
                out.status = Some(i64::from(resp.status().as_u16()));
                out.error = Some(format!("HTTP {}", resp.status()));
            }
            // Without the URL: it may carry credentials.
            Err(e) => out.error = Some(describe(e)),
        }
        let age = Duration::from_millis(now_ms.saturating_sub(due.created_ms).max(0) as u64);
        let wait = backoff(due.attempts.clamp(0, 30) as u32);
        if age + wait <= hook.max_age {
            out.next_ms = Some(now_ms + wait.as_millis() as i64);
        }
        out
    }
}

fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let sig = sign(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
