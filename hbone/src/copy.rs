//! The relay between a tunnel stream and a plain byte stream, with TCP's half-close semantics.
//!
//! Two directions run concurrently:
//! - tunnel -> local: each received chunk is written to the local side, then its flow-control
//!   capacity is released. On the peer's END_STREAM the local write side is shut down (TCP FIN).
//! - local -> tunnel: reads go into a buffer that grows while the reader keeps filling it (16 KiB
//!   up to 256 KiB) and are sent without copying. On local EOF, END_STREAM is sent.
//!
//! The relay is done when both directions are. If either fails, the stream is reset and the error
//! is returned with the byte counts so far.

use std::future::poll_fn;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::stream::{H2Stream, RecvHalf, SendHalf};

/// First read size of the local -> tunnel direction.
const MIN_READ: usize = 16 * 1024;
/// Largest read size: big enough to amortise per-read and per-frame costs, small enough to keep
/// per-tunnel memory bounded.
const MAX_READ: usize = 256 * 1024;

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
    let mut buf = BytesMut::new();
    let mut size = MIN_READ;
    loop {
        buf.reserve(size);
        let n = reader.read_buf(&mut buf).await?;
        if n == 0 {
            // Local EOF: half-close the tunnel.
            return poll_fn(|cx| send.poll_finish(cx)).await;
        }
        if n >= size {
            size = (size * 2).min(MAX_READ);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            let sent = poll_fn(|cx| send.poll_send(cx, &mut chunk)).await?;
            *count += sent as u64;
        }
    }
}
