//! Files the coordinator writes next to the run's outputs.

use std::io::Write;
use std::path::PathBuf;

use common::Config;
use common::storage::outputs::{ADDRESS_FILE, CONFIG_TOML, MEMBERSHIP_CSV};

use crate::CoordinatorError;
use crate::generation::origin::Start;

/// `membership.csv`: one row per generation (when it started, with how
/// many workers, from what state, how many steps it trained again, and
/// why it formed). What a reproduction of an elastic run needs, and
/// what the reliability tests read.
pub struct Membership {
    path: PathBuf,
}

impl Membership {
    /// The record in `cfg.output.dir`: started afresh for a `fresh`
    /// run, else continued (a restarted coordinator's generations
    /// follow its predecessor's, numbered from 1 again with cause
    /// `start`).
    pub fn open(cfg: &Config, fresh: bool) -> Result<Self, CoordinatorError> {
        let header = "generation,first_step,workers,state,steps_retrained,cause\n";
        let path = cfg.output.dir.join(MEMBERSHIP_CSV);
        if fresh || !path.is_file() {
            write(cfg, MEMBERSHIP_CSV, header)?;
        }
        Ok(Self { path })
    }

    /// Appends generation `generation` of `world` workers starting as
    /// `plan` says, formed because of `cause`. A record that cannot be
    /// written is logged, never a reason to stop training.
    pub fn record(&self, generation: u64, world: usize, plan: &Start, cause: &str) {
        let row = format!(
            "{generation},{},{world},{},{},{cause}\n",
            plan.first_step,
            plan.describe(),
            plan.retrained
        );
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(row.as_bytes()));
        if let Err(error) = appended {
            tracing::warn!(path = %self.path.display(), %error, "could not record the generation");
        }
    }
}

/// Writes the bound address to [`ADDRESS_FILE`], so scripts and tests
/// that bind port 0 can find the coordinator.
pub fn publish_address(
    cfg: &Config,
    address: std::net::SocketAddr,
) -> Result<(), CoordinatorError> {
    write(cfg, ADDRESS_FILE, &address.to_string()).map(|_| ())
}

/// Saves the effective configuration where the local workers read it.
pub fn save_config(cfg: &Config) -> Result<PathBuf, CoordinatorError> {
    let text = cfg.to_toml().map_err(|e| CoordinatorError::Output {
        path: cfg.output.dir.join(CONFIG_TOML),
        source: std::io::Error::other(e),
    })?;
    write(cfg, CONFIG_TOML, &text)
}

/// Writes `name` in the output folder atomically (a partial file renamed
/// into place), so a process reading it never sees half of it.
fn write(cfg: &Config, name: &str, contents: &str) -> Result<PathBuf, CoordinatorError> {
    let dir = &cfg.output.dir;
    let path = dir.join(name);
    let partial = dir.join(format!("{name}.partial"));
    let io = |source| CoordinatorError::Output {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(&partial, contents).map_err(io)?;
    std::fs::rename(&partial, &path).map_err(io)?;
    Ok(path)
}
