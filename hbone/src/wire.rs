//! The TCP connection under TLS, read in large gulps.
//!
//! rustls pulls ciphertext in reads of at most 4 KiB, up to one record (16 KiB) at a time, so a
//! bulk transfer straight off a socket costs four `recvfrom` per record. [`Wire`] reads the
//! socket into a 256 KiB buffer (the relay's largest DATA frame) and serves rustls from it: one
//! system call for sixteen records or more. The buffer is released whenever it is drained and the
//! socket has nothing more (an idle connection holds none). Writes go straight to the socket (rustls already writes all its
//! pending records in one vectored write).
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
    /// `GULP` bytes while reading, empty while idle.
    buf: Vec<u8>,
    /// Unread bytes are `buf[pos..end]`.
    pos: usize,
    end: usize,
}

impl Wire {
    pub fn new(tcp: TcpStream) -> Wire {
        Wire { tcp, buf: Vec::new(), pos: 0, end: 0 }
    }
}

impl AsyncRead for Wire {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.end {
            // A read as large as the buffer goes straight to the caller.
            if out.remaining() >= GULP {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = vec![0; GULP];
            }
            let mut gulp = ReadBuf::new(&mut this.buf);
            let polled = Pin::new(&mut this.tcp).poll_read(cx, &mut gulp);
            let filled = gulp.filled().len();
            (this.pos, this.end) = (0, filled);
            if filled == 0 || !matches!(polled, Poll::Ready(Ok(()))) {
                // EOF, nothing there yet, or an error: hold no memory meanwhile.
                this.buf = Vec::new();
                return polled;
            }
        }
        let n = out.remaining().min(this.end - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
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
