//! The `/metrics` page Prometheus scrapes.
//!
//! Served here rather than by the exporter's own listener, which holds
//! every connection for as long as its peer likes and renders the page
//! as often as asked: through the same counted incoming as the health
//! port, with an age after which a connection is asked to close and then
//! cut, and a rate beyond which the page is not rendered.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use super::counted::{Counted, counted};
use super::{Bounds, ObserveError, parse};

/// Histogram buckets of every `*_seconds` metric: from a fast GPU step
/// (milliseconds) to a slow checkpoint upload (minutes).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The metrics port's bounds: a scrape is one small request and
/// Prometheus' default scrape timeout is 10 s.
const BOUNDS: Bounds = Bounds {
    connections: 16,
    age: Duration::from_secs(10),
    grace: Duration::from_secs(1),
};

/// A request's head may not grow past this (hyper's smallest setting); a
/// scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;

/// How often histograms are drained into their buckets, as the exporter's
/// own listener does.
const UPKEEP: Duration = Duration::from_secs(5);

/// How often the page may be rendered, for all connections together: a
/// Prometheus scrapes once a second at the most, while a client asking in
/// a loop would take the worker's one gRPC thread from its gradients.
const RENDERS: Rate = Rate {
    max: 10,
    per: Duration::from_secs(1),
};

/// What Prometheus' text format is served as.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Installs the process-wide Prometheus recorder and serves `/metrics` on
/// `address` (inside a tokio runtime). Without it, every metric the code
/// records is a no-op.
pub fn serve_metrics(address: &str) -> Result<(), ObserveError> {
    const FLAG: &str = "--metrics-listen";
    let address = parse(FLAG, address)?;
    let bind = |source| ObserveError::Bind {
        flag: FLAG,
        address,
        source,
    };
    let listener = std::net::TcpListener::bind(address).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let listener = TcpListener::from_std(listener).map_err(bind)?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.install_recorder())
        .map_err(|source| ObserveError::Metrics { address, source })?;
    let upkept = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        loop {
            every.tick().await;
            upkept.run_upkeep();
        }
    });
    serve_on(listener, handle, BOUNDS, RENDERS);
    tracing::info!(%address, "Prometheus metrics at /metrics");
    Ok(())
}

