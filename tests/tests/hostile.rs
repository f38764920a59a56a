//! The coordinator against strangers and broken peers: a real coordinator
//! process in external mode, and clients that send what a real worker
//! never would. Each test names the defect it guards against.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Config;
use common::protocol::pb::{self, coordinator_message, worker_message};
use common::protocol::wire::{self, WireFormat};
use gancluster_tests::client::{self, RawSession};
use gancluster_tests::{
    Frozen, Running, TINY, certs, read_membership, run, wait_for_steps, wait_until, workspace_bin,
};

const LIMIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "hostile-test-token";
/// Heartbeats every second, a peer silent for 4 s is lost.
const QUICK: [(&str, &str); 3] = [
    ("GANCLUSTER__COORDINATOR__HEARTBEAT_INTERVAL_S", "1"),
    ("GANCLUSTER__COORDINATOR__HEARTBEAT_TIMEOUT_S", "4"),
    ("GANCLUSTER__COORDINATOR__SHUTDOWN_GRACE_S", "1"),
];

/// `coordinator --external --workers W --steps S` on the tiny model with
/// its store under `out`.
fn coordinator(workers: usize, steps: u64, out: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin("coordinator"));
    cmd.args(["--external", "--workers", &workers.to_string()])
        .args(["--steps", &steps.to_string(), "--listen", "127.0.0.1:0"])
        .args(TINY)
        .arg("--out")
        .arg(out)
        .arg("--store")
        .arg(format!("file://{}", out.join("store").display()))
        .env("GANCLUSTER_TOKEN", TOKEN)
        .envs(QUICK)
        .env_remove("RUST_LOG")
        .env_remove("GANCLUSTER_FAULT");
    cmd
}

/// A real worker of the tiny model joining `address`.
fn worker(address: &str, steps: u64, out: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin("worker"));
    cmd.args([
        "train",
        "--coordinator",
        address,
        "--steps",
        &steps.to_string(),
    ])
    .args(TINY)
    .arg("--out")
    .arg(out)
    .arg("--store")
    .arg(format!("file://{}", out.join("store").display()))
    .env("GANCLUSTER_TOKEN", TOKEN)
    .envs(QUICK)
    .env_remove("RUST_LOG")
    .env_remove("GANCLUSTER_FAULT");
    cmd
}

/// The configuration the coordinator above trains, as a client must
/// present it (the training hash covers the steps).
fn tiny_config(steps: u64, out: &Path) -> Config {
    let overrides = [
        ("model.image_size", "16".to_string()),
        ("model.ngf", "8".to_string()),
        ("model.ndf", "8".to_string()),
        ("train.batch_size", "8".to_string()),
        ("train.steps", steps.to_string()),
        (
            "checkpoint.store",
            format!("file://{}", out.join("store").display()),
        ),
    ];
    Config::load_with_env(None, &overrides, Some(Default::default())).unwrap()
}

/// The coordinator's `host:port`, once it wrote it.
fn address_of(out: &Path) -> String {
    let path = out.join("coordinator.addr");
    wait_until(
        Duration::from_secs(60),
        "coordinator never wrote its address",
        || {
            let text = std::fs::read_to_string(&path).ok()?;
            (!text.is_empty()).then(|| text.trim().to_string())
        },
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Two hostile members (ranks 0 and 1) in an open session each.
async fn two_members(address: &str, cfg: &Config) -> [(common::client::Clients, RawSession); 2] {
    let url = format!("http://{address}");
    let mut a = client::connect(&url, cfg, TOKEN).await;
    let mut b = client::connect(&url, cfg, TOKEN).await;
    let (ja, jb) = tokio::join!(
        a.rendezvous
            .join(client::join_request(cfg, 0, 1, "member-0")),
        b.rendezvous
            .join(client::join_request(cfg, 1, 1, "member-1")),
    );
    let (ja, jb) = (ja.unwrap().into_inner(), jb.unwrap().into_inner());
    let (sa, sb) = tokio::join!(RawSession::open(&mut a, &ja), RawSession::open(&mut b, &jb));
    [(a, sa.unwrap()), (b, sb.unwrap())]
}

/// A chunk of the tiny model's discriminator gradient of `step`, all zeros.
fn d_chunk(cfg: &Config, step: u64) -> pb::GradChunk {
    let elems = cfg.model.discriminator_params() as usize;
    pb::GradChunk {
        step,
        net: pb::Net::Discriminator as i32,
        index: 0,
        count: 1,
        total_elems: elems as u64,
        format: pb::WireFormat::F32 as i32,
        data: wire::encode(&vec![0.0; elems], WireFormat::F32),
        skip: false,
        phase: 0,
        not_finite: false,
    }
}

// 1. It never exited while any client connection was open.

/// A finished run exits although a port scanner's idle TCP connection and
/// an HTTP/2 client that never sends a request are still connected: after
/// the shutdown grace period it cuts them and says so.
#[test]
fn a_finished_run_exits_with_idle_and_silent_connections_open() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(
        coordinator(1, 3, out.path()).env("GANCLUSTER__COORDINATOR__HANDSHAKE_TIMEOUT_S", "600"),
    );
    let address = address_of(out.path());
    let _idle = TcpStream::connect(&address).unwrap();
    let rt = runtime();
    let _silent = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&address).await.unwrap();
        h2::client::handshake(tcp).await.unwrap()
    });
    run(
        &mut worker(&format!("http://{address}"), 3, out.path()),
        LIMIT,
    )
    .assert_success();
    let done = server.wait(Duration::from_secs(30)).assert_success();
    done.assert_says(&[
        "training finished",
        "closing connections still open after the shutdown grace period",
    ]);
}

