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

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes past which a write waits for the socket.
const LIMIT: usize = 64 << 10;

/// A connection whose flushes are deferred by one round (see the module).
#[derive(Debug)]
pub struct BatchedWrites<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `io`.
    written: usize,
    /// The flush yielded once already: the next one writes.
    deferred: bool,
}

impl<T> BatchedWrites<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: Vec::new(),
            written: 0,
            deferred: false,
        }
    }

    /// The connection this wraps.
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> BatchedWrites<T> {
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
        // A large burst does not keep its buffer.
        if self.buf.capacity() > LIMIT {
            self.buf.shrink_to(LIMIT);
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

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
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

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for BatchedWrites<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn bytes_arrive_whole_and_in_order_after_a_flush() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut batched = BatchedWrites::new(client);
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
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn nothing_is_written_before_a_flush_and_a_flush_waits_one_round() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut batched = BatchedWrites::new(client);
        batched.write_all(b"first").await.unwrap();
        let mut probe = [0u8; 16];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            server.read(&mut probe),
        )
        .await;
        assert!(early.is_err(), "bytes left before any flush");
        // The first poll of a flush yields; it completes when polled again.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut batched).poll_flush(&mut cx).is_ready());
        let n = server.read(&mut probe).await.unwrap();
        assert_eq!(&probe[..n], b"first");
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_at_the_limit() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut batched = BatchedWrites::new(client);
        let total = 4 * LIMIT;
        let writer = tokio::spawn(async move {
            batched.write_all(&vec![7u8; total]).await.unwrap();
            batched.flush().await.unwrap();
            batched
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the writer buffered without bound");
        let mut got = vec![0u8; total];
        server.read_exact(&mut got).await.unwrap();
        assert!(got.iter().all(|&b| b == 7));
        writer.await.unwrap();
    }
}
