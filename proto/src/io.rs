//! [`BatchedWrites`]: a connection whose flushes wait one scheduler round,
//! so the frames of many streams on one HTTP/2 connection leave in one
//! write.
//!
//! h2 flushes its connection each time its task runs, and its task runs as
//! soon as any stream on it has a frame to send: a tokio worker runs a task
//! just woken by the running one next (its LIFO slot). When a group commit
//! acks 400 devices on 100 connections, that is a `writev` (and, on the
//! receiving side, a wake-up and a `read`) per Ack. Here the first flush
//! after a write yields instead (the task wakes itself, which puts it
//! behind what is already queued, such as the other streams the same
//! commit woke); the next flush, one round later, writes everything
//! buffered at once. An idle connection pays one extra poll per flush and
//! no waiting: with nothing else queued, the yielded task runs at once.
//!
//! Bytes written but never flushed (a TLS alert that rustls writes just
//! before a failed handshake drops the connection) are tried once, without
//! waiting, when the connection is dropped.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Buffered bytes past which a write waits for the socket.
const LIMIT: usize = 64 << 10;

/// What a drained buffer keeps: a burst (a whole desired document) does
/// not pin its size on every idle connection.
const KEEP: usize = 4 << 10;

/// A TCP connection whose flushes are deferred by one round (see the
/// module).
#[derive(Debug)]
pub struct BatchedWrites {
    io: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `io`.
    written: usize,
    /// The flush yielded once already: the next one writes.
    deferred: bool,
}

impl BatchedWrites {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    /// The connection this wraps.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        if self.buf.capacity() > KEEP {
            self.buf.shrink_to(KEEP);
        }
        Poll::Ready(Ok(()))
    }

    /// Room for more bytes: waits for the socket past the limit.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.pending() >= LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(LIMIT - self.pending()))
    }
}

impl Drop for BatchedWrites {
    fn drop(&mut self) {
        // Best effort, never waiting: the socket takes what it has room for.
        let _ = self.io.try_write(&self.buf[self.written..]);
    }
}

impl AsyncRead for BatchedWrites {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for BatchedWrites {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let room = ready!(this.poll_room(cx))?;
        let n = data.len().min(room);
        this.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut room = ready!(this.poll_room(cx))?;
        let mut n = 0;
        for slice in bufs {
            let take = slice.len().min(room);
            this.buf.extend_from_slice(&slice[..take]);
            n += take;
            room -= take;
            if room == 0 {
                break;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() > 0 && !this.deferred {
            // Behind what is queued now; the next flush writes.
            this.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.deferred = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for BatchedWrites {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A connected loopback pair: (the batched end, the other end).
    async fn pair() -> (BatchedWrites, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (BatchedWrites::new(client.unwrap()), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn bytes_arrive_whole_and_in_order_after_a_flush() {
        let (mut batched, mut other) = pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            other.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut sent = Vec::new();
        for i in 0..5000u32 {
            let chunk = i.to_le_bytes().repeat((i % 7 + 1) as usize);
            batched.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
            if i % 100 == 0 {
                batched.flush().await.unwrap();
            }
        }
        batched.flush().await.unwrap();
        batched.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent);
    }

    #[tokio::test]
    async fn nothing_is_written_before_a_flush_and_a_flush_waits_one_round() {
        let (mut batched, mut other) = pair().await;
        batched.write_all(b"first").await.unwrap();
        let mut probe = [0u8; 16];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), other.read(&mut probe))
                .await;
        assert!(early.is_err(), "bytes left before any flush");
        // The first poll of a flush yields; it completes when polled again.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_ready());
        let n = other.read(&mut probe).await.unwrap();
        assert_eq!(&probe[..n], b"first");
    }

    #[tokio::test]
    async fn what_was_written_but_not_flushed_is_tried_when_dropped() {
        let (mut batched, mut other) = pair().await;
        batched.write_all(b"alert").await.unwrap();
        drop(batched);
        let mut got = Vec::new();
        other.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"alert");
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_at_the_limit() {
        let (mut batched, mut other) = pair().await;
        // Far more than the buffer and both sockets' buffers hold.
        let total = 64 << 20;
        let writer = tokio::spawn(async move {
            batched.write_all(&vec![7u8; total]).await.unwrap();
            batched.flush().await.unwrap();
            batched.pending()
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "the writer buffered without bound");
        let mut got = vec![0u8; total];
        other.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        assert_eq!(writer.await.unwrap(), 0);
    }
}