/// A failed run exits although a frozen worker (SIGSTOP) keeps its
/// connection open and never reads the abort. (Without a restart to
/// spend, losing a worker fails the run instead of re-forming the group.)
#[test]
fn a_failed_run_exits_though_a_frozen_worker_holds_its_connection() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(
        coordinator(2, 100_000, out.path()).env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0"),
    );
    let address = format!("http://{}", address_of(out.path()));
    let first = Running::spawn(&mut worker(&address, 100_000, out.path()));
    let second = Running::spawn(&mut worker(&address, 100_000, out.path()));
    wait_for_steps(out.path(), 2);
    let _frozen = Frozen::stop(second.id());
    let done = server.wait(Duration::from_secs(60)).assert_failure();
    done.assert_says(&[
        "was lost during training",
        "coordinator.heartbeat_timeout_s",
    ]);
    drop(first);
}

// 2. Any member could end the run as a success.

/// `Finished` is counted per rank and only after every step: rank 1
/// saying it twice at step 0 is a protocol error naming rank 1.
#[test]
fn finished_counts_ranks_and_steps_not_messages() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(&mut coordinator(2, 50, out.path()));
    let address = address_of(out.path());
    let cfg = tiny_config(50, out.path());
    let rt = runtime();
    let _members = rt.block_on(async {
        let members = two_members(&address, &cfg).await;
        let finished = || worker_message::Kind::Finished(pb::Finished { steps: 50 });
        members[1].1.send(finished()).await;
        members[1].1.send(finished()).await;
        members
    });
    let done = server.wait(LIMIT).assert_failure();
    done.assert_says(&[
        "worker rank 1 (\"member-1\") broke the protocol",
        "said it finished after 50 steps",
    ]);
    assert!(
        !done.stderr.contains("training finished"),
        "{}",
        done.stderr
    );
}

/// Only rank 0 reports checkpoints, and only those it was asked for:
/// anything else is refused, and `latest` never names a checkpoint that
/// does not exist.
#[test]
fn checkpoint_reports_from_the_wrong_rank_or_step_are_refused() {
    for (rank, step) in [(1, 7), (0, 7)] {
        let out = tempfile::tempdir().unwrap();
        let server = Running::spawn(&mut coordinator(2, 50, out.path()));
        let address = address_of(out.path());
        let cfg = tiny_config(50, out.path());
        let rt = runtime();
        let _members = rt.block_on(async {
            let members = two_members(&address, &cfg).await;
            let written = pb::CheckpointWritten {
                step,
                ok: true,
                error: String::new(),
            };
            members[rank]
                .1
                .send(worker_message::Kind::CheckpointWritten(written))
                .await;
            members
        });
        let done = server.wait(LIMIT).assert_failure();
        done.assert_says(&[
            &format!("worker rank {rank}"),
            "reported checkpoint step 7 written, which the coordinator did not ask it for",
        ]);
        assert!(
            !out.path().join("store/default/latest").exists(),
            "`latest` was moved"
        );
    }
}

// 3. An empty token turned authentication off.

#[test]
fn an_empty_token_is_refused_at_start_by_both_binaries() {
    let out = tempfile::tempdir().unwrap();
    let done = run(
        coordinator(1, 3, out.path()).env("GANCLUSTER_TOKEN", ""),
        LIMIT,
    )
    .assert_failure();
    done.assert_says(&["GANCLUSTER_TOKEN is empty"]);
    assert!(
        !out.path().join("coordinator.addr").exists(),
        "it started listening"
    );
    let done = run(
        worker("http://127.0.0.1:1", 3, out.path()).env("GANCLUSTER_TOKEN", ""),
        LIMIT,
    )
    .assert_failure();
    done.assert_says(&["GANCLUSTER_TOKEN is empty"]);
}

// 4. Unauthenticated clients held memory and sockets.

/// A stranger declaring a 63 MiB Join body and stalling is refused on its
/// headers, at once: nothing of the body is waited for.
#[test]
fn an_unauthenticated_body_is_refused_before_it_is_read() {
    let out = tempfile::tempdir().unwrap();
    let _server = Running::spawn(&mut coordinator(2, 3, out.path()));
    let address = address_of(out.path());
    let rt = runtime();
    for path in [
        "/gancluster.v1.Rendezvous/Join",
        "/gancluster.v1.Coordinator/Session",
    ] {
        let status = rt.block_on(client::stalled_request(
            &address,
            path,
            63 << 20,
            Duration::from_secs(10),
        ));
        assert_eq!(
            status.as_deref(),
            Some("16"),
            "{path}: expected UNAUTHENTICATED at once"
        );
    }
}

