//! The HTTP door's own accept loop (axum's `serve` has none of this): HTTP/1.1
//! only, a request's head within `http.header_timeout` (which in hyper also
//! closes a keep-alive connection idle that long; a response being
//! streamed, such as an event stream, is not idle), and at most
//! `http.max_connections` at once: one more is answered 503 and closed at
//! once rather than left waiting in the kernel's queue.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// What a connection over the limit is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 88\r\n\
\r\n\
{\"error\":{\"code\":\"unavailable\",\"message\":\"too many connections (http.max_connections)\"}}";

/// How long a refused connection may take to hear its 503.
const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// Refusals being told at once; past them a connection is just closed (a
/// flood of connections must not cost a descriptor each for 2 s).
const MAX_REFUSALS: usize = 64;

/// Serves `app` until `stop`: then stops accepting, closes idle
/// connections and lets those with a request in flight finish (the hub's
/// shutdown bounds that wait, and aborting this task closes them all).
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    header_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let permits = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    // Owned here: when this task is aborted, every connection goes too.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if let Ok(telling) = Arc::clone(&refusals).try_acquire_owned() {
                connections.spawn(async move {
                    let _telling = telling;
                    refuse(stream).await;
                });
            }
            continue;
        };
        // Handlers that need the peer's address (line-protocol writes count
        // failed authentications per address) read it as ConnectInfo.
        let service = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                ended = connection.as_mut() => return log_end(ended),
                _ = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            log_end(connection.await);
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Tells a connection over the limit to come back, then closes it (reading
/// what it sent, so the close is not a reset that loses the answer).
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_GRACE, async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 2048];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

fn log_end(ended: hyper::Result<()>) {
    if let Err(e) = ended {
        // A client that went away or timed out; nothing to tell anyone.
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
