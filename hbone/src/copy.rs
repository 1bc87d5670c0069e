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
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::stream::{H2Stream, RecvHalf, SendHalf};

/// First read size of the local -> tunnel direction.
const MIN_READ: usize = 16 * 1024;
/// Largest read size: big enough to amortise per-read and per-frame costs, small enough to keep
/// per-tunnel memory bounded.
const MAX_READ: usize = 256 * 1024;
/// What a reader waits with: the buffer every idle connection holds.
const WAIT_READ: usize = 512;

/// Reads a byte stream in chunks whose buffer is allocated only once data has arrived: it waits
/// with a small inline buffer, then takes what else is already there into a buffer sized by the
/// recent chunks (doubling from 16 KiB to 256 KiB while reads fill it). A thousand idle
/// connections therefore hold half a KiB each rather than a read buffer each, and a bulk transfer
/// still moves 256 KiB per chunk, for one extra read per chunk.
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
    pub async fn next<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<Option<Bytes>> {
        let mut first = [0u8; WAIT_READ];
        let n = reader.read(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        if n < WAIT_READ {
            // A small message (a request, an echo): nothing more to gather.
            return Ok(Some(Bytes::copy_from_slice(&first[..n])));
        }
        let mut buf = BytesMut::with_capacity(self.size);
        buf.extend_from_slice(&first);
        // Whatever else is already readable, without waiting for more (EOF shows on the next call).
        let mut more = std::pin::pin!(reader.read_buf(&mut buf));
        poll_fn(|cx| match more.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => Poll::Ready(Ok(0)),
        })
        .await?;
        if buf.len() >= self.size {
            self.size = (self.size * 2).min(MAX_READ);
        }
        Ok(Some(buf.freeze()))
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

/// A relay that failed part-way; the counts say how far it got.
#[derive(Debug, thiserror::Error)]
#[error("tunnel failed after receiving {} and sending {} bytes: {source}", .stats.received, .stats.sent)]
pub struct TransferError {
    /// Bytes moved before the failure.
    pub stats: TransferStats,
    /// What failed.
    pub source: io::Error,
}

/// Relays between `stream` and a local reader/writer pair until both directions are done.
pub(crate) async fn relay<R, W>(stream: H2Stream, mut reader: R, mut writer: W) -> Result<TransferStats, TransferError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let H2Stream { mut recv, mut send } = stream;
    let mut stats = TransferStats::default();
    let result = tokio::try_join!(
        tunnel_to_local(&mut recv, &mut writer, &mut stats.received),
        local_to_tunnel(&mut reader, &mut send, &mut stats.sent),
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

async fn tunnel_to_local<W: AsyncWrite + Unpin>(
    recv: &mut RecvHalf,
    writer: &mut W,
    count: &mut u64,
) -> io::Result<()> {
    while let Some(chunk) = poll_fn(|cx| recv.poll_chunk(cx)).await? {
        writer.write_all(&chunk).await?;
        writer.flush().await?;
        recv.release(chunk.len());
        *count += chunk.len() as u64;
    }
    // The peer sent END_STREAM: half-close the local side.
    writer.shutdown().await
}

async fn local_to_tunnel<R: AsyncRead + Unpin>(reader: &mut R, send: &mut SendHalf, count: &mut u64) -> io::Result<()> {
    let mut chunks = ChunkReader::default();
    while let Some(mut chunk) = chunks.next(reader).await? {
        while !chunk.is_empty() {
            let sent = poll_fn(|cx| send.poll_send(cx, &mut chunk)).await?;
            *count += sent as u64;
        }
    }
    // Local EOF: half-close the tunnel.
    poll_fn(|cx| send.poll_finish(cx)).await
}

/// Relays between two plain byte streams (say, a captured connection and its delivery on the
/// same node) until both directions are done, with TCP's half-close: one side's EOF shuts the
/// other's write side. Returns the bytes moved `a -> b` and `b -> a`. Buffers as
/// [`ChunkReader`]: none while the connection is idle.
pub async fn relay_plain<A, B>(a: A, b: B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    tokio::try_join!(pipe(&mut a_read, &mut b_write), pipe(&mut b_read, &mut a_write))
}

async fn pipe<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(reader: &mut R, writer: &mut W) -> io::Result<u64> {
    let mut chunks = ChunkReader::default();
    let mut count = 0;
    while let Some(chunk) = chunks.next(reader).await? {
        writer.write_all(&chunk).await?;
        count += chunk.len() as u64;
    }
    writer.shutdown().await?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, duplex};

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn small_messages_come_alone_and_bulk_chunks_grow_to_the_cap() {
        let (mut w, mut r) = duplex(4 << 20);
        let mut chunks = ChunkReader::default();
        w.write_all(b"ping").await.unwrap();
        assert_eq!(chunks.next(&mut r).await.unwrap().unwrap(), &b"ping"[..]);
        let data = pattern(3 << 20);
        w.write_all(&data).await.unwrap();
        drop(w);
        let (mut got, mut sizes) = (Vec::new(), Vec::new());
        while let Some(c) = chunks.next(&mut r).await.unwrap() {
            sizes.push(c.len());
            got.extend_from_slice(&c);
        }
        assert_eq!(got, data, "bytes in order, none lost");
        assert_eq!(sizes[0], MIN_READ, "{sizes:?}");
        assert_eq!(*sizes.iter().max().unwrap(), MAX_READ, "chunks grow while reads fill them: {sizes:?}");
    }

    #[tokio::test]
    async fn relay_plain_carries_both_ways_with_half_close() {
        let (client, relay_a) = duplex(64 << 10);
        let (relay_b, server) = duplex(64 << 10);
        let relay = tokio::spawn(relay_plain(relay_a, relay_b));
        let request = pattern(1 << 20);
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut server_r, mut server_w) = tokio::io::split(server);
        let sent = request.clone();
        let writer = tokio::spawn(async move {
            client_w.write_all(&sent).await.unwrap();
            // Half-close: the server sees EOF and still answers.
            client_w.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        server_r.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, request);
        server_w.write_all(b"done").await.unwrap();
        server_w.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client_r.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"done");
        writer.await.unwrap();
        assert_eq!(relay.await.unwrap().unwrap(), (1 << 20, 4));
    }
}
