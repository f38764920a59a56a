//! Why a run stops, nested by who must act: a [`GroupFailure`] lies with
//! the workers of one generation (the group re-forms without the member
//! at fault, as its [`Route`] says), the other variants with the settings,
//! the store or the operator.

use std::path::PathBuf;

use common::security::auth::TokenError;
use common::security::tls::TlsError;

/// Why a coordinator run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The group failed through one of its workers.
    #[error(transparent)]
    Group(#[from] GroupFailure),
    /// Not all workers joined in time.
    #[error(
        "only {joined} of {expected} workers joined within {seconds} s (joined: {hosts}; missing ranks: {missing:?}); \
         check that the missing workers are running and can reach this coordinator"
    )]
    JoinTimeout {
        /// Workers expected.
        expected: usize,
        /// Workers that joined.
        joined: usize,
        /// Their hosts, escaped.
        hosts: String,
        /// Ranks nobody took.
        missing: Vec<usize>,
        /// The timeout.
        seconds: u64,
    },
    /// The worker binary is not where local mode looks for it.
    #[error(
        "worker binary not found at {0}: build it with the coordinator (cargo build -p worker) so both sit side by side"
    )]
    WorkerBinary(PathBuf),
    /// Spawning or talking to a local worker process failed.
    #[error("starting worker rank {rank}: {source}")]
    Spawn {
        /// Its rank.
        rank: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// `train.elastic_batch` cannot serve every group size the run allows.
    #[error("{0}")]
    Elastic(String),
    /// External mode needs a shared secret.
    #[error("--external needs a token: set GANCLUSTER_TOKEN for the coordinator and every worker")]
    MissingToken,
    /// The shared secret cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {address}: {source} (set coordinator.listen)")]
    Listen {
        /// The address.
        address: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The local workers' Unix socket could not be created.
    #[error(
        "cannot create the local workers' socket {path}: {source} (it goes in output.dir, \
         --out: check that the folder can be created and written)"
    )]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Saving the effective configuration for the workers failed.
    #[error("writing {path} (in output.dir, --out): {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    /// The checkpoint store failed (unreachable, refused credentials...).
    #[error("checkpoint store: {0}")]
    Store(#[from] common::storage::checkpoint::CheckpointError),
    /// `--fresh` on a run that already has checkpoints.
    #[error(
        "run `{run}` already has {checkpoints} checkpoint(s) in {store}: drop --fresh to resume it, \
         add --force to delete them and start over, or pick another checkpoint.run"
    )]
    RunExists {
        /// Run id.
        run: String,
        /// Where.
        store: String,
        /// How many.
        checkpoints: usize,
    },
    /// `--resume-from` names a checkpoint that cannot be used.
    #[error("--resume-from {name}: {reason}")]
    ResumeFrom {
        /// As given.
        name: String,
        /// Why not.
        reason: String,
    },
    /// The checkpoint belongs to a run with other training settings.
    #[error(
        "checkpoint {checkpoint} was written by a run with other settings ({differences}); \
         use the same settings, another checkpoint.run, or --fresh --force"
    )]
    DifferentRun {
        /// Where the checkpoint is.
        checkpoint: String,
        /// Each differing key.
        differences: String,
    },
    /// The run already reached `train.steps`.
    #[error(
        "the run is already complete: checkpoint {checkpoint} is at step {step} and train.steps is {steps}; \
         raise train.steps (--steps) to train further, or start over with --fresh --force or another checkpoint.run (--run)"
    )]
    AlreadyDone {
        /// The newest checkpoint.
        checkpoint: String,
        /// Its step.
        step: u64,
        /// Configured steps.
        steps: u64,
    },
    /// The last checkpoint of the run could not be written.
    #[error(
        "training reached step {step} but its checkpoint could not be saved: {reason}; \
         the newest committed checkpoint is {committed}"
    )]
    FinalCheckpoint {
        /// Steps done.
        step: u64,
        /// Why.
        reason: String,
        /// What a rerun resumes from.
        committed: String,
    },
    /// Another coordinator holds the output folder or the run.
    #[error(transparent)]
    Lease(#[from] common::storage::lease::LeaseError),
    /// The run's lease was lost mid-run: another coordinator may be writing it.
    #[error("stopped without writing anything more: {0}")]
    LeaseLost(String),
    /// The run's receipt key could not be read or written.
    #[error("the run's receipt key: {0}")]
    ReceiptKey(String),
    /// Stopped by a signal before training finished.
    #[error("interrupted before training finished")]
    Interrupted,
}

impl CoordinatorError {
    /// Whether running the coordinator again cannot get past this: the
    /// settings, the credentials, the run's checkpoints or a worker's own
    /// configuration or data are wrong. A supervisor should not retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Group(failure) => !failure.restartable(),
            Self::Store(common::storage::checkpoint::CheckpointError::Store(store)) => {
                store.is_permanent()
            }
            Self::MissingToken
            | Self::Token(_)
            | Self::Tls(_)
            | Self::WorkerBinary(_)
            | Self::RunExists { .. }
            | Self::ResumeFrom { .. }
            | Self::DifferentRun { .. } => true,
            _ => false,
        }
    }
}

