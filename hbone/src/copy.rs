//! The relay between a tunnel stream and a plain byte stream, with TCP's half-close semantics.
//!
//! Two directions run concurrently:
//! - tunnel -> local: each received chunk is written to the local side, then its flow-control
//!   capacity is released. On the peer's END_STREAM the local write side is shut down (TCP FIN).
//! - local -> tunnel: reads go into a buffer that grows while the reader keeps filling it (16 KiB
//!   up to 256 KiB) and are sent without copying. On local EOF, END_STREAM is sent. The buffer
//!   exists only while data is there ([`ChunkReader`]): an idle tunnel holds none.
//!
//! The relay is done when both directions are. If either fails, the stream is reset and the error
//! is returned with the byte counts so far.

use std::future::{Future as _, poll_fn};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, ReadHalf},
    },
};

use crate::stream::{H2Stream, RecvHalf, SendHalf};

/// TLS record payload (the most rustls puts in one record).
const RECORD: usize = 16 * 1024;
/// HTTP/2 frame head.
const FRAME_HEAD: usize = 9;
/// First read size of the local -> tunnel direction: one record, less the DATA frame's head.
const MIN_READ: usize = RECORD - FRAME_HEAD;
/// Largest read size: big enough to amortise per-read and per-frame costs, small enough to keep
/// per-tunnel memory bounded. Sixteen records, less the frame head: a full chunk sent as one
/// DATA frame fills whole TLS records, with no 9-byte record (and packet) left over.
pub(crate) const MAX_READ: usize = 16 * RECORD - FRAME_HEAD;
/// A socket that can wait for data without a buffer, then read what is there.
pub trait ReadySource: AsyncRead + Unpin {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

macro_rules! ready_source {
    ($($t:ty),*) => {$(
        impl ReadySource for $t {
            fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
        }
    )*};
}
ready_source!(TcpStream, OwnedReadHalf, ReadHalf<'_>);

/// Reads a socket in chunks whose buffer is allocated only once data is there: it waits for
/// readiness with no buffer, then reads what is available into a buffer sized by the recent
/// chunks (doubling from 16 KiB to 256 KiB, less a frame head, while reads fill it). A thousand
/// idle connections hold no read buffers, and a bulk transfer moves up to 256 KiB per system
/// call.
///
/// The read goes through `AsyncRead`, which takes a read shorter than the buffer as the end of
/// what the socket holds and clears its readiness: the next wait costs no `recvfrom` that only
/// says `EAGAIN` (one system call per message saved, on each side of each relay).
#[derive(Debug)]
pub struct ChunkReader {
    size: usize,
}

impl Default for ChunkReader {
    fn default() -> Self {
        ChunkReader { size: MIN_READ }
    }
}

impl ChunkReader {
    /// The next chunk, or `None` at EOF.
    pub async fn next<R: ReadySource>(&mut self, reader: &mut R) -> io::Result<Option<Bytes>> {
        loop {
            reader.readable().await?;
            let mut buf = BytesMut::with_capacity(self.size);
            // One attempt: a stale readiness drops the buffer and waits again without it.
            let mut read = std::pin::pin!(reader.read_buf(&mut buf));
            let attempt = poll_fn(|cx| match read.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending => Poll::Ready(None),
            })
            .await;
            match attempt {
                // The socket had nothing after all (its readiness is cleared now), or tokio's
                // cooperative budget for this poll is spent, and the read will not proceed before
                // the task yields: yield either way. Waiting for readiness at once would find it
                // still set in the second case and spin without a system call.
                None => tokio::task::yield_now().await,
                Some(Ok(0)) => return Ok(None),
                Some(Ok(n)) => {
                    if n >= self.size {
                        self.size = ((self.size + FRAME_HEAD) * 2 - FRAME_HEAD).min(MAX_READ);
                    }
                    return Ok(Some(buf.freeze()));
                }
                Some(Err(e)) => return Err(e),
            }
        }
    }
}

/// Bytes moved through one tunnel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TransferStats {
    /// Bytes that arrived through the tunnel and were written to the local side.
    pub received: u64,
    /// Bytes read from the local side and sent through the tunnel.
    pub sent: u64,
}

/// A relay's byte counts while it runs, for readers on other tasks (live metrics): added to after
/// each chunk, with one relaxed atomic add per chunk of up to 256 KiB. The relay's own totals
/// ([`TransferStats`]) say the same once it is done.
#[derive(Debug, Default)]
pub struct Progress {
    received: AtomicU64,
    sent: AtomicU64,
}

