//! What rank 0 shows in TensorBoard while the group trains: the figures
//! of `losses.csv` and the group's state every `train.log_every` steps,
//! the fixed-noise sample grid at every checkpoint and at the end (so the
//! pictures form a sequence), SWD when it is measured, and the effective
//! configuration. One event file per generation this process is rank 0
//! of, in `<output.dir>/tensorboard/<checkpoint.run>/`, so
//! `tensorboard --logdir runs` compares runs; each file starts at the step
//! its generation starts from, which TensorBoard takes as "the run went
//! back here" (see [`common::tensorboard`]).

use anyhow::Context;
use common::Config;
use common::storage::outputs::TENSORBOARD_DIR;
use common::tensorboard::EventWriter;

use crate::train::output::LossRow;

/// The tag of the sample grid.
const SAMPLES: &str = "samples";

/// Rank 0's event file for one generation.
pub struct Board {
    writer: EventWriter,
    /// The last step whose grid was written.
    grid_at: Option<u64>,
}

/// What the group looked like at a step, besides the loss log's row.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    /// Milliseconds this replica waited for the step's all-reduces.
    pub allreduce_ms: f64,
    /// Members of the generation.
    pub workers: usize,
    /// The generation.
    pub generation: u64,
}

impl Board {
    /// The event file of a generation starting at `first_step`, with the
    /// configuration written at that step; none when `output.tensorboard`
    /// is off.
    pub fn open(cfg: &Config, first_step: u64) -> anyhow::Result<Option<Self>> {
        if !cfg.output.tensorboard {
            return Ok(None);
        }
        let dir = cfg
            .output
            .dir
            .join(TENSORBOARD_DIR)
            .join(&cfg.checkpoint.run);
        let mut writer = EventWriter::create(&dir, first_step)?;
        let toml = cfg
            .to_toml()
            .context("rendering the configuration for TensorBoard")?;
        // Indented: a Markdown code block, as TensorBoard's Text tab renders it.
        let block: String = toml.lines().map(|l| format!("    {l}\n")).collect();
        writer.text(first_step, "config", &block)?;
        Ok(Some(Self {
            writer,
            grid_at: None,
        }))
    }

    /// The figures of `row`'s step.
    pub fn step(&mut self, row: &LossRow, group: Group) -> anyhow::Result<()> {
        self.writer.scalars(
            row.step,
            &[
                ("loss/discriminator", row.d_loss),
                ("loss/generator", row.g_loss),
                ("discriminator/real", row.d_real),
                ("discriminator/fake", row.d_fake),
                ("speed/images_per_s", row.images_per_s as f32),
                ("speed/allreduce_wait_ms", group.allreduce_ms as f32),
                ("group/workers", group.workers as f32),
                ("group/generation", group.generation as f32),
            ],
        )?;
        Ok(())
    }

    /// The sample grid (`png`, `size` pixels) of the state after `step`,
    /// unless that step's grid was already written.
    pub fn samples(&mut self, step: u64, png: Vec<u8>, size: (u32, u32)) -> anyhow::Result<()> {
        if self.grid_at == Some(step) {
            return Ok(());
        }
        self.writer.png(step, SAMPLES, png, size)?;
        self.grid_at = Some(step);
        Ok(())
    }

    /// The SWD of the state after `step`.
    pub fn swd(&mut self, step: u64, mean: f64) -> anyhow::Result<()> {
        self.writer.scalars(step, &[("eval/swd", mean as f32)])?;
        Ok(())
    }
}