/// Serves `handle`'s page to the connections `listener` accepts, within
/// `bounds` and at most at `renders`, until the process exits.
fn serve_on(listener: TcpListener, handle: PrometheusHandle, bounds: Bounds, renders: Rate) {
    let page = Arc::new(Page {
        handle,
        renders,
        window: Mutex::new(Window {
            start: Instant::now(),
            count: 0,
        }),
    });
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(counted(listener, bounds.connections));
        while let Some(accepted) = futures::StreamExt::next(&mut incoming).await {
            match accepted {
                Ok(connection) => {
                    tokio::spawn(serve_connection(connection, page.clone(), bounds));
                }
                Err(error) => {
                    // Out of file descriptors, typically: the next accept may
                    // succeed once some close, so wait (a line a second at most).
                    tracing::warn!(%error, "the metrics port cannot accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// One HTTP/1 connection: requests until its peer closes it or its age
/// is up, when the request in flight is answered and the connection
/// closed, or cut after the grace.
async fn serve_connection(connection: Counted, page: Arc<Page>, bounds: Bounds) {
    let service = hyper::service::service_fn(move |request| {
        let answer = page.answer(&request);
        async move { Ok::<_, Infallible>(answer) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(MAX_HEAD);
    let serving = http.serve_connection(TokioIo::new(connection), service);
    let mut serving = std::pin::pin!(serving);
    // Errors are the peer's doing (a malformed request, a reset): hyper
    // has answered what it could, and the connection is gone either way.
    if tokio::time::timeout(bounds.age, serving.as_mut())
        .await
        .is_err()
    {
        serving.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(bounds.grace, serving).await;
    }
}

/// At most `max` events in each window of `per`.
#[derive(Debug, Clone, Copy)]
struct Rate {
    max: u32,
    per: Duration,
}

/// The current window of a [`Rate`].
struct Window {
    start: Instant,
    count: u32,
}

/// The one page served, and how often it has been rendered.
struct Page {
    handle: PrometheusHandle,
    renders: Rate,
    window: Mutex<Window>,
}

impl Page {
    /// `GET /metrics` is the page, within the render rate; nothing else
    /// is served.
    fn answer(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let status = match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/metrics") if self.may_render() => StatusCode::OK,
            (&Method::GET | &Method::HEAD, "/metrics") => StatusCode::TOO_MANY_REQUESTS,
            (_, "/metrics") => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::NOT_FOUND,
        };
        let mut response = Response::new(Full::new(match status {
            StatusCode::OK => Bytes::from(self.handle.render()),
            _ => Bytes::new(),
        }));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        match status {
            StatusCode::OK => {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                headers.insert(
                    RETRY_AFTER,
                    HeaderValue::from(self.renders.per.as_secs().max(1)),
                );
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            _ => {}
        }
        response
    }

    /// Counts a render in the current window; false once it is full.
    fn may_render(&self) -> bool {
        let mut window = self.window.lock().expect("the render window's lock");
        let now = Instant::now();
        if now.duration_since(window.start) >= self.renders.per {
            *window = Window {
                start: now,
                count: 0,
            };
        }
        window.count = window.count.saturating_add(1);
        window.count <= self.renders.max
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::*;
    use crate::process::observe::testing::{DEADLINE, read_until_closed};

    /// Serves a recorder of its own (the process-wide one can be installed
    /// once) holding one counter at 3.
    async fn start(bounds: Bounds) -> SocketAddr {
        start_at(bounds, RENDERS).await
    }

    async fn start_at(bounds: Bounds, renders: Rate) -> SocketAddr {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("gancluster_probe_total").increment(3);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        serve_on(listener, recorder.handle(), bounds, renders);
        address
    }

    /// What the server answers `request` with, up to its close.
    async fn exchange(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&read_until_closed(&mut stream).await).into_owned()
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
    }

    const ROOMY: Bounds = Bounds {
        connections: 4,
        age: Duration::from_secs(600),
        grace: Duration::from_secs(1),
    };

    #[tokio::test]
    async fn the_page_holds_the_recorded_metrics_and_nothing_else_is_served() {
        let address = start(ROOMY).await;
        let page = exchange(address, &get("/metrics")).await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.contains(TEXT_FORMAT), "{page}");
        assert!(page.contains("\ngancluster_probe_total 3\n"), "{page}");
        let elsewhere = exchange(address, &get("/")).await;
        assert!(elsewhere.starts_with("HTTP/1.1 404 "), "{elsewhere}");
        let posted = exchange(
            address,
            "POST /metrics HTTP/1.1\r\nHost: probe\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(posted.starts_with("HTTP/1.1 405 "), "{posted}");
    }

    #[tokio::test]
    async fn scrapes_beyond_the_render_rate_are_told_to_come_back_later() {
        let address = start_at(
            ROOMY,
            Rate {
                max: 2,
                per: Duration::from_secs(600),
            },
        )
        .await;
        for _ in 0..2 {
            let page = exchange(address, &get("/metrics")).await;
            assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        }
        let refused = exchange(address, &get("/metrics")).await;
        assert!(refused.starts_with("HTTP/1.1 429 "), "{refused}");
        assert!(refused.contains("retry-after: 600\r\n"), "{refused}");
        assert!(!refused.contains("gancluster_probe_total"), "{refused}");
        // Only rendering counts: other answers are still given.
        let elsewhere = exchange(address, &get("/")).await;
        assert!(elsewhere.starts_with("HTTP/1.1 404 "), "{elsewhere}");
    }

    #[tokio::test]
    async fn a_connection_beyond_the_bound_is_closed_and_a_freed_slot_serves_again() {
        let bounds = Bounds {
            connections: 2,
            ..ROOMY
        };
        let address = start(bounds).await;
        let mut holders = Vec::new();
        for _ in 0..bounds.connections {
            // A scrape that keeps its connection: served, then held open.
            let mut holder = TcpStream::connect(address).await.unwrap();
            holder
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: probe\r\n\r\n")
                .await
                .unwrap();
            let mut head = [0u8; 12];
            tokio::time::timeout(
                DEADLINE,
                tokio::io::AsyncReadExt::read_exact(&mut holder, &mut head),
            )
            .await
            .expect("a held connection is answered")
            .unwrap();
            assert_eq!(&head, b"HTTP/1.1 200");
            holders.push(holder);
        }
        assert!(
            exchange(address, &get("/metrics")).await.is_empty(),
            "closed unanswered"
        );
        holders.pop();
        tokio::time::timeout(DEADLINE, async {
            // The slot is free once the server has seen the close.
            while exchange(address, &get("/metrics")).await.is_empty() {}
        })
        .await
        .expect("a scrape is served once a slot is free");
    }

    #[tokio::test]
    async fn a_connection_that_never_finishes_its_request_is_closed_after_its_age() {
        let address = start(Bounds {
            connections: 4,
            age: Duration::from_millis(200),
            grace: Duration::from_millis(200),
        })
        .await;
        let mut slow = TcpStream::connect(address).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: pro")
            .await
            .unwrap();
        // Closed within the test's deadline, or `read_until_closed` panics.
        let answered = read_until_closed(&mut slow).await;
        assert!(
            !answered.starts_with(b"HTTP/1.1 200"),
            "a half request is not served"
        );
    }
}
