//! A child under a pseudo-terminal, with its screen as a person would see
//! it: everything it writes goes through a terminal emulator (vt100), so a
//! progress bar's redraws, cursor moves and line wraps end up where a
//! terminal would put them.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use wait_timeout::ChildExt;

/// A child whose stdin, stdout and stderr are one terminal of `rows` × `cols`.
pub struct Terminal {
    child: Child,
    screen: Arc<Mutex<vt100::Parser>>,
    reader: Option<JoinHandle<()>>,
}

impl Terminal {
    /// Starts `command` on a fresh pseudo-terminal.
    pub fn spawn(command: &mut Command, rows: u16, cols: u16) -> Self {
        let (master, slave) = open(rows, cols);
        let stdio = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("duplicating the terminal"));
        let child = command
            .env("TERM", "xterm-256color")
            .env("COLUMNS", cols.to_string())
            .stdin(stdio(&slave))
            .stdout(stdio(&slave))
            .stderr(stdio(&slave))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        drop(slave);
        let size = |n: u16| std::num::NonZeroU16::new(n).expect("a terminal has rows and columns");
        let screen = Arc::new(Mutex::new(vt100::Parser::new(size(rows), size(cols), 0)));
        let feed = screen.clone();
        let reader = std::thread::spawn(move || {
            let mut master = File::from(master);
            let mut buffer = [0u8; 8192];
            // Ends with EIO once the child and its children closed the terminal.
            while let Ok(n @ 1..) = master.read(&mut buffer) {
                feed.lock().expect("screen lock").process(&buffer[..n]);
            }
        });
        Self {
            child,
            screen,
            reader: Some(reader),
        }
    }

    /// The visible screen now, one string per row, trailing blanks trimmed.
    pub fn screen(&self) -> Vec<String> {
        let parser = self.screen.lock().expect("screen lock");
        let screen = parser.screen();
        let (_, cols) = screen.size();
        screen
            .rows(0, cols.get())
            .map(|row| row.trim_end().to_string())
            .collect()
    }

    /// Waits at most `limit` for the child to exit, then returns its status
    /// and its last screen; on timeout it is killed and the test fails.
    pub fn wait(mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let status = self
            .child
            .wait_timeout(limit)
            .expect("waiting for the child");
        let Some(status) = status else {
            let screen = self.screen().join("\n");
            panic!("child did not finish within {limit:?}; its screen:\n{screen}");
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status, self.screen())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pseudo-terminal pair of the given size.
fn open(rows: u16, cols: u16) -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the integers we pass and
    // reads the window size; no name buffer or termios is given.
    let done = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(done, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}