/// A token holder's Join is still small: a 1 MiB host name is refused by
/// the Join size limit, and a 300-byte one by the host check.
#[test]
fn an_oversized_join_is_refused_even_with_the_token() {
    let out = tempfile::tempdir().unwrap();
    let _server = Running::spawn(&mut coordinator(2, 3, out.path()));
    let address = format!("http://{}", address_of(out.path()));
    let cfg = tiny_config(3, out.path());
    let rt = runtime();
    rt.block_on(async {
        let mut clients = client::connect(&address, &cfg, TOKEN).await;
        let huge = client::join_request(&cfg, -1, 1, &"h".repeat(1 << 20));
        let status = clients.rendezvous.join(huge).await.unwrap_err();
        assert!(
            status.message().contains("message length too large"),
            "{status:?}"
        );
        let long = client::join_request(&cfg, -1, 1, &"h".repeat(300));
        let status = clients.rendezvous.join(long).await.unwrap_err();
        assert!(status.message().contains("300 bytes"), "{status:?}");
    });
}

/// Beyond coordinator.max_connections a connection is closed on accept;
/// one that never presents the token is closed after the handshake deadline.
#[test]
fn surplus_and_silent_connections_are_closed() {
    let out = tempfile::tempdir().unwrap();
    let _server = Running::spawn(
        coordinator(1, 3, out.path())
            .env("GANCLUSTER__COORDINATOR__MAX_CONNECTIONS", "2")
            .env("GANCLUSTER__COORDINATOR__HANDSHAKE_TIMEOUT_S", "2"),
    );
    let address = address_of(out.path());
    let connect = || {
        let socket = TcpStream::connect(&address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        socket
    };
    // Reads (the server's HTTP/2 settings, if it serves) until the
    // coordinator closes the connection; false if it stays open 30 s.
    let closed = |socket: &mut TcpStream| {
        let mut buffer = [0u8; 256];
        loop {
            match socket.read(&mut buffer) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
            }
        }
    };
    // The listener accepts in arrival order: the third is the surplus one.
    let (mut first, _second) = (connect(), connect());
    let mut third = connect();
    let started = Instant::now();
    assert!(closed(&mut third), "the surplus connection stayed open");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed on accept, not by the deadline"
    );
    assert!(closed(&mut first), "the silent connection stayed open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(20),
        "the silent connection was closed after {waited:?}, not by the 2 s handshake deadline"
    );
}

// 5. A member could grow memory without bound and mislead the operator.

/// A chunk for a future step, or a payload shorter than its header, is
/// refused and blamed on its sender.
#[test]
fn chunks_for_other_steps_or_of_the_wrong_length_are_blamed_on_their_sender() {
    let future = |cfg: &Config| d_chunk(cfg, 5);
    let short = |cfg: &Config| pb::GradChunk {
        data: vec![0u8; 8].into(),
        ..d_chunk(cfg, 0)
    };
    type Chunk = fn(&Config) -> pb::GradChunk;
    let cases: [(Chunk, &str); 2] = [
        (
            future,
            "a chunk of the Discriminator gradient of step 5 while the group reduces",
        ),
        (short, "holds 8 bytes, expected"),
    ];
    for (chunk, says) in cases {
        let out = tempfile::tempdir().unwrap();
        let server = Running::spawn(&mut coordinator(2, 50, out.path()));
        let address = address_of(out.path());
        let cfg = tiny_config(50, out.path());
        let rt = runtime();
        let _members = rt.block_on(async {
            let members = two_members(&address, &cfg).await;
            members[0]
                .1
                .send(worker_message::Kind::Chunk(d_chunk(&cfg, 0)))
                .await;
            members[1]
                .1
                .send(worker_message::Kind::Chunk(chunk(&cfg)))
                .await;
            members
        });
        let done = server.wait(LIMIT).assert_failure();
        done.assert_says(&["worker rank 1 (\"member-1\") broke the protocol", says]);
    }
}

