//! The TCP connection under TLS, read in large gulps.
//!
//! rustls pulls ciphertext in reads of at most 4 KiB, up to one record (16 KiB) at a time, so a
//! bulk transfer straight off a socket costs four `recvfrom` per record. [`Wire`] reads the
//! socket into a 64 KiB buffer and serves rustls from it: one system call for four records or
//! more. The buffer is released whenever it is drained and the socket has nothing more (an idle
//! connection holds none). Writes go straight to the socket (rustls already writes all its
//! pending records in one vectored write).

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
const GULP: usize = 64 * 1024;

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
