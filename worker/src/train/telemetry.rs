//! What a worker tells Prometheus: where its step time goes. Recorded in
//! the training loop and the uploader; free without `--metrics-listen`.

use metrics::{Unit, describe_gauge, describe_histogram};

/// Gives every worker metric its help text, once the exporter is installed.
pub fn describe() {
    describe_gauge!(
        "gancluster_worker_step",
        "Last step this worker trained (0-based)."
    );
    describe_histogram!(
        "gancluster_worker_step_seconds",
        Unit::Seconds,
        "Wall time of one training step, data and all-reduce included."
    );
    describe_histogram!(
        "gancluster_worker_data_wait_seconds",
        Unit::Seconds,
        "Time a step waited for its batch of images."
    );
    describe_histogram!(
        "gancluster_worker_checkpoint_upload_seconds",
        Unit::Seconds,
        "Time to upload one checkpoint (rank 0)."
    );
}