/// A member that never reads its stream is named as such once its queue
/// stays full, not reported as a hung GPU after the step timeout.
#[test]
fn a_member_that_never_reads_is_named() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(&mut coordinator(2, 100_000, out.path()));
    let address = address_of(out.path());
    let cfg = tiny_config(100_000, out.path());
    let rt = runtime();
    rt.block_on(async {
        let [(_a, mut reader), (_b, stuck)] = two_members(&address, &cfg).await;
        let g_elems = cfg.model.generator_params() as usize;
        let g_chunk = |step| pb::GradChunk {
            net: pb::Net::Generator as i32,
            total_elems: g_elems as u64,
            data: wire::encode(&vec![0.0; g_elems], WireFormat::F32),
            ..d_chunk(&cfg, step)
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        'steps: for step in 0.. {
            for chunk in [d_chunk(&cfg, step), g_chunk(step)] {
                reader
                    .send(worker_message::Kind::Chunk(chunk.clone()))
                    .await;
                stuck.send(worker_message::Kind::Chunk(chunk)).await;
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), reader.inbound.message())
                        .await
                    {
                        Ok(Ok(Some(pb::CoordinatorMessage {
                            kind: Some(coordinator_message::Kind::Chunk(_)),
                        }))) => break,
                        Ok(Ok(Some(_))) => continue,
                        // Aborted, or stuck behind the member that does not read.
                        _ => break 'steps,
                    }
                }
            }
            assert!(Instant::now() < deadline, "the coordinator never noticed");
        }
    });
    let done = server.wait(LIMIT).assert_failure();
    done.assert_says(&["worker rank 1 stopped reading its session stream"]);
    assert!(
        !done.stderr.contains("no step completed"),
        "{}",
        done.stderr
    );
}

// 6. Rendezvous could be poisoned.

/// A refused Join (a rank outside the group, another checksum) pins
/// nothing: the real workers still form the group and train.
#[test]
fn a_refused_join_does_not_poison_the_rendezvous() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(&mut coordinator(2, 3, out.path()));
    let address = address_of(out.path());
    let cfg = tiny_config(3, out.path());
    let rt = runtime();
    rt.block_on(async {
        let mut intruder = client::connect(&format!("http://{address}"), &cfg, TOKEN).await;
        let refused = intruder
            .rendezvous
            .join(client::join_request(&cfg, 7, 666, "intruder"))
            .await;
        assert!(refused.unwrap_err().message().contains("rank 7"));
    });
    let url = format!("http://{address}");
    let a = Running::spawn(&mut worker(&url, 3, out.path()));
    let b = Running::spawn(&mut worker(&url, 3, out.path()));
    a.wait(LIMIT).assert_success();
    b.wait(LIMIT).assert_success();
    server.wait(LIMIT).assert_success();
}

/// A worker that dies while waiting in Join gives its rank back: its
/// restart joins as the same rank and the group trains.
#[test]
fn a_joiner_that_dies_while_waiting_gives_its_rank_back() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(&mut coordinator(2, 3, out.path()));
    let address = address_of(out.path());
    let url = format!("http://{address}");
    let cfg = tiny_config(3, out.path());
    let rt = runtime();
    rt.block_on(async {
        let mut doomed = client::connect(&url, &cfg, TOKEN).await;
        let waiting = tokio::time::timeout(
            Duration::from_secs(2),
            doomed
                .rendezvous
                .join(client::join_request(&cfg, 1, 666, "doomed")),
        )
        .await;
        assert!(waiting.is_err(), "the join should wait for the group");
        // Dropping the client hangs up, as a dead process's kernel would.
    });
    let a = Running::spawn(worker(&url, 3, out.path()).args(["--rank", "0"]));
    let b = Running::spawn(worker(&url, 3, out.path()).args(["--rank", "1"]));
    a.wait(LIMIT).assert_success();
    b.wait(LIMIT).assert_success();
    server.wait(LIMIT).assert_success();
}

// 7. No TLS.

/// With TLS the group trains; a worker that does not trust the
/// coordinator's CA, or dials without TLS, gets nowhere.
#[test]
fn tls_trains_and_refuses_untrusted_or_plain_peers() {
    let out = tempfile::tempdir().unwrap();
    let pki = certs::generate(out.path());
    let server = Running::spawn(
        coordinator(1, 3, out.path())
            .env("GANCLUSTER__TLS__SERVER_CERT", &pki.server_cert)
            .env("GANCLUSTER__TLS__SERVER_KEY", &pki.server_key),
    );
    let address = address_of(out.path());
    let https = format!("https://{address}");
    let plain = run(
        &mut worker(&format!("http://{address}"), 3, out.path()),
        LIMIT,
    )
    .assert_failure();
    assert_refused_connection(&plain.stderr);
    let untrusted = run(
        worker(&https, 3, out.path()).env("GANCLUSTER__TLS__CA", &pki.other_ca),
        LIMIT,
    )
    .assert_failure();
    untrusted.assert_says(&[
        "cannot connect to the coordinator",
        "invalid peer certificate",
    ]);
    run(
        worker(&https, 3, out.path()).env("GANCLUSTER__TLS__CA", &pki.ca),
        LIMIT,
    )
    .assert_success();
    server.wait(LIMIT).assert_success();
}

