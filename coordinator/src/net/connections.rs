//! Every accepted connection, counted, bounded in time until it proves
//! itself, and closable at once.
//!
//! tonic serves whatever connects, for as long as the peer likes: a port
//! scan, a health checker or a client that opens HTTP/2 and never speaks
//! would each hold a socket (and keep a graceful shutdown waiting) forever.
//! The gate wraps each accepted socket: beyond `coordinator.max_connections`
//! a new one is closed on accept; one that has not made a request carrying
//! the token within `coordinator.handshake_timeout_s` is closed (this
//! covers a stalled TLS handshake too, as TLS runs on top of the wrapped
//! socket); and when the run is over, [`Gate::cut`] closes all of them,
//! whatever they are doing.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;

use crate::refusals::Refusals;

/// One accepted connection, as handlers see it in a request's extensions.
#[derive(Debug)]
pub struct Ticket {
    /// Unique for the life of the coordinator.
    pub id: u64,
    /// Who is at the other end: `ip:port`, or `local socket`.
    pub peer: String,
    authenticated: AtomicBool,
}

impl Ticket {
    /// Marks the connection as having presented the token: its handshake
    /// deadline no longer applies.
    pub fn authenticate(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }
}

/// The connect info tonic puts into each request's extensions.
#[derive(Debug, Clone)]
pub struct Peer(pub Arc<Ticket>);

/// The ticket of the connection `request` came over.
pub fn ticket_of<T>(request: &tonic::Request<T>) -> Option<Arc<Ticket>> {
    let extensions = request.extensions();
    extensions
        .get::<Peer>()
        .or_else(|| {
            extensions
                .get::<tonic::transport::server::TlsConnectInfo<Peer>>()
                .map(|tls| tls.get_ref())
        })
        .map(|peer| peer.0.clone())
}

/// Sockets that can say who is at the other end.
pub trait Described {
    /// A short description of the peer, for logs.
    fn describe(&self) -> String;
}

impl Described for TcpStream {
    fn describe(&self) -> String {
        self.peer_addr()
            .map_or_else(|_| "unknown address".into(), |a| a.to_string())
    }
}

impl Described for UnixStream {
    fn describe(&self) -> String {
        "local socket".into()
    }
}

/// Counts, limits and can cut the connections of one coordinator run.
pub struct Gate {
    limit: usize,
    handshake: Duration,
    open: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<(u64, String)>>>,
    next_id: AtomicU64,
    cut: CancellationToken,
    refusals: Arc<Refusals>,
}

impl Gate {
    /// At most `limit` connections at once, each authenticated within
    /// `handshake`; refusals are logged through `refusals`.
    pub fn new(limit: usize, handshake: Duration, refusals: Arc<Refusals>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            handshake,
            open: Arc::new(AtomicUsize::new(0)),
            peers: Arc::default(),
            next_id: AtomicU64::new(1),
            cut: CancellationToken::new(),
            refusals,
        })
    }

    /// Wraps a listener's stream of accepted sockets: over the limit, a
    /// socket is closed at once; the others are guarded.
    pub fn guard<S, IO>(
        self: &Arc<Self>,
        incoming: S,
    ) -> impl Stream<Item = io::Result<Guarded<IO>>> + use<S, IO>
    where
        S: Stream<Item = io::Result<IO>>,
        IO: Described,
    {
        use futures::StreamExt;
        let gate = self.clone();
        incoming.filter_map(move |accepted| {
            let admitted = accepted.map(|io| gate.admit(io)).transpose();
            futures::future::ready(admitted)
        })
    }

    fn admit<IO: Described>(self: &Arc<Self>, io: IO) -> Option<Guarded<IO>> {
        let peer = io.describe();
        if self.open.load(Ordering::Relaxed) >= self.limit {
            self.refusals.record(
                &peer,
                &format!(
                    "{} connections are open already (coordinator.max_connections)",
                    self.limit
                ),
            );
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        self.peers
            .lock()
            .expect("gate lock")
            .push((id, peer.clone()));
        let ticket = Arc::new(Ticket {
            id,
            peer,
            authenticated: AtomicBool::new(false),
        });
        Some(Guarded {
            io,
            ticket,
            cut: Box::pin(self.cut.clone().cancelled_owned()),
            probation: Some(Box::pin(tokio::time::sleep(self.handshake))),
            _slot: Slot {
                id,
                open: self.open.clone(),
                peers: self.peers.clone(),
            },
        })
    }

    /// Connections open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Who is still connected, for the message about cutting them.
    pub fn peers(&self) -> Vec<String> {
        let peers = self.peers.lock().expect("gate lock");
        peers.iter().map(|(_, peer)| peer.clone()).collect()
    }

    /// Closes every connection: their next read or write fails.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

/// Holds one place under the limit until the connection is dropped.
struct Slot {
    id: u64,
    open: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<(u64, String)>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.peers
            .lock()
            .expect("gate lock")
            .retain(|(id, _)| *id != self.id);
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted socket under the gate's rules.
pub struct Guarded<IO> {
    io: IO,
    ticket: Arc<Ticket>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Until the connection authenticates.
    probation: Option<Pin<Box<Sleep>>>,
    _slot: Slot,
}

impl<IO> Guarded<IO> {
    /// Fails the read or write once the gate is cut or the handshake
    /// deadline passed unauthenticated; registers for both otherwise.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the coordinator is shutting down",
            ));
        }
        if self.ticket.is_authenticated() {
            self.probation = None;
        }
        if let Some(deadline) = self.probation.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request with the token within coordinator.handshake_timeout_s",
            ));
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO> Connected for Guarded<IO> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer(self.ticket.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(gate: &Arc<Gate>) -> (TcpStream, Option<Guarded<TcpStream>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, gate.admit(server))
    }

    #[tokio::test(start_paused = true)]
    async fn an_unauthenticated_connection_is_closed_after_the_handshake_deadline() {
        let gate = Gate::new(4, Duration::from_secs(10), Arc::default());
        let (_client, guarded) = pair(&gate).await;
        let mut guarded = guarded.unwrap();
        let mut byte = [0u8; 1];
        let err = guarded.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn an_authenticated_connection_is_served_until_the_gate_is_cut() {
        let gate = Gate::new(4, Duration::from_millis(1), Arc::default());
        let (mut client, guarded) = pair(&gate).await;
        let mut guarded = guarded.unwrap();
        guarded.ticket.authenticate();
        client.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        guarded.read_exact(&mut byte).await.unwrap();
        assert_eq!(gate.open(), 1);
        gate.cut();
        let err = guarded.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        drop(guarded);
        assert_eq!(gate.open(), 0, "a dropped connection gives its place back");
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_refused_on_accept() {
        let gate = Gate::new(1, Duration::from_secs(10), Arc::default());
        let (_a, first) = pair(&gate).await;
        let (_b, second) = pair(&gate).await;
        assert!(first.is_some() && second.is_none());
        drop(first);
        let (_c, third) = pair(&gate).await;
        assert!(third.is_some(), "a closed connection frees its place");
    }
}
