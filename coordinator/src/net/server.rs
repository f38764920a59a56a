//! Serving the run's gRPC: where (TCP, plus a Unix socket in local
//! mode), how (TLS, limits, keepalive, the token check), and a shutdown
//! that is bounded whatever the peers do.
//!
//! tonic's graceful shutdown waits for every connection to close on its
//! own, which a frozen worker, a client that never reads or a health
//! checker holding a socket would never do. Here the servers stop
//! accepting and say goodbye, then wait at most `coordinator.shutdown_grace_s`;
//! whatever is still connected is cut, and the log says who.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::Config;
use common::protocol::limits::{
    CONNECTION_WINDOW_BYTES, MAX_CHUNK_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES, UNIX_SCHEME,
};
use common::protocol::pb::coordinator_server::CoordinatorServer;
use common::protocol::pb::rendezvous_server::RendezvousServer;
use common::security::auth::Token;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tracing::{info, warn};

use crate::CoordinatorError;
use crate::net::auth::Authenticator;
use crate::net::connections::Gate;
use crate::net::service::{Current, RendezvousService, SessionService};
use crate::refusals::Refusals;

/// Largest Join message: a join request is a few hundred bytes, and only
/// an authenticated member's Session may carry large gradient chunks.
pub const JOIN_MESSAGE_BYTES: usize = 16 << 10;

/// HTTP/2 streams one connection may have open at once: a worker needs two
/// (Join, then Session).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 8;

/// How long cut connections get to notice before the coordinator moves on.
const CUT_WAIT: Duration = Duration::from_secs(2);

/// The Unix socket's name inside the output folder.
pub const SOCKET_FILE: &str = "coordinator.sock";

/// Longest Unix socket path the kernel takes (`sun_path` is 108 bytes
/// with its terminating NUL); longer output folders get a short private one.
const MAX_SOCKET_PATH: usize = 100;

/// Where the coordinator serves gRPC.
pub struct Listeners {
    /// Always: `coordinator.listen`, for workers on other machines.
    pub tcp: TcpListener,
    /// Local mode: a Unix domain socket the local workers use instead,
    /// which skips the TCP stack.
    pub unix: Option<LocalSocket>,
}

/// A bound Unix socket and the private folder it may live in.
pub struct LocalSocket {
    /// The listener.
    pub listener: UnixListener,
    /// Its path.
    pub path: PathBuf,
    /// A short folder of its own, removed when the socket goes, when the
    /// output folder's path was too long for a socket.
    _folder: Option<tempfile::TempDir>,
}

impl Listeners {
    /// Binds `coordinator.listen`, plus the local workers' socket when `unix`.
    pub async fn bind(cfg: &Config, unix: bool) -> Result<Self, CoordinatorError> {
        let listen = &cfg.coordinator.listen;
        let tcp = TcpListener::bind(listen)
            .await
            .map_err(|source| CoordinatorError::Listen {
                address: listen.clone(),
                source,
            })?;
        let unix = match unix {
            true => Some(LocalSocket::bind(&cfg.output.dir)?),
            false => None,
        };
        Ok(Self { tcp, unix })
    }
}

impl LocalSocket {
    /// Binds `<output>/coordinator.sock`, or, when that path is too long for
    /// a Unix socket, `coordinator.sock` in a fresh private folder under the
    /// system's temporary folder.
    pub fn bind(output: &Path) -> Result<Self, CoordinatorError> {
        let path = output.join(SOCKET_FILE);
        if path.as_os_str().len() <= MAX_SOCKET_PATH {
            return Self::bind_at(path, None);
        }
        let folder = tempfile::Builder::new()
            .prefix("gancluster-")
            .tempdir()
            .map_err(|source| CoordinatorError::Socket {
                path: std::env::temp_dir(),
                source,
            })?;
        tracing::info!(output = %output.display(), socket = %folder.path().display(),
            "the output folder's path is too long for a Unix socket: using a private short one");
        Self::bind_at(folder.path().join(SOCKET_FILE), Some(folder))
    }

    /// Binds a Unix socket at `path`, replacing a stale one from an earlier run.
    pub fn bind_at(
        path: PathBuf,
        folder: Option<tempfile::TempDir>,
    ) -> Result<Self, CoordinatorError> {
        let fail = |source| CoordinatorError::Socket {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(fail(e));
        }
        let listener = UnixListener::bind(&path).map_err(fail)?;
        Ok(Self {
            listener,
            path,
            _folder: folder,
        })
    }
}

/// The running servers of a run (every generation).
pub struct Servers {
    tasks: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    stop: watch::Sender<bool>,
    gate: Arc<Gate>,
    /// The local socket and the private folder it may live in.
    socket: Option<(PathBuf, Option<tempfile::TempDir>)>,
    grace: Duration,
}

