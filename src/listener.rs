//! The connections a gRPC server accepts, within limits.
//!
//! tonic's own `TcpIncoming` accepts whatever comes, keeps a connection
//! that never sends a byte open forever, and on an accept error such as
//! `EMFILE` (out of file descriptors) retries at once: measured on an
//! earlier build, 2,000 idle connections against a replica with a limit of
//! 512 descriptors left it answering neither clients nor peers, spinning a
//! core and logging nothing. [`incoming`] instead:
//!
//! - holds at most [`Limits::max_connections`] connections at once; one
//!   over the limit is accepted and closed at once (the caller sees the
//!   connection reset and can go elsewhere), with a rate-limited WARN;
//! - closes a connection that has sent nothing within
//!   [`Limits::handshake_timeout`] of being accepted, and one on which no
//!   byte has moved either way for [`Limits::idle_timeout`];
//! - on an accept error (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) logs a
//!   rate-limited WARN and waits [`ACCEPT_BACKOFF`] before the next accept,
//!   so the loop neither spins nor stops, and serves again once descriptors
//!   are free;
//! - sets `TCP_NODELAY` (without it a small response waits in Nagle's
//!   algorithm for the ACK of the previous segment, which the client's
//!   delayed ACK holds back up to 40 ms).
//!
//! Peers get their own listener with its own limit, so clients can never
//! take the descriptors the consensus traffic needs; [`raise_fd_limit`]
//! lifts the process's soft descriptor limit to its hard one at start.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// How long the accept loop waits after an accept error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A WARN of the same kind at most this often.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// What a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections held open at once.
    pub max_connections: usize,
    /// A new connection must send its first byte within this.
    pub handshake_timeout: Duration,
    /// A connection on which no byte moves for this long is closed.
    pub idle_timeout: Duration,
}

impl Limits {
    /// For clients: many connections; idle ones go after five minutes, far
    /// longer than any call's deadline.
    pub const CLIENTS: Limits = Limits {
        max_connections: 4096,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
    };

    /// For the HTTP/JSON port (`--http-listen`): curl, scripts and probes.
    /// HTTP/1.1 carries one call at a time per connection, so this also
    /// bounds its calls in flight; an idle keep-alive connection goes after
    /// a minute (nginx keeps one 75 s).
    pub const HTTP: Limits = Limits {
        max_connections: 1024,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };

    /// For peers: a few connections each, busy (heartbeats every tick, and
    /// HTTP/2 keepalive pings every second).
    pub const PEERS: Limits = Limits {
        max_connections: 256,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };

    /// For health probes (`--health-listen`): the kubelet opens a
    /// connection per probe and closes it.
    pub const PROBES: Limits = Limits {
        max_connections: 64,
        handshake_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };
}

/// Raises the soft limit on open file descriptors to the hard limit, and
/// returns the soft limit now in force (`None` if it cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// The connections `listener` accepts, within `limits`; `name` says which
/// listener in log lines.
pub fn incoming(
    listener: TcpListener,
    limits: Limits,
    name: &'static str,
) -> impl Stream<Item = io::Result<Connection>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut warned = Warned::default();
    async_stream(move |tx| async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warned.warn(WarnKind::Accept, || {
                        warn!(listener = name, error = %e, "cannot accept connections (out of file descriptors?); retrying")
                    });
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                warned.warn(WarnKind::Full, || {
                    warn!(listener = name, limit = limits.max_connections, %remote, "connection limit reached; closing new connections")
                });
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            if tx
                .send(Ok(Connection::new(stream, permit, limits)))
                .await
                .is_err()
            {
                return;
            }
        }
    })
}

/// Runs `body` as a stream: whatever it sends comes out, in order.
fn async_stream<T, F, Fut>(body: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // One slot: the loop accepts no further than the server takes.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let task = tokio::spawn(body(tx));
    AbortOnDrop {
        inner: tokio_stream::wrappers::ReceiverStream::new(rx),
        task,
    }
}

