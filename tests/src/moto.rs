//! moto's S3 server: the test S3 server whose conditional PUT
//! (`If-None-Match: *`, `If-Match`) is atomic, as AWS's is, which the
//! run-lease tests need. (s3s-fs accepts the headers but does not make the
//! check and the write one step.) moto is Python, installed by the first
//! test that needs it ([`crate::python`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_until;

/// The bucket every moto server gets.
pub const BUCKET: &str = "leases";

/// The moto release the tests were written against.
const MOTO: &str = "moto[server]==5.2.1";

/// A folder on `PYTHONPATH` from which `python3` imports moto, installing
/// it there first when it cannot.
fn moto_path() -> std::path::PathBuf {
    crate::python::tool_path("moto", "moto.server", MOTO)
}

/// A running `moto_server`; killed when dropped.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Starts moto on a free port and creates [`BUCKET`], installing moto
    /// first when `python3` cannot import it; panics saying why when that fails.
    pub fn start() -> Self {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("its address").port()
        };
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", moto_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed to run moto");
        let mut moto = Self { child, port };
        let what = "moto's S3 server did not start";
        wait_until(Duration::from_secs(60), what, || {
            if let Ok(Some(status)) = moto.child.try_wait() {
                panic!("{what} (python3 -m moto.server exited with {status})");
            }
            TcpStream::connect(("127.0.0.1", moto.port)).ok()
        });
        moto.request(&format!("PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"));
        moto
    }

    /// `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points a gancluster binary's store at this
    /// server (`checkpoint.store` still names the bucket and prefix).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GANCLUSTER__CHECKPOINT__S3__ENDPOINT", self.endpoint()),
            ("GANCLUSTER__CHECKPOINT__S3__ALLOW_HTTP", "true".into()),
            ("GANCLUSTER__CHECKPOINT__S3__ACCESS_KEY_ID", "moto".into()),
            (
                "GANCLUSTER__CHECKPOINT__S3__SECRET_ACCESS_KEY",
                "moto-secret".into(),
            ),
        ]
    }

    fn request(&mut self, raw: &str) {
        let mut socket = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting to moto");
        socket.write_all(raw.as_bytes()).expect("writing to moto");
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "moto answered:\n{answer}"
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