impl Progress {
    /// The bytes moved so far, as [`TransferStats`] counts them.
    pub fn stats(&self) -> TransferStats {
        TransferStats { received: self.received.load(Ordering::Relaxed), sent: self.sent.load(Ordering::Relaxed) }
    }

    fn add(counter: &AtomicU64, total: &mut u64, n: usize) {
        *total += n as u64;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A relay that failed part-way; the counts say how far it got.
#[derive(Debug, thiserror::Error)]
#[error("tunnel failed after receiving {} and sending {} bytes: {source}", .stats.received, .stats.sent)]
pub struct TransferError {
    /// Bytes moved before the failure.
    pub stats: TransferStats,
    /// What failed.
    pub source: io::Error,
}

/// Relays between `stream` and a local reader/writer pair until both directions are done,
/// counting into `progress` as it goes.
pub(crate) async fn relay<R, W>(
    stream: H2Stream,
    mut reader: R,
    mut writer: W,
    progress: &Progress,
) -> Result<TransferStats, TransferError>
where
    R: ReadySource,
    W: AsyncWrite + Unpin,
{
    let H2Stream { mut recv, mut send } = stream;
    let mut stats = TransferStats::default();
    let result = tokio::try_join!(
        tunnel_to_local(&mut recv, &mut writer, (&progress.received, &mut stats.received)),
        local_to_tunnel(&mut reader, &mut send, (&progress.sent, &mut stats.sent)),
    );
    match result {
        Ok(_) => {
            tracing::trace!(received = stats.received, sent = stats.sent, "tunnel done");
            Ok(stats)
        }
        Err(source) => {
            send.reset();
            tracing::debug!(received = stats.received, sent = stats.sent, error = %source, "tunnel failed");
            Err(TransferError { stats, source })
        }
    }
}

/// A direction's live counter and its own total.
type Count<'a> = (&'a AtomicU64, &'a mut u64);

async fn tunnel_to_local<W: AsyncWrite + Unpin>(
    recv: &mut RecvHalf,
    writer: &mut W,
    count: Count<'_>,
) -> io::Result<()> {
    let (live, total) = count;
    while let Some(chunk) = poll_fn(|cx| recv.poll_chunk(cx)).await? {
        writer.write_all(&chunk).await?;
        writer.flush().await?;
        recv.release(chunk.len());
        Progress::add(live, total, chunk.len());
    }
    // The peer sent END_STREAM: half-close the local side.
    writer.shutdown().await
}

async fn local_to_tunnel<R: ReadySource>(reader: &mut R, send: &mut SendHalf, count: Count<'_>) -> io::Result<()> {
    let (live, total) = count;
    let mut chunks = ChunkReader::default();
    while let Some(mut chunk) = chunks.next(reader).await? {
        while !chunk.is_empty() {
            let sent = poll_fn(|cx| send.poll_send(cx, &mut chunk)).await?;
            Progress::add(live, total, sent);
        }
    }
    // Local EOF: half-close the tunnel.
    poll_fn(|cx| send.poll_finish(cx)).await
}

/// Relays between two TCP connections (say, a captured connection and its delivery on the same
/// node) until both directions are done, with TCP's half-close: one side's EOF shuts the other's
/// write side. Returns the bytes moved `a -> b` and `b -> a`; `progress` counts them as they go,
/// `a -> b` as sent (as if `a` were a tunnel's local side) and `b -> a` as received. Buffers as
/// [`ChunkReader`]: none while the connection is idle.
pub async fn relay_plain(mut a: TcpStream, mut b: TcpStream, progress: &Progress) -> io::Result<(u64, u64)> {
    let (mut a_read, mut a_write) = a.split();
    let (mut b_read, mut b_write) = b.split();
    tokio::try_join!(
        pipe(&mut a_read, &mut b_write, &progress.sent),
        pipe(&mut b_read, &mut a_write, &progress.received)
    )
}

async fn pipe<R: ReadySource, W: AsyncWrite + Unpin>(
    reader: &mut R,
    writer: &mut W,
    live: &AtomicU64,
) -> io::Result<u64> {
    let mut chunks = ChunkReader::default();
    let mut count = 0;
    while let Some(chunk) = chunks.next(reader).await? {
        writer.write_all(&chunk).await?;
        Progress::add(live, &mut count, chunk.len());
    }
    writer.shutdown().await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn chunks_carry_every_byte_in_order_and_grow_to_the_cap() {
        let (mut w, mut r) = pair().await;
        let mut chunks = ChunkReader::default();
        w.write_all(b"ping").await.unwrap();
        assert_eq!(chunks.next(&mut r).await.unwrap().unwrap(), &b"ping"[..]);
        let data = pattern(8 << 20);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let (mut got, mut largest) = (Vec::new(), 0);
        while let Some(c) = chunks.next(&mut r).await.unwrap() {
            assert!(c.len() <= MAX_READ);
            largest = largest.max(c.len());
            got.extend_from_slice(&c);
        }
        writer.await.unwrap();
        assert_eq!(got, data, "bytes in order, none lost");
        assert!(largest > MIN_READ, "chunks grow while reads fill them (largest {largest})");
    }

    /// tokio's cooperative budget makes a read return Pending, without a system call, once a task
    /// has done enough work in one poll, while the socket's readiness stays set: the reader must
    /// yield then. Waiting for readiness again at once spun forever (a same-node bulk relay did,
    /// in `bench mtls`). The poll runs on its own thread, so a spin fails the test, not hangs it.
    #[test]
    fn a_spent_budget_makes_the_reader_yield_not_spin() {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let got = rt.block_on(async {
                let (mut w, mut r) = pair().await;
                w.write_all(b"ping").await.unwrap();
                r.readable().await.unwrap();
                let mut chunks = ChunkReader::default();
                let mut next = std::pin::pin!(chunks.next(&mut r));
                let mut first = true;
                poll_fn(|cx| {
                    if std::mem::take(&mut first) {
                        // Spend this poll's budget, then ask for the chunk in the same poll.
                        while std::pin::pin!(tokio::task::coop::consume_budget()).poll(cx).is_ready() {}
                        assert!(next.as_mut().poll(cx).is_pending(), "read despite a spent budget");
                        return Poll::Pending;
                    }
                    next.as_mut().poll(cx)
                })
                .await
            });
            let _ = done.send(got.unwrap().unwrap());
        });
        let got = result.recv_timeout(std::time::Duration::from_secs(10)).expect("the reader spun on a spent budget");
        assert_eq!(got, &b"ping"[..]);
    }