/// With mutual TLS a worker without a client certificate is refused, and
/// one with a certificate from the CA trains.
#[test]
fn mutual_tls_requires_a_client_certificate() {
    let out = tempfile::tempdir().unwrap();
    let pki = certs::generate(out.path());
    let server = Running::spawn(
        coordinator(1, 3, out.path())
            .env("GANCLUSTER__TLS__SERVER_CERT", &pki.server_cert)
            .env("GANCLUSTER__TLS__SERVER_KEY", &pki.server_key)
            .env("GANCLUSTER__TLS__CLIENT_CA", &pki.ca),
    );
    let https = format!("https://{}", address_of(out.path()));
    let anonymous = run(
        worker(&https, 3, out.path()).env("GANCLUSTER__TLS__CA", &pki.ca),
        LIMIT,
    )
    .assert_failure();
    assert_refused_connection(&anonymous.stderr);
    run(
        worker(&https, 3, out.path())
            .env("GANCLUSTER__TLS__CA", &pki.ca)
            .env("GANCLUSTER__TLS__CLIENT_CERT", &pki.client_cert)
            .env("GANCLUSTER__TLS__CLIENT_KEY", &pki.client_key),
        LIMIT,
    )
    .assert_success();
    server.wait(LIMIT).assert_success();
}

/// A worker the coordinator's TLS turned away: it says it could not
/// connect or lost the connection, and never that it trained.
fn assert_refused_connection(stderr: &str) {
    assert!(
        stderr.contains("cannot connect to the coordinator")
            || stderr.contains("lost the connection to the coordinator"),
        "{stderr}"
    );
    assert!(!stderr.contains("joined"), "{stderr}");
}

// 8. Log injection and floods.

/// A host name with a newline cannot forge a log line, and 200 wrong-token
/// tries in a burst make a bounded number of lines.
#[test]
fn peer_text_is_escaped_and_refusals_are_rate_limited() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(&mut coordinator(2, 3, out.path()));
    let address = address_of(out.path());
    let url = format!("http://{address}");
    let cfg = tiny_config(3, out.path());
    let rt = runtime();
    rt.block_on(async {
        let mut forger = client::connect(&url, &cfg, TOKEN).await;
        let forged = "evil\n2026-11-27T00:00:00Z INFO training finished steps=3";
        let mut request = client::join_request(&cfg, 9, 1, forged);
        request.requested_rank = 9;
        assert!(forger.rendezvous.join(request).await.is_err());
        let mut wrong = client::connect(&url, &cfg, "not-the-token").await;
        for _ in 0..200 {
            assert!(
                wrong
                    .rendezvous
                    .join(client::join_request(&cfg, -1, 1, "x"))
                    .await
                    .is_err()
            );
        }
    });
    // It would wait for workers forever: stop it to read its log.
    server.terminate();
    let done = server.wait(LIMIT);
    done.assert_says(&["evil\\n2026-11-27T00:00:00Z INFO training finished"]);
    assert!(
        !done
            .stderr
            .lines()
            .any(|l| l.starts_with("2026-11-27T00:00:00Z")),
        "a forged line reached the log:\n{}",
        done.stderr
    );
    let refusals = done
        .stderr
        .lines()
        .filter(|l| l.contains("refused"))
        .count();
    assert!(
        refusals <= 12,
        "{refusals} refusal lines for 201 refusals:\n{}",
        done.stderr
    );
}

// 9. Lesser defects.

/// NaN in a gradient: `halt` names the step and the rank; `skip` skips
/// that update on every rank, counts it, and the run completes. A group of
/// one, which sends headers only, says so itself and is halted alike.
#[test]
fn a_non_finite_gradient_halts_naming_step_and_rank_or_is_skipped() {
    for (workers, rank) in [(2, 1), (1, 0)] {
        let out = tempfile::tempdir().unwrap();
        let done = run(
            gancluster_tests::tiny_coordinator(workers, 6, out.path())
                .arg("--store")
                .arg(format!("file://{}", out.path().join("store").display()))
                .env("GANCLUSTER_FAULT", format!("nan:{rank}:2"))
                .env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0"),
            LIMIT,
        )
        .assert_failure();
        done.assert_says(&[&format!(
            "the Discriminator gradient of step 2 is not finite: rank(s) [{rank}] sent NaN or Inf"
        )]);
    }
    let out = tempfile::tempdir().unwrap();
    let done = run(
        gancluster_tests::tiny_coordinator(2, 6, out.path())
            .arg("--store")
            .arg(format!("file://{}", out.path().join("store").display()))
            .env("GANCLUSTER_FAULT", "nan:1:2")
            .env("GANCLUSTER__ALLREDUCE__NONFINITE", "skip"),
        LIMIT,
    )
    .assert_success();
    done.assert_says(&[
        "every rank skips this optimizer step",
        "skipped=1",
        "training finished",
    ]);
}