impl Servers {
    /// Serves the `current` generation on `listeners` as `cfg` says, admitting callers that
    /// present `token`. Returns the servers and the address local workers
    /// dial (the Unix socket when there is one, else the TCP address).
    pub fn start(
        listeners: Listeners,
        cfg: &Config,
        current: Arc<Current>,
        token: Token,
        refusals: Arc<Refusals>,
    ) -> Result<(Self, String), CoordinatorError> {
        let co = &cfg.coordinator;
        let gate = Gate::new(
            co.max_connections,
            Duration::from_secs(co.handshake_timeout_s),
            refusals.clone(),
        );
        let auth = Authenticator::new(token, refusals);
        let join = InterceptedService::new(
            RendezvousServer::new(RendezvousService::new(current.clone()))
                .max_decoding_message_size(JOIN_MESSAGE_BYTES),
            auth.clone(),
        );
        let session = InterceptedService::new(
            CoordinatorServer::new(SessionService::new(current))
                .max_decoding_message_size(MAX_CHUNK_BYTES)
                .max_encoding_message_size(MAX_CHUNK_BYTES),
            auth,
        );
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let address = listeners
            .tcp
            .local_addr()
            .map_err(|source| CoordinatorError::Listen {
                address: co.listen.clone(),
                source,
            })?;
        let tls = common::security::tls::server(&cfg.tls)?;
        if tls.is_none() && !address.ip().is_loopback() {
            warn!(%address, "serving without TLS on a non-loopback address: the token and gradients \
                cross the network in clear (set tls.server_cert and tls.server_key)");
        }
        let mut tcp_server = builder(cfg);
        if let Some(tls) = tls {
            tcp_server = tcp_server.tls_config(tls)?;
        }
        // Set on each accepted socket: the builder's own nodelay applies only to
        // listeners it binds itself. Without it small chunks wait on Nagle.
        let tcp = gate.guard(TcpIncoming::from(listeners.tcp).with_nodelay(Some(true)));
        let mut tasks = vec![tokio::spawn(
            tcp_server
                .add_service(join.clone())
                .add_service(session.clone())
                .serve_with_incoming_shutdown(tcp, until_stopped(stopped.clone())),
        )];
        let scheme = if cfg.tls.serves() { "https" } else { "http" };
        info!(%address, tls = cfg.tls.serves(), "coordinator listening");
        let mut local = format!("{scheme}://{address}");
        let socket = listeners.unix.map(|socket| {
            let LocalSocket {
                listener,
                path,
                _folder: folder,
            } = socket;
            let unix = gate.guard(UnixListenerStream::new(listener));
            tasks.push(tokio::spawn(
                builder(cfg)
                    .add_service(join)
                    .add_service(session)
                    .serve_with_incoming_shutdown(unix, until_stopped(stopped)),
            ));
            info!(socket = %path.display(), "local workers connect through a Unix socket");
            local = format!("{}{}", UNIX_SCHEME, path.display());
            (path, folder)
        });
        let servers = Self {
            tasks,
            stop,
            gate,
            socket,
            grace: Duration::from_secs(co.shutdown_grace_s),
        };
        Ok((servers, local))
    }

    /// Stops accepting, lets members hang up for the grace period, then
    /// cuts every connection still open, naming who it cut.
    pub async fn shutdown(self) -> Result<(), CoordinatorError> {
        self.stop.send_replace(true);
        let mut all = Box::pin(futures::future::join_all(self.tasks));
        let results = match tokio::time::timeout(self.grace, &mut all).await {
            Ok(results) => Some(results),
            Err(_) => {
                let peers = self.gate.peers();
                warn!(
                    open = peers.len(),
                    peers = ?&peers[..peers.len().min(16)],
                    grace_s = self.grace.as_secs(),
                    "closing connections still open after the shutdown grace period \
                     (coordinator.shutdown_grace_s)"
                );
                self.gate.cut();
                tokio::time::timeout(CUT_WAIT, &mut all).await.ok()
            }
        };
        if let Some((path, _folder)) = &self.socket {
            // Nothing listens on it any more; a stale file would only confuse.
            let _ = std::fs::remove_file(path);
        }
        let Some(results) = results else {
            warn!("the gRPC servers did not stop after their connections were cut; leaving them");
            return Ok(());
        };
        for result in results {
            if let Ok(Err(e)) = result {
                return Err(e.into());
            }
        }
        Ok(())
    }
}

/// A gRPC server with flow-control windows sized for gradient streams,
/// bounded streams per connection, and keepalive pings that find peers
/// which vanished without closing their sockets.
fn builder(cfg: &Config) -> tonic::transport::Server {
    let co = &cfg.coordinator;
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(co.heartbeat_interval_s)))
        .http2_keepalive_timeout(Some(Duration::from_secs(co.heartbeat_timeout_s)))
}
