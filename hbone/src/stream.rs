//! One HTTP/2 CONNECT stream as a byte stream, with flow control tied to consumption.
//!
//! - Receiving: receive-window capacity is released only when the bytes have been consumed (read by
//!   the application, or written to the other socket by the relay), so a slow consumer slows the
//!   sender down instead of growing a buffer. At most one stream window is held per stream.
//! - Sending: data is sent only within the capacity h2 grants (peer window, bounded by h2's
//!   `max_send_buffer_size`), never queued beyond it.
//! - END_STREAM is the half-close: a read returns EOF after the peer's END_STREAM, and shutting the
//!   write side down sends ours.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The receiving half of a stream.
#[derive(Debug)]
pub(crate) struct RecvHalf {
    recv: RecvStream,
    /// Received, not yet handed out; its capacity is not released yet.
    pending: Bytes,
}

impl RecvHalf {
    /// The next received chunk, `None` after the peer's END_STREAM. The chunk's flow-control
    /// capacity must be given back with [`release`](Self::release) once it is consumed.
    pub(crate) fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                // An empty DATA frame (e.g. one carrying only END_STREAM): look at what follows.
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => return Poll::Ready(Ok(Some(data))),
                None => return Poll::Ready(Ok(None)),
                Some(Err(e)) => return Poll::Ready(recv_error(e).map_or(Ok(None), Err)),
            }
        }
    }

    /// Gives `n` consumed bytes of capacity back to the peer.
    pub(crate) fn release(&mut self, n: usize) {
        // Fails only when the stream is already gone, when there is nothing left to release.
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

/// An error of the receiving side, or `None` for a clean end (a reset with NO_ERROR, which a peer
/// may send after it has finished).
fn recv_error(e: h2::Error) -> Option<io::Error> {
    if e.reason() == Some(Reason::NO_ERROR) {
        return None;
    }
    Some(h2_to_io(e))
}

pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() { io::ErrorKind::ConnectionReset } else { io::ErrorKind::Other };
    io::Error::new(kind, e)
}

/// The sending half of a stream.
#[derive(Debug)]
pub(crate) struct SendHalf {
    send: SendStream<Bytes>,
    finished: bool,
}

impl SendHalf {
    /// Waits until at least one byte of a `wanted`-byte write may be sent; returns how many may.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        if self.finished {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        self.send.reserve_capacity(wanted);
        loop {
            let available = self.send.capacity();
            if available > 0 {
                return Poll::Ready(Ok(available.min(wanted)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(self.closed_error(cx))),
            }
        }
    }

    /// Sends a prefix of `data` (without copying) within the available capacity; returns its length.
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_capacity(cx, data.len()))?;
        let chunk = data.split_to(n);
        self.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    /// Sends END_STREAM (once).
    pub(crate) fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        self.finished = true;
        Poll::Ready(match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Ok(()),
            Err(_) => match self.send.poll_reset(cx) {
                // The peer had already finished with the stream cleanly.
                Poll::Ready(Ok(Reason::NO_ERROR)) => Ok(()),
                _ => Err(self.closed_error(cx)),
            },
        })
    }

    /// Aborts the stream (RST_STREAM CANCEL), e.g. after the other side of a relay failed.
    pub(crate) fn reset(&mut self) {
        self.finished = true;
        self.send.send_reset(Reason::CANCEL);
    }

    /// The error for a stream that can no longer send: the peer's reset reason if it sent one.
    fn closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => {
                io::Error::new(io::ErrorKind::ConnectionReset, format!("stream reset by peer: {reason}"))
            }
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
        }
    }
}

/// A CONNECT stream: response received (client) or sent (server).
#[derive(Debug)]
pub(crate) struct H2Stream {
    pub(crate) recv: RecvHalf,
    pub(crate) send: SendHalf,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { recv: RecvHalf { recv, pending: Bytes::new() }, send: SendHalf { send, finished: false } }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let recv = &mut self.recv;
        if recv.pending.is_empty() {
            match ready!(recv.poll_chunk(cx))? {
                Some(chunk) => recv.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(recv.pending.len());
        buf.put_slice(&recv.pending[..n]);
        recv.pending.advance(n);
        recv.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        let n = ready!(send.poll_capacity(cx, buf.len()))?;
        send.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes queued frames out; there is nothing to flush here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.send.poll_finish(cx)
    }
}

/// HTTP/2 keepalive: a PING every `interval`; returns (only) when one fails or goes unanswered for
/// `timeout`, saying why. Without a PING handle it never returns.
pub(crate) async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("PING failed: {e}"),
            Err(_) => return format!("no PING reply within {timeout:?}"),
        }
    }
}
