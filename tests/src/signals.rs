//! Signals to other processes: what an operator, a kernel or a broken
//! machine does to a worker or a coordinator.

/// Sends SIGTERM to process `pid`.
pub fn terminate(pid: u32) {
    signal(pid, libc::SIGTERM).unwrap_or_else(|e| panic!("SIGTERM to {pid}: {e}"));
}

/// A process frozen with SIGSTOP: alive, its sockets open, silent — what a
/// hung or partitioned peer looks like. It is continued when the guard
/// drops, so a failing test leaves nothing frozen behind.
pub struct Frozen(u32);

impl Frozen {
    /// Freezes `pid`.
    pub fn stop(pid: u32) -> Self {
        signal(pid, libc::SIGSTOP).unwrap_or_else(|e| panic!("SIGSTOP to {pid}: {e}"));
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Already gone is fine: whoever killed it did the cleanup.
        let _ = signal(self.0, libc::SIGCONT);
    }
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // The state follows the parenthesised command name, which may hold spaces.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
    })
}

/// Sends SIGKILL to process `pid`, as `kill -9` does: no cleanup, no last words.
pub fn kill9(pid: u32) {
    signal(pid, libc::SIGKILL).unwrap_or_else(|e| panic!("SIGKILL to {pid}: {e}"));
}

fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) with a valid signal number has no memory-safety preconditions.
    match unsafe { libc::kill(pid, signal) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The child processes of `pid` (Linux: from /proc), oldest first.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}
