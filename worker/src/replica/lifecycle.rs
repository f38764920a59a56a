//! The rules of a distributed worker's life, without sockets or clocks of
//! its own: when to join again, how long to wait, when to give up.
//!
//! A worker is in one of three phases. **Starting**: it has never been in a
//! group, so a coordinator that does not answer is one still coming up
//! (pods start in any order) or one with no free slot; it tries again for
//! `coordinator.join_timeout_s`, and every few seconds looks in the store
//! whether the run is already complete (a pod restarted after its
//! coordinator finished must not wait for one). **Member**: it is in a
//! group, or between two generations of it. **Orphaned**: the coordinator it
//! trained with is gone; it holds its replica and tries to reach one again,
//! with backoff, for `coordinator.reconnect_timeout_s`.
//!
//! The driver (`driver.rs`) does the effects (connect, train, sleep,
//! look in the store) and tells the [`Lifecycle`] what happened, with the
//! time; the lifecycle answers with what to do [`Next`]. Why a generation
//! ended is typed ([`Ended`]), taken from the session error where it
//! happened, never recovered from an error chain afterwards.

use std::time::{Duration, Instant};

use common::Config;
use common::client::SessionError;

/// How often a worker that finds no coordinator looks whether the run is
/// already complete.
pub const STORE_RECHECK: Duration = Duration::from_secs(5);

/// Waits between attempts to reach a coordinator that is still starting.
const NOT_UP_RETRY: Duration = Duration::from_millis(200);

/// Waits between attempts to join a coordinator that turned this worker
/// away (every connection slot taken).
const TURNED_AWAY_RETRY: Duration = Duration::from_secs(1);

/// Why an attempt to join failed, as far as the lifecycle cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinFailure {
    /// The group re-formed again before this generation started.
    Regroup,
    /// Nothing listens at the address yet.
    NotUp,
    /// The coordinator closed the connection before answering: no free slot.
    TurnedAway,
    /// The coordinator is gone or not answering (and may come back).
    Lost,
    /// Trying again cannot help (a refusal, a protocol violation).
    Fatal,
}

impl JoinFailure {
    /// The kind of `err`.
    pub fn of(err: &SessionError) -> Self {
        match err {
            SessionError::Regroup(_) => Self::Regroup,
            SessionError::TurnedAway(_) => Self::TurnedAway,
            e if e.is_not_listening() => Self::NotUp,
            e if e.is_transient() => Self::Lost,
            _ => Self::Fatal,
        }
    }
}

/// Why a generation ended for this worker, short of finishing the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The coordinator re-forms the group: join the next generation.
    Regroup,
    /// The coordinator is gone (its stream broke, it stopped answering).
    CoordinatorLost,
    /// This worker cannot go on.
    Failed,
}

impl Ended {
    /// What a failed session call means for the generation.
    pub fn of(err: &SessionError) -> Self {
        match err {
            SessionError::Regroup(_) => Self::Regroup,
            e if e.is_transient() => Self::CoordinatorLost,
            _ => Self::Failed,
        }
    }
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Join (again) now.
    Join,
    /// Wait, then join again.
    Retry(Duration),
    /// Look in the store whether the run is complete, then tell
    /// [`Lifecycle::store_says`].
    LookInStore,
    /// Stop trying.
    Stop(Stop),
}

/// Why a worker stops trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The run is complete in the store and no coordinator answers.
    Complete,
    /// No coordinator came up within `coordinator.join_timeout_s`.
    NeverCameUp {
        /// The timeout, in seconds.
        seconds: u64,
    },
    /// The coordinator stayed away for `coordinator.reconnect_timeout_s`.
    GaveUp {
        /// The timeout, in seconds.
        seconds: u64,
    },
    /// A failure trying again cannot mend.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Never in a group: `since` the first failed try, the store last
    /// looked at `looked`, `pending` the failure waiting for the store's answer.
    Starting {
        since: Option<Instant>,
        looked: Option<Instant>,
        pending: Option<JoinFailure>,
    },
    /// In a group, or between its generations.
    Member,
    /// The coordinator is gone `since`.
    Orphaned { since: Instant },
}

/// A distributed worker's phase and the timeouts that bound it.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    join_timeout: Duration,
    reconnect_timeout: Duration,
}

impl Lifecycle {
    /// A worker that has not tried to join yet, with `cfg`'s timeouts.
    pub fn new(cfg: &Config) -> Self {
        Self {
            phase: Phase::Starting {
                since: None,
                looked: None,
                pending: None,
            },
            join_timeout: Duration::from_secs(cfg.coordinator.join_timeout_s),
            reconnect_timeout: Duration::from_secs(cfg.coordinator.reconnect_timeout_s),
        }
    }

    /// Whether this worker has been in a group (the coordinator it waits
    /// for is one that went away, not one still starting).
    pub fn joined_once(&self) -> bool {
        !matches!(self.phase, Phase::Starting { .. })
    }

