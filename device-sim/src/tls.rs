//! Telling a TLS failure from the other ways a connection breaks: tonic
//! reports every one as UNAVAILABLE "transport error", with the cause (a
//! rustls error, an unknown CA, a certificate that is a CA) only down the
//! error's source chain.

use std::error::Error;

use tonic::Status;

/// What to do about it, for people.
pub const ADVICE: &str = "the hub's certificate must chain to --ca, name the address in the hub \
    URL, and not be a CA itself (`openssl req -x509` makes a CA: rustls refuses it as \
    CaUsedAsEndEntity); with device certificates (--cert/--key) they must chain to the hub's \
    server.tls.client_ca. `hub certs` writes a CA, a hub certificate and device certificates \
    that work";

/// The cause of a connection failure, when it was the TLS handshake.
pub fn failure(status: &Status) -> Option<String> {
    let mut chain = Vec::new();
    let mut cause: Option<&(dyn Error + 'static)> = status.source();
    while let Some(e) = cause {
        chain.push(e.to_string());
        cause = e.source();
    }
    let text = chain.join(": ");
    let lower = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "unknownissuer"]
        .iter()
        .any(|mark| lower.contains(mark))
        .then_some(text)
}
