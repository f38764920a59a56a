//! The run as Prometheus sees it. Every function records into the
//! process-wide recorder that `--metrics-listen` installs, and costs
//! nothing without it.
//!
//! Names follow Prometheus' conventions (base units, `_total` counters);
//! docs/operations.md's metrics table says what each means.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::generation::reports::StepSummary;

/// Gives every metric its help text (Prometheus' `# HELP`), once the
/// exporter is installed.
pub fn describe() {
    describe_gauge!(
        "gancluster_step",
        "Last step every worker finished and reported (0-based)."
    );
    describe_gauge!("gancluster_epoch", "Epoch of the last step.");
    describe_gauge!(
        "gancluster_images_per_second",
        Unit::CountPerSecond,
        "Images trained per second over all workers, last step."
    );
    describe_gauge!(
        "gancluster_discriminator_loss",
        "Rank 0's discriminator loss, last step."
    );
    describe_gauge!(
        "gancluster_generator_loss",
        "Rank 0's generator loss, last step."
    );
    describe_histogram!(
        "gancluster_allreduce_seconds",
        Unit::Seconds,
        "Slowest worker's wait for the all-reduce, per step."
    );
    describe_counter!(
        "gancluster_steps_total",
        "Steps completed by the group since this coordinator started."
    );
    describe_gauge!(
        "gancluster_generation",
        "Generation of the group (one more each time it re-forms)."
    );
    describe_gauge!(
        "gancluster_workers",
        "Live members of the group (0 while it re-forms)."
    );
    describe_counter!(
        "gancluster_regroups_total",
        "Times the group re-formed (a worker lost or gained, a restart)."
    );
    describe_gauge!(
        "gancluster_checkpoint_step",
        "Step of the newest committed checkpoint."
    );
    describe_gauge!(
        "gancluster_checkpoint_timestamp_seconds",
        Unit::Seconds,
        "When the newest checkpoint was committed (Unix time)."
    );
    describe_gauge!(
        "gancluster_checkpoint_age_seconds",
        Unit::Seconds,
        "Seconds since the newest checkpoint, as of the last step."
    );
    describe_counter!(
        "gancluster_allreduce_bytes_total",
        Unit::Bytes,
        "Gradient bytes received from (in) and sent to (out) the workers."
    );
}

/// A step every rank finished and reported.
pub fn step(s: &StepSummary) {
    gauge!("gancluster_step").set(s.step as f64);
    gauge!("gancluster_epoch").set(s.epoch as f64);
    gauge!("gancluster_images_per_second").set(s.images_per_s);
    gauge!("gancluster_discriminator_loss").set(f64::from(s.d_loss));
    gauge!("gancluster_generator_loss").set(f64::from(s.g_loss));
    histogram!("gancluster_allreduce_seconds").record(s.allreduce_ms / 1e3);
    counter!("gancluster_steps_total").increment(1);
    let at = f64::from_bits(CHECKPOINT_AT.load(Ordering::Relaxed));
    if at > 0.0 {
        gauge!("gancluster_checkpoint_age_seconds").set(unix_now() - at);
    }
}

/// A generation formed with `workers` members.
pub fn formed(generation: u64, workers: usize) {
    gauge!("gancluster_generation").set(generation as f64);
    gauge!("gancluster_workers").set(workers as f64);
}

/// The group lost or gained a member and re-forms.
pub fn regrouped() {
    counter!("gancluster_regroups_total").increment(1);
    gauge!("gancluster_workers").set(0.0);
}

/// Checkpoint `step` was committed.
pub fn checkpoint(step: u64) {
    let now = unix_now();
    CHECKPOINT_AT.store(now.to_bits(), Ordering::Relaxed);
    gauge!("gancluster_checkpoint_step").set(step as f64);
    gauge!("gancluster_checkpoint_timestamp_seconds").set(now);
    gauge!("gancluster_checkpoint_age_seconds").set(0.0);
}

/// One chunk reduced: `received` bytes from the members, `sent` back.
pub fn reduced(received: usize, sent: usize) {
    counter!("gancluster_allreduce_bytes_total", "direction" => "in").increment(received as u64);
    counter!("gancluster_allreduce_bytes_total", "direction" => "out").increment(sent as u64);
}

/// When the newest checkpoint was committed (Unix seconds as f64 bits; 0:
/// none yet), so that each step can update its age.
static CHECKPOINT_AT: AtomicU64 = AtomicU64::new(0);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