    /// It joined a generation.
    pub fn joined(&mut self) {
        self.phase = Phase::Member;
    }

    /// An attempt to join failed at `now`.
    pub fn join_failed(&mut self, failure: JoinFailure, now: Instant) -> Next {
        match (self.phase, failure) {
            (_, JoinFailure::Regroup) => Next::Join,
            (_, JoinFailure::Fatal) => Next::Stop(Stop::Failed),
            (
                Phase::Starting {
                    since,
                    looked,
                    pending: _,
                },
                JoinFailure::NotUp | JoinFailure::TurnedAway,
            ) => {
                let since = since.unwrap_or(now);
                let due = looked.is_none_or(|at| now.duration_since(at) >= STORE_RECHECK);
                self.phase = Phase::Starting {
                    since: Some(since),
                    looked: if due { Some(now) } else { looked },
                    pending: Some(failure),
                };
                match due {
                    true => Next::LookInStore,
                    false => self.wait_for_start(now),
                }
            }
            // A coordinator that answered badly before this worker was
            // ever in a group is not one to wait for.
            (Phase::Starting { .. }, JoinFailure::Lost) => Next::Stop(Stop::Failed),
            (Phase::Member | Phase::Orphaned { .. }, _) => {
                let since = self.orphaned(now);
                match self.waited_out(since, now) {
                    Some(stop) => Next::Stop(stop),
                    None => Next::Retry(backoff(now.duration_since(since))),
                }
            }
        }
    }

    /// The store's answer to [`Next::LookInStore`] at `now`: whether the
    /// run is complete there.
    pub fn store_says(&mut self, complete: bool, now: Instant) -> Next {
        match complete {
            true => Next::Stop(Stop::Complete),
            false => self.wait_for_start(now),
        }
    }

    /// A generation ended at `now`, for the reason `ended`.
    pub fn generation_ended(&mut self, ended: Ended, now: Instant) -> Next {
        match ended {
            Ended::Regroup => Next::Join,
            Ended::Failed => Next::Stop(Stop::Failed),
            Ended::CoordinatorLost => {
                let since = self.orphaned(now);
                match self.waited_out(since, now) {
                    Some(stop) => Next::Stop(stop),
                    None => Next::Join,
                }
            }
        }
    }

    /// Retry or give up while Starting, after the failure that is pending.
    fn wait_for_start(&self, now: Instant) -> Next {
        let Phase::Starting {
            since: Some(since),
            pending,
            ..
        } = self.phase
        else {
            return Next::Join;
        };
        if now.duration_since(since) >= self.join_timeout {
            return Next::Stop(Stop::NeverCameUp {
                seconds: self.join_timeout.as_secs(),
            });
        }
        Next::Retry(match pending {
            Some(JoinFailure::TurnedAway) => TURNED_AWAY_RETRY,
            _ => NOT_UP_RETRY,
        })
    }

    /// Since when the coordinator has been gone (from `now` on, if it was not yet).
    fn orphaned(&mut self, now: Instant) -> Instant {
        let since = match self.phase {
            Phase::Orphaned { since } => since,
            _ => now,
        };
        self.phase = Phase::Orphaned { since };
        since
    }

    /// Whether a coordinator gone `since` has been waited for long enough.
    fn waited_out(&self, since: Instant, now: Instant) -> Option<Stop> {
        (now.duration_since(since) >= self.reconnect_timeout).then_some(Stop::GaveUp {
            seconds: self.reconnect_timeout.as_secs(),
        })
    }
}

