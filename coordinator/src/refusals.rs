//! Logging refused connections and requests without letting a stranger
//! flood the log.
//!
//! A refusal is worth a line (someone has the wrong token, a worker is
//! misconfigured), but 200 wrong-token tries in a tenth of a second must not
//! become 200 lines. At most [`PER_WINDOW`] refusals are logged per
//! [`WINDOW`]; the rest are counted and reported in one line when the next
//! window opens. Peer text in the reason is escaped by the caller.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

/// Refusals logged per window.
pub const PER_WINDOW: u32 = 10;

/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// A rate-limited refusal log.
#[derive(Default)]
pub struct Refusals {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Refusals {
    /// Logs that `peer` was refused because `reason`, unless the window's
    /// share is used up. Returns whether it was logged.
    pub fn record(&self, peer: &str, reason: &str) -> bool {
        let now = Instant::now();
        let mut state = self.state.lock().expect("refusals lock");
        if state.started.is_none_or(|started| now - started >= WINDOW) {
            if state.suppressed > 0 {
                warn!(
                    suppressed = state.suppressed,
                    "more refusals were not logged in the last {} s",
                    WINDOW.as_secs()
                );
            }
            *state = State {
                started: Some(now),
                ..State::default()
            };
        }
        if state.logged >= PER_WINDOW {
            state.suppressed += 1;
            return false;
        }
        state.logged += 1;
        let last = state.logged == PER_WINDOW;
        drop(state);
        warn!(%peer, %reason, "refused");
        if last {
            warn!(
                "{PER_WINDOW} refusals logged in this window; further ones are counted until {} s have passed",
                WINDOW.as_secs()
            );
        }
        true
    }

    /// Refusals not logged in the current window.
    #[cfg(test)]
    pub fn suppressed(&self) -> u64 {
        self.state.lock().expect("refusals lock").suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_logged_up_to_the_window_share_and_counted_beyond() {
        let refusals = Refusals::default();
        let logged = (0..200)
            .filter(|_| refusals.record("10.0.0.9:4000", "wrong or missing token"))
            .count();
        assert_eq!(logged, PER_WINDOW as usize);
        assert_eq!(refusals.suppressed(), 200 - u64::from(PER_WINDOW));
    }
}
