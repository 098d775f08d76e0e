//! A `notify.v2` connection's TCP socket, shared between the connection's
//! task (through tungstenite) and the hub's dispatch tasks, which write live
//! group items through to it (ADR 0027).
//!
//! Every write, the task's and the dispatcher's, takes the socket's write
//! lock, so frames never interleave:
//! - a frame written through is written whole with one non-blocking
//!   `writev`, or not at all; if the socket takes only part of it, the
//!   tail is kept and sent before anything else, by the task (woken for it)
//!   or by whichever write comes next;
//! - nothing is written through while the task's last write was short
//!   (it is inside one of its own frames), or while a tail waits.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::metrics::ServerMetrics;
use super::session::group_frame;
use crate::live::{LiveItem, LiveWriter};

/// The socket, its write state, and what a write-through reports to.
pub(crate) struct LiveSocket {
    stream: TcpStream,
    state: Mutex<WriteState>,
    metrics: Arc<ServerMetrics>,
}

#[derive(Debug, Default)]
struct WriteState {
    /// The rest of a frame written through that the socket did not take at
    /// once: sent before anything else.
    tail: Vec<u8>,
    /// The task's last write was short: it is inside a frame of its own.
    inside_frame: bool,
    /// A write failed: nothing more is written through (the task finds the
    /// error on its own next write).
    failed: bool,
    /// The connection's task, waiting in [`LiveSocket::tail_waiting`].
    flusher: Option<Waker>,
}

impl LiveSocket {
    pub(crate) fn new(stream: TcpStream, metrics: Arc<ServerMetrics>) -> Arc<LiveSocket> {
        Arc::new(LiveSocket {
            stream,
            state: Mutex::new(WriteState::default()),
            metrics,
        })
    }

    /// Resolves when a frame written through left a tail to send (the task
    /// then flushes its sink, which sends it).
    pub(crate) async fn tail_waiting(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.state.lock();
            if !state.tail.is_empty() {
                return Poll::Ready(());
            }
            match &state.flusher {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => state.flusher = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await;
    }

    /// Sends the tail, if any, without waiting: `Ok(false)` if the socket
    /// is full.
    fn send_tail(&self, state: &mut WriteState) -> io::Result<bool> {
        while !state.tail.is_empty() {
            match self.stream.try_write(&state.tail) {
                Ok(0) => return Err(self.fail(state, io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    state.tail.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(self.fail(state, e)),
            }
        }
        // Given back once sent: an idle connection keeps no buffer.
        state.tail = Vec::new();
        Ok(true)
    }

    fn fail(&self, state: &mut WriteState, e: io::Error) -> io::Error {
        state.failed = true;
        e
    }

    /// Sends the tail, waiting for room in the socket.
    fn poll_send_tail(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut state = self.state.lock();
            if state.failed {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if self.send_tail(&mut state)? {
                return Poll::Ready(Ok(()));
            }
            drop(state);
            ready!(self.stream.poll_write_ready(cx))?;
        }
    }
}

/// A WebSocket server frame's header for a final text frame of `len`
/// bytes (RFC 6455 5.2: not masked), in `buf`.
fn text_header(buf: &mut [u8; 10], len: usize) -> &[u8] {
    buf[0] = 0x81;
    if len < 126 {
        buf[1] = len as u8;
        &buf[..2]
    } else if let Ok(len) = u16::try_from(len) {
        buf[1] = 126;
        buf[2..4].copy_from_slice(&len.to_be_bytes());
        &buf[..4]
    } else {
        buf[1] = 127;
        buf[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        &buf[..10]
    }
}

impl LiveWriter for LiveSocket {
    fn try_write(&self, item: &LiveItem<'_>) -> bool {
        let mut state = self.state.lock();
        if state.failed || state.inside_frame || !state.tail.is_empty() {
            return false;
        }
        let text = item
            .rendered
            .get_or_render(|| group_frame(item.group, item.offset, item.json));
        let mut header = [0u8; 10];
        let header = text_header(&mut header, text.len());
        let parts = [IoSlice::new(header), IoSlice::new(text.as_bytes())];
        let flusher = match self.stream.try_write_vectored(&parts) {
            Ok(n) if n == header.len() + text.len() => None,
            Ok(0) => {
                state.failed = true;
                return false;
            }
            Ok(n) => {
                // The socket took part of the frame: the rest goes next, sent
                // by the task, which is woken for it.
                let header_rest = &header[n.min(header.len())..];
                let text_rest = &text.as_bytes()[n.saturating_sub(header.len())..];
                state
                    .tail
                    .reserve_exact(header_rest.len() + text_rest.len());
                state.tail.extend_from_slice(header_rest);
                state.tail.extend_from_slice(text_rest);
                state.flusher.take()
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => {
                state.failed = true;
                return false;
            }
        };
        drop(state);
        if let Some(waker) = flusher {
            waker.wake();
        }
        self.metrics.observe_delivery(item.notification.timestamp);
        true
    }
}

/// The connection task's side of a [`LiveSocket`], for tungstenite.
pub(crate) struct LiveIo {
    socket: Arc<LiveSocket>,
    /// Read before the socket: what hyper had read past the upgrade request.
    unread: Bytes,
}

impl LiveIo {
    pub(crate) fn new(socket: Arc<LiveSocket>, unread: Bytes) -> LiveIo {
        LiveIo { socket, unread }
    }

    pub(crate) fn socket(&self) -> &Arc<LiveSocket> {
        &self.socket
    }
}

impl AsyncRead for LiveIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let stream = &self.socket.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for LiveIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let socket = &*self.socket;
        loop {
            let mut state = socket.state.lock();
            if state.failed {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if socket.send_tail(&mut state)? {
                match socket.stream.try_write(buf) {
                    Ok(n) => {
                        state.inside_frame = n < buf.len();
                        return Poll::Ready(Ok(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(socket.fail(&mut state, e))),
                }
            }
            drop(state);
            ready!(socket.stream.poll_write_ready(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket.poll_send_tail(cx)
    }

    /// The tail only: the socket closes when the connection's task and the
    /// subscription's writer let go of it (tungstenite never shuts a
    /// socket down itself).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.socket.poll_send_tail(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_rfc_6455_length_encoding() {
        let mut buf = [0u8; 10];
        assert_eq!(text_header(&mut buf, 0), [0x81, 0]);
        assert_eq!(text_header(&mut buf, 125), [0x81, 125]);
        assert_eq!(text_header(&mut buf, 126), [0x81, 126, 0, 126]);
        assert_eq!(text_header(&mut buf, 65_535), [0x81, 126, 0xff, 0xff]);
        assert_eq!(
            text_header(&mut buf, 65_536),
            [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]
        );
    }
}
