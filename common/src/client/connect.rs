//! One connection to the coordinator, carrying both of its services, with
//! the token on every call, message limits sized for gradient chunks and
//! HTTP/2 pings that notice a coordinator that stopped answering.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::error::SessionError;
use crate::Config;
use crate::config::CoordinatorConfig;
use crate::protocol::limits::{
    CONNECTION_WINDOW_BYTES, MAX_CHUNK_BYTES, MAX_FRAME_BYTES, STREAM_WINDOW_BYTES, UNIX_SCHEME,
};
use crate::protocol::pb::coordinator_client::CoordinatorClient;
use crate::protocol::pb::rendezvous_client::RendezvousClient;
use crate::security::auth::{Bearer, Token};
use crate::security::tls;

/// A channel that presents the token on every call.
pub type Authenticated = InterceptedService<Channel, Bearer>;

/// Both services of the coordinator, over one connection: the Session
/// must come over the connection that joined.
pub struct Clients {
    /// `Join`.
    pub rendezvous: RendezvousClient<Authenticated>,
    /// `Session`.
    pub coordinator: CoordinatorClient<Authenticated>,
}

/// gRPC clients for the coordinator at `address` — `http://host:port`,
/// `https://host:port` (TLS as `cfg.tls` says), or `unix:///path/to/socket`
/// on the same machine (no TCP stack, fewer copies) — presenting `token`,
/// with message limits large enough for gradient chunks. The connection
/// pings the coordinator as `cfg.coordinator` says, so a coordinator that
/// stops answering (stopped, partitioned) fails the session instead of
/// leaving this worker waiting for a reduced gradient forever.
pub async fn connect(address: &str, cfg: &Config, token: &Token) -> Result<Clients, SessionError> {
    let limit = Duration::from_secs(cfg.coordinator.heartbeat_timeout_s);
    tokio::time::timeout(limit, open_channel(address, cfg, token))
        .await
        .unwrap_or_else(|_| {
            Err(SessionError::ConnectTimeout {
                address: address.to_string(),
                seconds: limit.as_secs(),
            })
        })
}

/// The connection [`connect`] makes, without its deadline.
async fn open_channel(address: &str, cfg: &Config, token: &Token) -> Result<Clients, SessionError> {
    let invalid = |source| SessionError::Address {
        address: address.to_string(),
        source,
    };
    let unreachable = |source| SessionError::Connect {
        address: address.to_string(),
        source,
    };
    let channel = match address.strip_prefix(UNIX_SCHEME) {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            // The API wants a URI; the connector ignores it and dials the socket.
            let endpoint = tuned(Endpoint::from_static("http://localhost"), &cfg.coordinator);
            let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            });
            endpoint
                .connect_with_connector(connector)
                .await
                .map_err(unreachable)?
        }
        None => {
            let mut endpoint = tuned(
                Endpoint::from_shared(address.to_string()).map_err(invalid)?,
                &cfg.coordinator,
            );
            if let Some(tls) = tls::client(&cfg.tls, address)? {
                endpoint = endpoint.tls_config(tls).map_err(invalid)?;
            }
            endpoint
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(unreachable)?
        }
    };
    let bearer = Bearer(token.clone());
    Ok(Clients {
        rendezvous: RendezvousClient::with_interceptor(channel.clone(), bearer.clone()),
        coordinator: CoordinatorClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(MAX_CHUNK_BYTES)
            .max_encoding_message_size(MAX_CHUNK_BYTES),
    })
}

/// Flow-control windows and frames sized for gradient streams, and HTTP/2
/// keepalive pings (answered by the coordinator's network stack, not its
/// training logic) every heartbeat interval, failing after the heartbeat timeout.
fn tuned(endpoint: Endpoint, liveness: &CoordinatorConfig) -> Endpoint {
    endpoint
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(liveness.heartbeat_interval_s))
        .keep_alive_timeout(Duration::from_secs(liveness.heartbeat_timeout_s))
        .keep_alive_while_idle(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::new("a-token-long-enough-for-the-rules-0123456789").expect("a valid token")
    }

    #[tokio::test]
    async fn a_socket_file_that_is_not_there_yet_is_a_coordinator_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("{UNIX_SCHEME}{}", dir.path().join("none.sock").display());
        let err = match connect(&address, &Config::default(), &token()).await {
            Err(err) => err,
            Ok(_) => panic!("connected to a socket that does not exist"),
        };
        assert!(err.is_not_listening(), "{err}");
        assert!(err.is_transient(), "{err}");
    }

    #[tokio::test]
    async fn an_address_that_is_not_a_uri_is_permanent_and_named() {
        let err = match connect("not a uri", &Config::default(), &token()).await {
            Err(err) => err,
            Ok(_) => panic!("connected to nothing"),
        };
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().contains("`not a uri`"), "{err}");
    }
}
