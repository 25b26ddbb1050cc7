//! A small TCP proxy that can cut a link, for partitions.
//!
//! `paxoskv check` puts one proxy on every directed link between two
//! replicas (replica i's `--peers` entry for j is the proxy i → j), so that
//! it can cut any set of links without root, iptables or network
//! namespaces. A [`Proxy`] forwards each connection made to its own
//! address to its target, byte for byte, until it is [blocked](Proxy::block):
//! then every connection through it is dropped at once, and new ones are
//! accepted and closed straight away, so the dialling replica sees its
//! stream fail and keeps reconnecting (with its usual backoff) until the
//! proxy is [unblocked](Proxy::unblock).
//!
//! Dropping a `Proxy` stops it: its listener and every connection through it
//! are closed.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a proxy waits for its target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP proxy on an ephemeral port of 127.0.0.1 to one target address.
pub struct Proxy {
    addr: SocketAddr,
    target: String,
    blocked: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding connections made to a new port of 127.0.0.1 to
    /// `target` (`HOST:PORT`), unblocked.
    pub async fn start(target: impl Into<String>) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let target = target.into();
        let (blocked, watch) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, target.clone(), watch));
        Ok(Proxy {
            addr,
            target,
            blocked,
            accept,
        })
    }

    /// The address to dial instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Cuts the link: drops every connection through the proxy, and closes
    /// new ones as soon as they are accepted.
    pub fn block(&self) {
        self.blocked.send_replace(true);
    }

    /// Restores the link for new connections.
    pub fn unblock(&self) {
        self.blocked.send_replace(false);
    }

    /// Whether the link is cut.
    pub fn is_blocked(&self) -> bool {
        *self.blocked.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The connections end too: their `blocked` watch closes with the
        // sender, which they take as "blocked".
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: String, blocked: watch::Receiver<bool>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors or the like: try again shortly rather
            // than spin or give up the link for the rest of the run.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if *blocked.borrow() {
            // Refused: accepted and closed at once (a listener cannot
            // refuse one connection and keep accepting others).
            drop(client);
            continue;
        }
        tokio::spawn(relay(client, target.clone(), blocked.clone()));
    }
}

/// Forwards one connection until either side closes it or the link is cut.
async fn relay(mut client: TcpStream, target: String, mut blocked: watch::Receiver<bool>) {
    // Both legs carry small gRPC frames: no Nagle delay on either.
    let _ = client.set_nodelay(true);
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target));
    let mut server = tokio::select! {
        connected = connect => match connected {
            Ok(Ok(server)) => server,
            // Target down or not answering: closing the client's side tells
            // it, as a refused connection would have.
            _ => return,
        },
        _ = blocked.wait_for(|b| *b) => return,
    };
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => {}
        // Blocked, or the proxy is gone (the watch closed): drop both legs.
        _ = blocked.wait_for(|b| *b) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server on an ephemeral port; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Sends `msg` on `conn` and reads the echo, within a second.
    async fn echo(conn: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        conn.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        match tokio::time::timeout(Duration::from_secs(1), conn.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Ok(buf),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no echo")),
        }
    }

    /// Whether `conn` is closed by the other side within a second.
    async fn closed(conn: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_until_blocked_and_again_once_unblocked() {
        let target = echo_server().await;
        let proxy = Proxy::start(target.to_string()).await.unwrap();
        assert_eq!(proxy.target(), target.to_string());
        assert!(!proxy.is_blocked());

        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut conn, b"hello").await.unwrap(), b"hello");

        // Blocked: the open connection is dropped...
        proxy.block();
        assert!(proxy.is_blocked());
        assert!(
            closed(&mut conn).await,
            "existing connection survived a block"
        );
        // ...and a new one is closed without reaching the target.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(echo(&mut fresh, b"lost").await.is_err());

        // Unblocked: new connections go through again.
        proxy.unblock();
        assert!(!proxy.is_blocked());
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut again, b"back").await.unwrap(), b"back");
    }

    #[tokio::test]
    async fn a_dropped_proxy_closes_its_connections() {
        let target = echo_server().await;
        let proxy = Proxy::start(target.to_string()).await.unwrap();
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut conn, b"x").await.unwrap(), b"x");
        drop(proxy);
        assert!(closed(&mut conn).await, "connection outlived its proxy");
    }

    #[tokio::test]
    async fn a_target_that_is_down_closes_the_connection() {
        // A port nobody listens on: bound, then released.
        let gone = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = Proxy::start(gone.to_string()).await.unwrap();
        let mut conn = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(closed(&mut conn).await);
    }
}
