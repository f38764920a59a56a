//! What both networks all-reduce, known from the configuration before any
//! worker says anything: sizes, chunking, and at which steps.

use common::Config;
use common::protocol::pb::{self};
use common::protocol::powersgd::Layout;
use common::protocol::wire::{Chunking, WireFormat};
use common::sampling::cadence::Cadence;

/// The size and chunking of what both networks all-reduce, and at which
/// steps, known from the configuration before any worker says anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Element encoding every chunk must use.
    pub format: WireFormat,
    /// The discriminator's trainable parameters.
    pub discriminator: u64,
    /// The generator's trainable parameters.
    pub generator: u64,
    /// Bytes per chunk (`allreduce.chunk_bytes`).
    pub chunk_bytes: usize,
    /// Which steps all-reduce, and what (`train.sync_every`, `train.sync_warmup`).
    pub cadence: Cadence,
    /// Under PowerSGD, the elements of each network's two all-reduces
    /// (discriminator, generator), from `allreduce.powersgd_rank`.
    pub factors: Option<[Factors; 2]>,
}

/// The elements of PowerSGD's two all-reduces of one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factors {
    /// The P factors and the tensors sent whole.
    pub first: u64,
    /// The Q factors.
    pub second: u64,
}

impl Factors {
    fn of(tensors: &[Vec<usize>], rank: usize) -> Self {
        let layout = Layout::new(tensors, rank);
        Self {
            first: layout.first_len() as u64,
            second: layout.second_len() as u64,
        }
    }
}

impl Shape {
    /// What `cfg`'s model all-reduces, chunked as `cfg.allreduce` says.
    pub fn of(cfg: &Config) -> Self {
        let rank = cfg.allreduce.powersgd_rank;
        Self {
            format: cfg.allreduce.wire,
            discriminator: cfg.model.discriminator_params(),
            generator: cfg.model.generator_params(),
            chunk_bytes: cfg.allreduce.chunk_bytes,
            cadence: Cadence::of(&cfg.train),
            factors: (rank > 0).then(|| {
                [
                    Factors::of(&cfg.model.discriminator_tensors(), rank),
                    Factors::of(&cfg.model.generator_tensors(), rank),
                ]
            }),
        }
    }

    /// Whether step `step`'s all-reduces of a network are PowerSGD's two
    /// (not in the warm-up, nor when it travels exact: then whole).
    pub(super) fn compressed(&self, step: u64, exact: bool) -> bool {
        self.factors.is_some() && !exact && !self.cadence.warming_up(step)
    }

    /// How all-reduce `phase` of `net` at step `step` is chunked: its
    /// gradient, PowerSGD's factors, or under post-local SGD its state.
    pub(super) fn chunking(&self, net: pb::Net, step: u64, phase: u32, exact: bool) -> Chunking {
        let (params, factors) = match net {
            pb::Net::Generator => (self.generator, self.factors.map(|f| f[1])),
            _ => (self.discriminator, self.factors.map(|f| f[0])),
        };
        let elements = match factors.filter(|_| self.compressed(step, exact)) {
            Some(f) if phase == 0 => f.first,
            Some(f) => f.second,
            None => self.cadence.elements(step, params),
        };
        Chunking::new(elements as usize, self.chunk_bytes, self.format)
    }
}
