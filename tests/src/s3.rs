//! A real S3 server for tests: s3s-fs over HTTP on 127.0.0.1 with SigV4
//! credentials, that can also go down on cue.
//!
//! The server runs on its own tokio runtime in the test process and stores
//! objects as files under a temporary folder, so a test can look at (and
//! damage) exactly what was uploaded. An outage drops every open
//! connection and refuses new ones until it ends, as a crashed or
//! restarting server would.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

/// The bucket every test server creates.
pub const BUCKET: &str = "gancluster";
/// Access key id of the test server.
pub const ACCESS_KEY: &str = "test-access-key";
/// Secret key of the test server.
pub const SECRET_KEY: &str = "test-secret-key-0123456789";

/// Takes the server down for `duration` when a PUT's path contains `needle`
/// (once), while that request is being received.
#[derive(Debug, Clone)]
pub struct Outage {
    /// Substring of the request path that triggers it.
    pub needle: String,
    /// How long the server stays down.
    pub duration: Duration,
    /// Holds the triggering PUT until the run's `latest` reads this (at
    /// most [`HOLD_LIMIT`]): a checkpoint is committed while the next one
    /// uploads, so without it whether that commit lands before the outage
    /// is a race.
    pub after_latest: Option<String>,
}

/// The longest a triggering PUT is held for [`Outage::after_latest`];
/// past it the outage begins anyway and [`S3Server::latest_at_outage`]
/// shows what `latest` held.
pub const HOLD_LIMIT: Duration = Duration::from_secs(60);

/// A running s3s-fs server; stops when dropped.
pub struct S3Server {
    runtime: Option<tokio::runtime::Runtime>,
    root: tempfile::TempDir,
    endpoint: String,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    down: AtomicBool,
    refused: AtomicUsize,
    connections: Mutex<Vec<AbortHandle>>,
    outage: Mutex<Option<Outage>>,
    /// What `latest` held at the moment the outage began.
    latest_at_outage: Mutex<Option<String>>,
}

impl S3Server {
    /// Starts a server on a free port of 127.0.0.1 with [`BUCKET`] created
    /// through the S3 API.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1")
    }

    /// The same on address `ip` (e.g. a container network's gateway, for
    /// containers to reach).
    pub fn start_on(ip: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("S3 server runtime");
        let root = tempfile::tempdir().expect("S3 server folder");
        let shared = Arc::new(Shared::default());
        let endpoint = runtime.block_on(serve(root.path(), ip, shared.clone()));
        Self {
            runtime: Some(runtime),
            root,
            endpoint,
            shared,
        }
    }

    /// `http://ip:port`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The file holding object `key` of [`BUCKET`].
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// Arms an outage for the next PUT whose path contains `outage.needle`.
    pub fn arm_outage(&self, outage: Outage) {
        *self.shared.outage.lock().unwrap() = Some(outage);
    }

    /// Connections refused while down (each one a client retry).
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// The contents of the run's `latest` object when the outage began
    /// (`None` if no outage happened or there was no `latest` yet).
    pub fn latest_at_outage(&self) -> Option<String> {
        self.shared.latest_at_outage.lock().unwrap().clone()
    }

    /// Environment for a gancluster process using this server as `s3://BUCKET/prefix`.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "GANCLUSTER__CHECKPOINT__S3__ENDPOINT",
                self.endpoint.clone(),
            ),
            ("GANCLUSTER__CHECKPOINT__S3__ALLOW_HTTP", "true".into()),
            (
                "GANCLUSTER__CHECKPOINT__S3__ACCESS_KEY_ID",
                ACCESS_KEY.into(),
            ),
            (
                "GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY",
                SECRET_KEY.into(),
            ),
            ("GANCLUSTER__CHECKPOINT__S3__RETRY_TIMEOUT_S", "60".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn service(root: &Path, auth: bool) -> S3Service {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
    let mut builder = S3ServiceBuilder::new(fs);
    if auth {
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
    }
    builder.build()
}

async fn serve(root: &Path, ip: &str, shared: Arc<Shared>) -> String {
    // CreateBucket through the S3 protocol layer, before credentials are
    // required (an operator's bootstrap step).
    let create = http::Request::put(format!("/{BUCKET}"))
        .body(s3s::Body::empty())
        .expect("request");
    let created = service(root, false)
        .call(create)
        .await
        .expect("CreateBucket");
    assert!(
        created.status().is_success(),
        "CreateBucket: {}",
        created.status()
    );

    let listener = TcpListener::bind((ip, 0))
        .await
        .unwrap_or_else(|e| panic!("binding the S3 server on {ip}: {e}"));
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let s3 = service(root, true);
    let bucket_root = root.join(BUCKET);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            if shared.down.load(Ordering::SeqCst) {
                shared.refused.fetch_add(1, Ordering::SeqCst);
                drop(socket);
                continue;
            }
            let (s3, shared2, bucket_root) = (s3.clone(), shared.clone(), bucket_root.clone());
            let handler = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (s3, shared, bucket_root) = (s3.clone(), shared2.clone(), bucket_root.clone());
                async move {
                    trip(&shared, &bucket_root, &request).await;
                    hyper::service::Service::call(&s3, request).await
                }
            });
            let task = tokio::spawn(async move {
                let conn = ConnBuilder::new(TokioExecutor::new());
                let _ = conn.serve_connection(TokioIo::new(socket), handler).await;
            });
            let mut open = shared.connections.lock().unwrap();
            open.retain(|c| !c.is_finished());
            open.push(task.abort_handle());
        }
    });
    endpoint
}

/// Starts the armed outage if `request` matches it.
async fn trip(
    shared: &Arc<Shared>,
    bucket_root: &Path,
    request: &http::Request<hyper::body::Incoming>,
) {
    if request.method() != http::Method::PUT {
        return;
    }
    let path = request.uri().path().to_string();
    let outage = {
        let mut armed = shared.outage.lock().unwrap();
        match armed.as_ref() {
            Some(o) if path.contains(&o.needle) => armed.take(),
            _ => None,
        }
    };
    let Some(outage) = outage else { return };
    let run_prefix = path
        .trim_start_matches(&format!("/{BUCKET}/"))
        .split("/checkpoints/")
        .next()
        .unwrap_or_default()
        .to_string();
    let latest_path = bucket_root.join(&run_prefix).join("latest");
    let read_latest = || std::fs::read_to_string(&latest_path).ok();
    if let Some(wanted) = &outage.after_latest {
        let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
        // Polled: `latest` is written by another process through the S3 API.
        while read_latest().as_ref() != Some(wanted) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    *shared.latest_at_outage.lock().unwrap() = read_latest();
    shared.down.store(true, Ordering::SeqCst);
    for connection in shared.connections.lock().unwrap().drain(..) {
        connection.abort();
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(outage.duration).await;
        shared.down.store(false, Ordering::SeqCst);
    });
}
