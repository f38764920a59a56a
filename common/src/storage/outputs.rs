//! The names of what a run leaves in its output folder (`output.dir`), in
//! one place: the coordinator, the workers, the summary and the tests'
//! expectations all refer to these, so a rename cannot leave one behind.
//!
//! ```text
//! <output.dir>/config.toml        the effective configuration (no secrets)
//! <output.dir>/losses.csv         one row per step from step 0 (rank 0)
//! <output.dir>/loss.png           D and G loss curves
//! <output.dir>/samples.png        8×8 grid from the fixed grid noise
//! <output.dir>/membership.csv     one row per generation (coordinator)
//! <output.dir>/coordinator.addr   the bound address, for port 0
//! <output.dir>/logs/              one log per process
//! <output.dir>/tensorboard/<run>/ TensorBoard event files (rank 0)
//! ```

/// The effective configuration, where local workers read it.
pub const CONFIG_TOML: &str = "config.toml";
/// The loss history from step 0, so a resumed run's log is complete.
pub const LOSSES_CSV: &str = "losses.csv";
/// D and G loss curves from step 0.
pub const LOSS_PNG: &str = "loss.png";
/// 8×8 grid of samples from the fixed grid noise.
pub const SAMPLES_PNG: &str = "samples.png";
/// One row per generation of the run.
pub const MEMBERSHIP_CSV: &str = "membership.csv";
/// The coordinator's bound address, for scripts and tests that bind port 0.
pub const ADDRESS_FILE: &str = "coordinator.addr";
/// The folder of per-process logs.
pub const LOGS_DIR: &str = "logs";
/// The folder of TensorBoard runs, one per run id.
pub const TENSORBOARD_DIR: &str = "tensorboard";