/// A message over the size limit is the sender breaking the protocol, not
/// "the process died or its network failed"; a second session for a
/// member is refused without restarting anyone.
#[test]
fn oversized_messages_and_second_sessions_are_named_for_what_they_are() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(&mut coordinator(2, 50, out.path()));
    let address = address_of(out.path());
    let cfg = tiny_config(50, out.path());
    let rt = runtime();
    let _members = rt.block_on(async {
        let url = format!("http://{address}");
        let mut a = client::connect(&url, &cfg, TOKEN).await;
        let mut b = client::connect(&url, &cfg, TOKEN).await;
        b.coordinator = b.coordinator.max_encoding_message_size(128 << 20);
        let (ja, jb) = tokio::join!(
            a.rendezvous
                .join(client::join_request(&cfg, 0, 1, "member-0")),
            b.rendezvous
                .join(client::join_request(&cfg, 1, 1, "member-1")),
        );
        let (ja, jb) = (ja.unwrap().into_inner(), jb.unwrap().into_inner());
        let (sa, sb) = tokio::join!(RawSession::open(&mut a, &ja), RawSession::open(&mut b, &jb));
        let (sa, sb) = (sa.unwrap(), sb.unwrap());
        let again = RawSession::open(&mut a, &ja)
            .await
            .err()
            .expect("a second session");
        assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");
        let oversized = pb::GradChunk {
            data: vec![0u8; 65 << 20].into(),
            ..d_chunk(&cfg, 0)
        };
        sb.send(worker_message::Kind::Chunk(oversized)).await;
        (a, b, sa, sb)
    });
    let done = server.wait(LIMIT).assert_failure();
    done.assert_says(&[
        "worker rank 1 (\"member-1\") broke the protocol",
        "sent a message the coordinator cannot accept",
    ]);
}

// 10. A token holder's claims were taken as truth, and arrivals evicted survivors.