/// A member of the group failed it. Each names the rank at fault (and
/// the host it joined from, escaped), never another member.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupFailure {
    /// A worker's stream ended, broke or fell silent before it finished.
    #[error("worker rank {rank} was lost during training: {reason}")]
    WorkerLost {
        /// Its rank.
        rank: usize,
        /// What happened.
        reason: String,
    },
    /// A worker said why it cannot go on.
    #[error("worker rank {rank} ({host}) failed: {reason}")]
    WorkerFailed {
        /// Its rank.
        rank: usize,
        /// The host it joined from, escaped.
        host: String,
        /// Its own message, escaped.
        reason: String,
        /// Whether a restart would meet the same failure.
        permanent: bool,
    },
    /// A locally launched worker process exited with an error.
    #[error("worker rank {rank} exited with {status}: {last_words}")]
    WorkerExited {
        /// Its rank.
        rank: usize,
        /// The exit status.
        status: String,
        /// Its last error line, or where to look for it.
        last_words: String,
        /// It exited with the "cannot be fixed by running again" status.
        permanent: bool,
    },
    /// Members joined but did not open their session in time.
    #[error(
        "worker rank(s) {ranks:?} (hosts {hosts}) joined but did not open their session within \
         {seconds} s (coordinator.handshake_timeout_s): they crashed or lost their connection \
         right after joining"
    )]
    NoSession {
        /// The ranks without a session.
        ranks: Vec<usize>,
        /// Their hosts, escaped.
        hosts: String,
        /// The deadline.
        seconds: u64,
    },
    /// No step completed within the step timeout, though every worker
    /// still heartbeats: a training thread hangs.
    #[error(
        "no step completed for {seconds} s after {done} steps (coordinator.step_timeout_s): {waiting}; \
         a worker's training is stuck (a hung GPU, a deadlock) while its process still heartbeats \
         (raise coordinator.step_timeout_s if steps are really this slow)"
    )]
    Stalled {
        /// The timeout.
        seconds: u64,
        /// Steps completed so far.
        done: u64,
        /// What the all-reduce waits for.
        waiting: String,
        /// The ranks holding it up (every rank when none can be told apart).
        ranks: Vec<usize>,
    },
    /// Replicas no longer hold identical parameters.
    #[error("{0}")]
    Diverged(#[from] crate::generation::reports::Divergence),
    /// A worker broke the protocol (bad chunk, wrong step...).
    #[error("worker rank {rank} ({host}) broke the protocol: {message}")]
    Protocol {
        /// Its rank.
        rank: usize,
        /// The host it joined from, escaped.
        host: String,
        /// What was wrong.
        message: String,
    },
    /// The replica a member sent was refused by a member it was sent to:
    /// malformed, or not the replica its sender claimed to hold.
    #[error(
        "worker rank {donor} ({host}) sent a bad replica: rank {receiver} refused it: {reason} \
         (the group re-forms without the sender)"
    )]
    BadReplica {
        /// The sender, at fault.
        donor: usize,
        /// Its host, escaped.
        host: String,
        /// The member that refused it.
        receiver: usize,
        /// Why, in the receiver's words, escaped.
        reason: String,
    },
    /// Gradients held NaN or Inf and `allreduce.nonfinite` is `halt`.
    #[error(
        "the {net:?} gradient of step {step} is not finite: {culprits} (allreduce.nonfinite = halt). \
         Training has diverged or a device is faulty: lower train.lr, resume from an earlier \
         checkpoint (--resume-from), or set allreduce.nonfinite = \"skip\" to skip such steps"
    )]
    NonFinite {
        /// The step.
        step: u64,
        /// Which network's gradient.
        net: common::protocol::pb::Net,
        /// Who sent NaN/Inf, or that the sum overflowed.
        culprits: String,
    },
}

/// How the group gets past a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// It re-forms without these ranks (replaced in local mode); the others'
    /// replicas carry on.
    Drop(Vec<usize>),
    /// It re-forms with everyone from the newest checkpoint: no replica can
    /// be trusted.
    Restart,
    /// Nothing can: a run of the same state meets it again.
    Fatal,
}

impl GroupFailure {
    /// How the group gets past this. A non-finite gradient comes back at
    /// the same step (the replay is exact), and so does a worker's own
    /// permanent failure (its configuration, its data).
    pub fn route(&self) -> Route {
        match self {
            Self::NonFinite { .. } => Route::Fatal,
            Self::WorkerFailed {
                permanent: true, ..
            }
            | Self::WorkerExited {
                permanent: true, ..
            } => Route::Fatal,
            Self::WorkerLost { rank, .. }
            | Self::WorkerFailed { rank, .. }
            | Self::WorkerExited { rank, .. }
            | Self::Protocol { rank, .. }
            | Self::BadReplica { donor: rank, .. } => Route::Drop(vec![*rank]),
            Self::NoSession { ranks, .. } | Self::Stalled { ranks, .. } => {
                Route::Drop(ranks.clone())
            }
            Self::Diverged(_) => Route::Restart,
        }
    }

    /// Whether re-forming the group may get past this.
    pub fn restartable(&self) -> bool {
        self.route() != Route::Fatal
    }

    /// The same failure of the process in a place, told as the failure of
    /// the rank that place has in the current generation.
    pub fn of_rank(self, rank: usize) -> Self {
        match self {
            Self::WorkerExited {
                status,
                last_words,
                permanent,
                ..
            } => Self::WorkerExited {
                rank,
                status,
                last_words,
                permanent,
            },
            other => other,
        }
    }
}
