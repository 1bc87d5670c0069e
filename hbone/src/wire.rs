//! The TCP connection under TLS, read in large gulps.
//!
//! rustls pulls ciphertext in reads of at most 4 KiB, up to one record (16 KiB) at a time, so a
//! bulk transfer straight off a socket costs four `recvfrom` per record. [`Wire`] reads the
//! socket into a 256 KiB buffer (the relay's largest DATA frame) and serves rustls from it: one
//! system call for sixteen records or more. Small messages (a request, an echo, a stream's
//! opening) are read straight into rustls's buffer: the gulp buffer is taken only once a read
//! fills what rustls asked for, so more is likely waiting, and released whenever it is drained and
//! the socket has nothing more (an idle connection holds none). It is never zeroed: the socket
//! reads into its spare capacity. Both matter: allocating and zeroing 256 KiB for each small
//! message was a tenth of the agents' CPU in a connection-rate run. Writes go straight to the
//! socket (rustls already writes all its pending records in one vectored write).
//!
//! How much goes into one write is set on the TLS connection ([`batch_writes`]): rustls buffers
//! at most 64 KiB of records by default, so a 256 KiB DATA frame left as four writes of 65,624
//! bytes, each of which TCP sent as a full 64 KiB segment and a 464-byte runt, and the frame's
//! last 9 bytes as a record and a packet of their own. With room for a whole frame, one write
//! carries it, and TCP cuts it into full segments but for one tail.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf as _, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// One read from the socket.
const GULP: usize = 256 * 1024;

/// TLS records rustls may hold unsent: room for the largest DATA frame the relay sends
/// ([`crate::copy::MAX_READ`] plus its frame head) and its record overhead, with margin.
pub(crate) const TLS_SEND_BUFFER: usize = 512 * 1024;

/// Lets one write to the TLS connection carry a whole DATA frame ([`TLS_SEND_BUFFER`]).
pub(crate) fn batch_writes<D>(conn: &mut rustls::ConnectionCommon<D>) {
    conn.set_buffer_limit(Some(TLS_SEND_BUFFER));
}

#[derive(Debug)]
pub struct Wire {
    tcp: TcpStream,
    /// The bytes read and not yet served. No capacity while small messages arrive or the
    /// connection is idle (released); while a stream of data is read, one `GULP` allocation,
    /// reclaimed whole each time it is drained.
    buf: BytesMut,
}

impl Wire {
    pub fn new(tcp: TcpStream) -> Wire {
        Wire { tcp, buf: BytesMut::new() }
    }

    /// Capacity held for reading (0 between bursts).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.buf.capacity()
    }
}

impl AsyncRead for Wire {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // Not streaming, or a read as large as the gulp: straight into the caller's buffer.
            if this.buf.capacity() == 0 || out.remaining() >= GULP {
                let wanted = out.remaining();
                let polled = Pin::new(&mut this.tcp).poll_read(cx, out);
                if matches!(polled, Poll::Ready(Ok(()))) && wanted < GULP && out.remaining() == 0 {
                    // It filled what was asked for: more is likely waiting, so gulp from now on.
                    this.buf = BytesMut::with_capacity(GULP);
                }
                return polled;
            }
            debug_assert_eq!(this.buf.capacity(), GULP, "a drained buffer is reclaimed whole");
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.tcp), cx, &mut this.buf) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                // EOF, nothing there yet, or an error: hold no memory meanwhile.
                polled => {
                    this.buf = BytesMut::new();
                    return polled.map_ok(|_| ());
                }
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            // Drained: take the whole allocation back for the next gulp (no copy, no allocation).
            // Only a released buffer has no capacity, so a gulp served to its last byte does not
            // look like the end of a stream.
            this.buf.reserve(GULP);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    async fn pair() -> (TcpStream, Wire) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        (client.unwrap(), Wire::new(accepted.unwrap().0))
    }

    /// Reads `len` bytes in 4 KiB reads, as rustls does; returns them and the capacity held after
    /// each read.
    async fn read_as_rustls(wire: &mut Wire, len: usize) -> (Vec<u8>, Vec<usize>) {
        let (mut got, mut held) = (Vec::with_capacity(len), Vec::new());
        let mut chunk = [0u8; 4096];
        while got.len() < len {
            let n = wire.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF after {} of {len} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
            held.push(wire.held());
        }
        (got, held)
    }

    #[tokio::test]
    async fn small_messages_take_no_buffer_and_a_stream_is_gulped_intact_then_released() {
        let (mut peer, mut wire) = pair().await;
        for round in 0..3u8 {
            peer.write_all(&[round; 100]).await.unwrap();
            let (got, held) = read_as_rustls(&mut wire, 100).await;
            assert_eq!(got, [round; 100]);
            assert_eq!(held, [0], "a 100-byte message must not take the gulp buffer");
        }

        let data: Vec<u8> = (0..4 * GULP as u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn(async move {
            peer.write_all(&data).await.unwrap();
            (peer, data)
        });
        let (got, held) = read_as_rustls(&mut wire, 4 * GULP).await;
        let (mut peer, data) = writer.await.unwrap();
        assert!(got == data, "the stream arrived altered");
        // Once taken, the buffer is kept until the stream pauses: a gulp served to its last byte
        // is read into again, not given up and taken anew.
        let taken = held.iter().position(|&h| h > 0).expect("a stream is read in gulps");
        assert_eq!(held[taken], GULP, "a stream is read in gulps");
        assert!(held[taken..].iter().all(|&h| h > 0), "capacity after each read: {held:?}");

        // Drained and nothing more: the next read finds the socket empty and lets the buffer go.
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), wire.read(&mut [0u8; 4096])).await;
        assert!(pending.is_err(), "nothing was sent");
        assert_eq!(wire.held(), 0, "an idle connection holds no buffer");
        peer.shutdown().await.unwrap();
        assert_eq!(wire.read(&mut [0u8; 4096]).await.unwrap(), 0, "EOF");
    }
}