/// The group's initial parameter checksum, as a refused join reveals it
/// once a real worker pinned it (a join for an impossible rank meets the
/// checksum check first, so it never takes a place).
async fn group_checksum(url: &str, cfg: &Config) -> u64 {
    let mut probe = client::connect(url, cfg, TOKEN).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let refused = probe
            .rendezvous
            .join(client::join_request(cfg, 99, 1, "probe"))
            .await
            .expect_err("rank 99 is outside the group");
        let message = refused.message();
        if let Some(at) = message.find("differs from the group's ") {
            let hex = &message[at + "differs from the group's ".len()..][..16];
            return u64::from_str_radix(hex, 16).expect("a hex checksum");
        }
        assert!(message.contains("rank 99"), "{message}");
        assert!(Instant::now() < deadline, "no worker ever joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A join request claiming the replica after `step` with `checksum`, and
/// a receipt no coordinator issued.
fn claiming(
    cfg: &Config,
    rank: i32,
    initial: u64,
    host: &str,
    step: u64,
    checksum: u64,
) -> pb::JoinRequest {
    pb::JoinRequest {
        held: Some(pb::Held {
            step,
            checksum,
            epoch: 0,
            position: step * 8,
            run: cfg.checkpoint.run.clone(),
        }),
        proof: Some(pb::Receipt {
            step,
            checksum,
            tag: vec![7; 32].into(),
        }),
        ..client::join_request(cfg, rank, initial, host)
    }
}

/// Probe 1: on an empty store, a token holder claims the run's last step
/// (with a forged receipt) beside an honest worker holding nothing. The
/// group starts fresh at step 0, nobody is asked for a replica, and its
/// `Finished` without a trained step ends the run as a failure naming it.
#[test]
fn a_claimed_replica_without_evidence_is_ignored_and_never_ends_the_run() {
    const STEPS: u64 = 50;
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(
        coordinator(2, STEPS, out.path()).env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0"),
    );
    let address = address_of(out.path());
    let url = format!("http://{address}");
    let cfg = tiny_config(STEPS, out.path());
    let honest = Running::spawn(worker(&url, STEPS, out.path()).args(["--rank", "0"]));
    let rt = runtime();
    let _intruder = rt.block_on(async {
        let initial = group_checksum(&url, &cfg).await;
        let mut intruder = client::connect(&url, &cfg, TOKEN).await;
        let request = claiming(&cfg, 1, initial, "intruder", STEPS, 0xbad);
        let joined = intruder
            .rendezvous
            .join(request)
            .await
            .unwrap()
            .into_inner();
        let (session, first) = RawSession::open_raw(&mut intruder, &joined).await.unwrap();
        match first {
            Some(coordinator_message::Kind::Start(start)) => {
                assert_eq!(
                    (start.first_step, start.source),
                    (0, pb::Source::Fresh as i32),
                    "{start:?}"
                );
            }
            other => panic!("the intruder was asked {other:?} instead of being started fresh"),
        }
        session
            .send(worker_message::Kind::Finished(pb::Finished {
                steps: STEPS,
            }))
            .await;
        (intruder, session)
    });
    let done = server.wait(LIMIT).assert_failure();
    done.assert_says(&[
        "worker rank 1 (\"intruder\") broke the protocol",
        "a member claims a replica the coordinator has no evidence for",
    ]);
    assert!(
        !done.stderr.contains("training finished"),
        "{}",
        done.stderr
    );
    let honest = honest.wait(LIMIT);
    assert!(
        !honest.stderr.contains("took over the replica"),
        "{}",
        honest.stderr
    );
}

/// Probe 2: two token holders agree on a replica (a quorum of the three
/// places, after an earlier coordinator of the run) and the one asked to
/// send it sends garbage: 1015 random bytes, or a real checkpoint's
/// objects relabelled as the claimed step. The honest receiver refuses it
/// and the run names the sender, never the receiver.
#[test]
fn a_bad_replica_is_blamed_on_its_sender_not_its_receiver() {
    const STEPS: u64 = 50;
    let source = tempfile::tempdir().unwrap();
    run(
        gancluster_tests::tiny_coordinator(1, 2, source.path())
            .args(["--checkpoint-every", "2"])
            .arg("--store")
            .arg(format!("file://{}", source.path().join("store").display())),
        LIMIT,
    )
    .assert_success();
    let relabelled = {
        let rt = runtime();
        rt.block_on(async {
            let cfg = tiny_config(2, source.path());
            let store = common::storage::store::Store::open(&cfg.checkpoint).unwrap();
            let checkpoints =
                common::storage::checkpoint::Checkpoints::new(store, &cfg.checkpoint.run);
            let checkpoint = checkpoints.load(2).await.unwrap();
            let mut objects: Vec<(String, bytes::Bytes)> = Vec::new();
            for name in [
                "generator.mpk",
                "discriminator.mpk",
                "optimizer-g.mpk",
                "optimizer-d.mpk",
            ] {
                let object = checkpoint
                    .object(name)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                objects.push((name.to_string(), object.clone()));
            }
            let mut state: serde_json::Value = serde_json::from_slice(
                checkpoint
                    .object(common::storage::checkpoint::STATE)
                    .unwrap(),
            )
            .unwrap();
            state["step"] = 10.into();
            objects.push((
                common::storage::checkpoint::STATE.to_string(),
                serde_json::to_vec(&state).unwrap().into(),
            ));
            common::protocol::bundle::encode(&objects)
        })
    };
    let random: bytes::Bytes = (0..1015u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for bundle in [random, relabelled] {
        let out = tempfile::tempdir().unwrap();
        // A coordinator of this run came before: its members may hold
        // replicas it has no receipt for.
        let key = out.path().join("store/default/receipt-key");
        std::fs::create_dir_all(key.parent().unwrap()).unwrap();
        std::fs::write(&key, rand::random::<[u8; 32]>()).unwrap();
        let server = Running::spawn(
            coordinator(3, STEPS, out.path()).env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0"),
        );
        let address = address_of(out.path());
        let url = format!("http://{address}");
        let cfg = tiny_config(STEPS, out.path());
        let honest = Running::spawn(worker(&url, STEPS, out.path()).args(["--rank", "2"]));
        let rt = runtime();
        let _intruders = rt.block_on(async {
            let initial = group_checksum(&url, &cfg).await;
            let mut a = client::connect(&url, &cfg, TOKEN).await;
            let mut b = client::connect(&url, &cfg, TOKEN).await;
            let (ja, jb) = tokio::join!(
                a.rendezvous
                    .join(claiming(&cfg, 0, initial, "intruder-a", 10, 0xbad)),
                b.rendezvous
                    .join(claiming(&cfg, 1, initial, "intruder-b", 10, 0xbad)),
            );
            let (ja, jb) = (ja.unwrap().into_inner(), jb.unwrap().into_inner());
            // The other holder waits for its start while the replica travels.
            let other = tokio::spawn(async move {
                let opened = RawSession::open_raw(&mut b, &jb).await;
                (b, opened)
            });
            let (donor, asked) = RawSession::open_raw(&mut a, &ja).await.unwrap();
            match asked {
                Some(coordinator_message::Kind::SendState(ask)) => assert_eq!(ask.step, 10),
                other => panic!("the first holder was asked {other:?} instead of its replica"),
            }
            let total = bundle.len() as u64;
            let size = cfg.allreduce.chunk_bytes;
            let count = bundle.len().div_ceil(size);
            for index in 0..count {
                let data = bundle.slice(index * size..((index + 1) * size).min(bundle.len()));
                let chunk = pb::StateChunk {
                    index: index as u32,
                    count: count as u32,
                    total_bytes: total,
                    data,
                };
                donor.send(worker_message::Kind::State(chunk)).await;
            }
            (a, donor, other)
        });
        let done = server.wait(LIMIT).assert_failure();
        done.assert_says(&["worker rank 0 (\"intruder-a\") sent a bad replica: rank 2 refused it"]);
        assert!(!done.stderr.contains("worker rank 2"), "{}", done.stderr);
        let honest = honest.wait(LIMIT);
        assert!(
            honest
                .stderr
                .contains("refusing the replica another member sent"),
            "{}",
            honest.stderr
        );
    }
}

/// Probe 3: two real workers train in a group of up to three. A joiner
/// with another initial checksum is refused without re-forming the group;
/// one that joins right and hangs up costs no restart (none is allowed);
/// an honest worker without a rank grows the group to three. The
/// survivors keep their places throughout and everyone finishes.
#[test]
fn arrivals_never_evict_survivors_and_a_bad_one_costs_no_restart() {
    const STEPS: u64 = 600;
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(
        coordinator(3, STEPS, out.path())
            .env("GANCLUSTER__COORDINATOR__MIN_WORKERS", "2")
            .env("GANCLUSTER__COORDINATOR__MAX_RESTARTS", "0")
            .env("GANCLUSTER__COORDINATOR__REJOIN_TIMEOUT_S", "2")
            .env("GANCLUSTER__COORDINATOR__HANDSHAKE_TIMEOUT_S", "3")
            .env("GANCLUSTER__COORDINATOR__JOIN_TIMEOUT_S", "10"),
    );
    let address = address_of(out.path());
    let url = format!("http://{address}");
    let cfg = tiny_config(STEPS, out.path());
    let survivor = |rank: &str| {
        Running::spawn(
            worker(&url, STEPS, out.path())
                .args(["--rank", rank])
                .env("GANCLUSTER__COORDINATOR__MIN_WORKERS", "2"),
        )
    };
    let survivors = [survivor("0"), survivor("1")];
    // membership.csv appears once the first generation forms.
    let membership = || -> Vec<(usize, String)> {
        match out.path().join("membership.csv").is_file() {
            true => read_membership(out.path())
                .into_iter()
                .map(|g| (g.workers, g.cause))
                .collect(),
            false => Vec::new(),
        }
    };
    wait_until(LIMIT, "the two workers never formed a group", || {
        (membership().len() == 1).then_some(())
    });
    wait_for_steps(out.path(), 5);
    let rt = runtime();
    rt.block_on(async {
        let initial = group_checksum(&url, &cfg).await;
        let mut wrong = client::connect(&url, &cfg, TOKEN).await;
        let refused = wrong
            .rendezvous
            .join(client::join_request(
                &cfg,
                -1,
                initial ^ 1,
                "wrong-checksum",
            ))
            .await
            .unwrap_err();
        assert!(
            refused.message().contains("initial parameter checksum"),
            "{refused:?}"
        );
        assert_eq!(
            membership().len(),
            1,
            "a refused arrival re-formed the group"
        );
        let mut quitter = client::connect(&url, &cfg, TOKEN).await;
        let join = quitter
            .rendezvous
            .join(client::join_request(&cfg, -1, initial, "quitter"));
        // It hangs up once the group has begun to re-form for it.
        let hung_up = tokio::time::timeout(Duration::from_millis(500), join).await;
        assert!(
            hung_up.is_err() || hung_up.unwrap().is_ok(),
            "the quitter was refused"
        );
    });
    wait_until(
        LIMIT,
        "the group never went on with its two survivors",
        || {
            let members = membership();
            (members.len() >= 2 && members.last().unwrap().0 == 2).then_some(())
        },
    );
    let arrival = Running::spawn(&mut worker(&url, STEPS, out.path()));
    let done = server.wait(LIMIT).assert_success();
    for worker in survivors.into_iter().chain([arrival]) {
        let finished = worker.wait(LIMIT).assert_success();
        assert!(!finished.stderr.contains("is taken"), "{}", finished.stderr);
        assert!(
            !finished.stderr.contains("is kept for"),
            "{}",
            finished.stderr
        );
    }
    let members = membership();
    assert_eq!(members.last().unwrap().0, 3, "{members:?}\n{}", done.stderr);
    assert!(
        members.iter().all(|(_, cause)| cause != "member lost"),
        "{members:?}\n{}",
        done.stderr
    );
    // Only the quitter and the honest worker made the group re-form for
    // them: not the joiners refused for their checksum (nor the probe).
    let arrivals = done
        .stderr
        .lines()
        .filter(|l| l.contains("re-forms to take it in"));
    for arrived in arrivals {
        assert!(
            arrived.contains("host=\"quitter\"") || arrived.contains("host=\"pid "),
            "{arrived}\n{}",
            done.stderr
        );
    }
}

/// A client holding every connection slot turns a worker away at once;
/// the worker says so and keeps trying within its join budget, and joins
/// once the slots free (the coordinator closes silent ones at its
/// handshake deadline).
#[test]
fn a_worker_turned_away_for_want_of_a_slot_retries_and_joins() {
    let out = tempfile::tempdir().unwrap();
    let server = Running::spawn(
        coordinator(1, 3, out.path())
            .env("GANCLUSTER__COORDINATOR__MAX_CONNECTIONS", "2")
            .env("GANCLUSTER__COORDINATOR__HANDSHAKE_TIMEOUT_S", "4"),
    );
    let address = address_of(out.path());
    let hogs: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    let worker = Running::spawn(&mut worker(&format!("http://{address}"), 3, out.path()));
    let finished = worker.wait(LIMIT).assert_success();
    drop(hogs);
    assert!(
        finished.stderr.contains("connection slots may be taken"),
        "{}",
        finished.stderr
    );
    server.wait(LIMIT).assert_success();
}