/// A stream whose producing task stops when the stream is dropped.
struct AbortOnDrop<S> {
    inner: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Stream + Unpin> Stream for AbortOnDrop<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for AbortOnDrop<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WarnKind {
    Accept,
    Full,
}

/// Rate limit for the accept loop's WARNs.
#[derive(Default)]
struct Warned {
    accept: Option<Instant>,
    full: Option<Instant>,
}

impl Warned {
    fn warn(&mut self, kind: WarnKind, log: impl FnOnce()) {
        let last = match kind {
            WarnKind::Accept => &mut self.accept,
            WarnKind::Full => &mut self.full,
        };
        if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *last = Some(Instant::now());
            log();
        }
    }
}

/// An accepted connection: closed (reads fail with `TimedOut`) once it has
/// sent nothing within the handshake timeout, or moved no byte for the idle
/// timeout; frees its place under the limit when dropped.
pub struct Connection {
    stream: TcpStream,
    info: TcpConnectInfo,
    /// Fires at the deadline: the handshake's, then the idle one's.
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Connection {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, limits: Limits) -> Connection {
        let info = stream.connect_info();
        Connection {
            stream,
            info,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            idle: limits.idle_timeout,
            _permit: permit,
        }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.idle;
        // Resetting a timer costs; do it at most once per 1/16 of the span.
        if next.saturating_duration_since(self.deadline.deadline()) > self.idle / 16 {
            self.deadline.as_mut().reset(next);
        }
    }

    /// `Pending` from the stream: has the deadline passed meanwhile?
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle past its timeout")
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(timed_out())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.moved();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    async fn listen(
        limits: Limits,
    ) -> (
        std::net::SocketAddr,
        impl Stream<Item = io::Result<Connection>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, Box::pin(incoming(listener, limits, "test")))
    }

    fn limits(max: usize, handshake_ms: u64, idle_ms: u64) -> Limits {
        Limits {
            max_connections: max,
            handshake_timeout: Duration::from_millis(handshake_ms),
            idle_timeout: Duration::from_millis(idle_ms),
        }
    }

    /// Reads from the server side until it fails or `within` passes.
    async fn read_fails_within(conn: &mut Connection, within: Duration) -> bool {
        let mut buf = [0u8; 16];
        loop {
            match tokio::time::timeout(within, conn.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Err(e)) => return e.kind() == io::ErrorKind::TimedOut,
                Ok(Ok(0)) => return false,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout() {
        let (addr, mut incoming) = listen(limits(8, 100, 10_000)).await;
        let _client = TcpStream::connect(addr).await.expect("connect");
        let mut conn = incoming.next().await.expect("accepted").expect("ok");
        assert!(read_fails_within(&mut conn, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn a_busy_connection_stays_and_an_idle_one_goes() {
        let (addr, mut incoming) = listen(limits(8, 200, 300)).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let mut conn = incoming.next().await.expect("accepted").expect("ok");
        // Bytes every 100 ms for a second: more than three idle timeouts.
        let started = Instant::now();
        let mut buf = [0u8; 1];
        while started.elapsed() < Duration::from_secs(1) {
            client.write_all(b"x").await.expect("write");
            conn.read_exact(&mut buf)
                .await
                .expect("still open while busy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(read_fails_within(&mut conn, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_a_freed_place_is_reused() {
        let (addr, mut incoming) = listen(limits(2, 10_000, 10_000)).await;
        let mut held = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
            held.push(incoming.next().await.expect("accepted").expect("ok"));
        }
        // The third is accepted and closed: its client reads EOF or a reset.
        let mut third = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("closed promptly");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // Freeing a place lets the next one in.
        held.pop();
        let _fourth = TcpStream::connect(addr).await.expect("connect");
        let next = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("accepted after a place was freed");
        assert!(next.is_some_and(|c| c.is_ok()));
    }

    #[test]
    fn the_fd_limit_can_be_read_and_is_not_lowered() {
        let before = raise_fd_limit().expect("getrlimit");
        assert!(raise_fd_limit().expect("getrlimit") >= before);
    }
}