    #[tokio::test]
    async fn a_short_read_leaves_no_stale_readiness() {
        let (mut w, mut r) = pair().await;
        let mut chunks = ChunkReader::default();
        w.write_all(b"ping").await.unwrap();
        assert_eq!(chunks.next(&mut r).await.unwrap().unwrap(), &b"ping"[..]);
        // The socket is drained: waiting again must wait for data, not wake at once only for a
        // read that says EAGAIN.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(50), r.readable()).await;
        assert!(waited.is_err(), "readiness survived a read that drained the socket");
        w.write_all(b"pong").await.unwrap();
        assert_eq!(chunks.next(&mut r).await.unwrap().unwrap(), &b"pong"[..]);
    }

    #[tokio::test]
    async fn relay_plain_carries_both_ways_with_half_close() {
        let (mut client, relay_a) = pair().await;
        let (relay_b, mut server) = pair().await;
        let progress = std::sync::Arc::new(Progress::default());
        let counted = progress.clone();
        let relay = tokio::spawn(async move { relay_plain(relay_a, relay_b, &counted).await });
        let request = pattern(1 << 20);
        let sent = request.clone();
        let (mut client_r, mut client_w) = client.split();
        let send = async {
            client_w.write_all(&sent).await.unwrap();
            // Half-close: the server sees EOF and still answers.
            client_w.shutdown().await.unwrap();
        };
        let serve = async {
            let mut received = Vec::new();
            server.read_to_end(&mut received).await.unwrap();
            server.write_all(b"done").await.unwrap();
            server.shutdown().await.unwrap();
            received
        };
        let ((), received) = tokio::join!(send, serve);
        assert_eq!(received, request);
        let mut answer = Vec::new();
        client_r.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"done");
        assert_eq!(relay.await.unwrap().unwrap(), (1 << 20, 4));
        assert_eq!(progress.stats(), TransferStats { sent: 1 << 20, received: 4 }, "the live counts agree");
    }
}