/// Waits between attempts to reach a lost coordinator: 0.5 s, growing with
/// the time it has been gone to at most 10 s.
fn backoff(gone: Duration) -> Duration {
    Duration::from_millis(500)
        .max(gone / 4)
        .min(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle(join_timeout_s: u64, reconnect_timeout_s: u64) -> Lifecycle {
        let mut cfg = Config::default();
        cfg.coordinator.join_timeout_s = join_timeout_s;
        cfg.coordinator.reconnect_timeout_s = reconnect_timeout_s;
        Lifecycle::new(&cfg)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_starting_worker_looks_in_the_store_first_then_every_few_seconds() {
        let t0 = Instant::now();
        let mut life = lifecycle(60, 30);
        assert_eq!(life.join_failed(JoinFailure::NotUp, t0), Next::LookInStore);
        assert_eq!(life.store_says(false, t0), Next::Retry(NOT_UP_RETRY));
        let soon = t0 + Duration::from_millis(200);
        assert_eq!(
            life.join_failed(JoinFailure::NotUp, soon),
            Next::Retry(NOT_UP_RETRY)
        );
        assert_eq!(
            life.join_failed(JoinFailure::TurnedAway, t0 + secs(4)),
            Next::Retry(TURNED_AWAY_RETRY)
        );
        let later = t0 + STORE_RECHECK;
        assert_eq!(
            life.join_failed(JoinFailure::NotUp, later),
            Next::LookInStore
        );
        assert_eq!(life.store_says(true, later), Next::Stop(Stop::Complete));
        assert!(!life.joined_once());
    }

    #[test]
    fn a_coordinator_that_never_comes_up_ends_the_wait_at_the_join_timeout() {
        let t0 = Instant::now();
        let mut life = lifecycle(10, 30);
        assert_eq!(life.join_failed(JoinFailure::NotUp, t0), Next::LookInStore);
        assert_eq!(life.store_says(false, t0), Next::Retry(NOT_UP_RETRY));
        assert_eq!(
            life.join_failed(JoinFailure::NotUp, t0 + secs(9)),
            Next::LookInStore
        );
        assert_eq!(
            life.store_says(false, t0 + secs(9)),
            Next::Retry(NOT_UP_RETRY)
        );
        // The timeout counts from the first failure, not the last look.
        assert_eq!(
            life.join_failed(JoinFailure::TurnedAway, t0 + secs(10)),
            Next::Stop(Stop::NeverCameUp { seconds: 10 })
        );
    }

    #[test]
    fn before_a_first_group_a_lost_or_refused_join_is_not_waited_for() {
        let t0 = Instant::now();
        assert_eq!(
            lifecycle(60, 30).join_failed(JoinFailure::Lost, t0),
            Next::Stop(Stop::Failed)
        );
        assert_eq!(
            lifecycle(60, 30).join_failed(JoinFailure::Fatal, t0),
            Next::Stop(Stop::Failed)
        );
        assert_eq!(
            lifecycle(60, 30).join_failed(JoinFailure::Regroup, t0),
            Next::Join
        );
    }

    #[test]
    fn a_member_whose_coordinator_is_gone_backs_off_and_gives_up_at_the_reconnect_timeout() {
        let t0 = Instant::now();
        let mut life = lifecycle(60, 30);
        life.joined();
        assert!(life.joined_once());
        assert_eq!(
            life.generation_ended(Ended::CoordinatorLost, t0),
            Next::Join
        );
        // Connection refused or no slot counts as gone once it was a member.
        assert_eq!(
            life.join_failed(JoinFailure::NotUp, t0 + secs(1)),
            Next::Retry(Duration::from_millis(500))
        );
        assert_eq!(
            life.join_failed(JoinFailure::Lost, t0 + secs(20)),
            Next::Retry(secs(5))
        );
        assert_eq!(
            life.join_failed(JoinFailure::TurnedAway, t0 + secs(30)),
            Next::Stop(Stop::GaveUp { seconds: 30 })
        );
    }

    #[test]
    fn backoff_grows_with_the_absence_and_is_capped() {
        assert_eq!(backoff(Duration::ZERO), Duration::from_millis(500));
        assert_eq!(backoff(secs(8)), secs(2));
        assert_eq!(backoff(secs(3600)), secs(10));
    }

    #[test]
    fn joining_again_restarts_the_reconnect_clock() {
        let t0 = Instant::now();
        let mut life = lifecycle(60, 30);
        life.joined();
        assert_eq!(
            life.join_failed(JoinFailure::Lost, t0),
            Next::Retry(backoff(Duration::ZERO))
        );
        life.joined();
        // 40 s after the first loss, but only just lost again.
        assert_eq!(
            life.generation_ended(Ended::CoordinatorLost, t0 + secs(40)),
            Next::Join
        );
        assert_eq!(
            life.join_failed(JoinFailure::Lost, t0 + secs(68)),
            Next::Retry(secs(7))
        );
        assert_eq!(
            life.generation_ended(Ended::CoordinatorLost, t0 + secs(70)),
            Next::Stop(Stop::GaveUp { seconds: 30 })
        );
    }

    #[test]
    fn a_regroup_joins_at_once_and_a_failure_stops() {
        let now = Instant::now();
        let mut life = lifecycle(60, 30);
        life.joined();
        assert_eq!(life.generation_ended(Ended::Regroup, now), Next::Join);
        assert_eq!(
            life.generation_ended(Ended::Failed, now),
            Next::Stop(Stop::Failed)
        );
    }

    #[test]
    fn session_errors_are_sorted_into_what_the_lifecycle_does_with_them() {
        assert_eq!(
            JoinFailure::of(&SessionError::Regroup("x".into())),
            JoinFailure::Regroup
        );
        assert_eq!(
            JoinFailure::of(&SessionError::TurnedAway("eof".into())),
            JoinFailure::TurnedAway
        );
        assert_eq!(JoinFailure::of(&SessionError::Closed), JoinFailure::Lost);
        assert_eq!(
            JoinFailure::of(&SessionError::Protocol("x".into())),
            JoinFailure::Fatal
        );
        assert_eq!(
            Ended::of(&SessionError::Regroup("x".into())),
            Ended::Regroup
        );
        assert_eq!(
            Ended::of(&SessionError::Disconnected("reset".into())),
            Ended::CoordinatorLost
        );
        assert_eq!(
            Ended::of(&SessionError::Aborted("diverged".into())),
            Ended::Failed
        );
    }
}
