//! PowerSGD gradient compression (Vogels et al., 2019), as PyTorch DDP's
//! `powerSGD_hook` offers it: each weight's gradient, viewed as an n × m
//! matrix M (first dimension × the rest), travels as two thin factors.
//!
//! One step of one network is two all-reduces. Each worker computes
//! P = M·Q with the shared Q, and the group averages the P's; every worker
//! orthonormalises the mean P̂ (the same bits in, the same bits out), then
//! computes Q = Mᵀ·P̂, and the group averages those. P̂·Q̂ᵀ, the mean
//! gradient projected onto P̂'s columns, is what every replica applies; Q̂
//! warm-starts the next step, so that one power iteration per step keeps
//! tracking the gradients' leading directions. How much a rank keeps of
//! this GAN's quality is measured, not assumed (BENCHMARKS.md). Tensors the factors would not shrink (BatchNorm
//! scales and shifts, a 1 × m output layer) travel whole beside the P's.
//!
//! Error feedback: what the projection leaves out of this worker's M
//! (M − P̂·Q_wᵀ with its own Q_w, as in the paper's Algorithm 2) is added
//! to its next gradient, so nothing is lost, only late.
//!
//! Resume stays exact without checkpointing any of this: the step before a
//! checkpoint travels whole in f32 with the residual added, after which
//! [`PowerSgd::reset`] empties the residual and restarts Q from its fixed
//! initial value, as a group resuming from that checkpoint starts.

use std::ops::Range;

use crate::config::ModelConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// The seed of the initial Q: any constant, as long as every replica uses it.
const INITIAL_Q_SEED: u64 = 0x5057_5253_4744;

/// A weight compressed as a matrix (first dimension × the rest): its
/// elements in the flat gradient, and its factors in the two all-reduces.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Matrix {
    gradient: Range<usize>,
    /// P (rows × rank) in the first all-reduce.
    p: Range<usize>,
    /// Q, kept as Qᵀ (rank × cols), in the second.
    q: Range<usize>,
}

/// A tensor sent whole in the first all-reduce, after every P.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Whole {
    gradient: Range<usize>,
    sent: Range<usize>,
}

/// How one network's flat gradient maps onto PowerSGD's two all-reduces;
/// the coordinator sizes them from it, the worker fills them by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    matrices: Vec<Matrix>,
    wholes: Vec<Whole>,
    rank: usize,
    len: usize,
    first: usize,
    second: usize,
}

impl Layout {
    /// The layout of a gradient made of `tensors` (dimensions, in flat
    /// order) at rank `rank` (≥ 1). A tensor is compressed when its
    /// factors are smaller than it: (n + m)·rank < n·m.
    pub fn new(tensors: &[Vec<usize>], rank: usize) -> Self {
        let rank = rank.max(1);
        let (mut matrices, mut sent_whole) = (Vec::new(), Vec::new());
        let (mut offset, mut first, mut second) = (0, 0, 0);
        for dims in tensors {
            let len: usize = dims.iter().product();
            let rows = dims.first().copied().unwrap_or(1).max(1);
            let cols = len / rows;
            if dims.len() > 1 && (rows + cols) * rank < len {
                matrices.push(Matrix {
                    gradient: offset..offset + len,
                    p: first..first + rows * rank,
                    q: second..second + cols * rank,
                });
                first += rows * rank;
                second += cols * rank;
            } else {
                sent_whole.push((offset, len));
            }
            offset += len;
        }
        let mut wholes = Vec::with_capacity(sent_whole.len());
        for (offset, len) in sent_whole {
            wholes.push(Whole {
                gradient: offset..offset + len,
                sent: first..first + len,
            });
            first += len;
        }
        Self {
            matrices,
            wholes,
            rank,
            len: offset,
            first,
            second,
        }
    }

    /// Elements of the flat gradient.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the gradient has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements of the first all-reduce: every P, then the whole tensors.
    pub fn first_len(&self) -> usize {
        self.first
    }

    /// Elements of the second all-reduce: every Q.
    pub fn second_len(&self) -> usize {
        self.second
    }
}

/// One worker's PowerSGD state for one network: the shared Q every replica
/// holds identically, and this worker's own residual.
#[derive(Debug, Clone)]
pub struct PowerSgd {
    layout: Layout,
    q: Vec<f32>,
    residual: Vec<f32>,
}

/// The factors of one step in flight: this worker's gradient with its
/// residual added (M), and, after the first all-reduce, P̂ and its own Q.
#[derive(Debug)]
pub struct Round {
    m: Vec<f32>,
    p: Vec<f32>,
    q: Vec<f32>,
}

impl PowerSgd {
    /// A fresh state: no residual, the fixed initial Q.
    pub fn new(layout: Layout) -> Self {
        let mut state = Self {
            q: Vec::new(),
            residual: vec![0.0; layout.len],
            layout,
        };
        state.reset();
        state
    }

    /// Fresh states for `model`'s discriminator and generator, in that order.
    pub fn per_network(model: &ModelConfig, rank: usize) -> [Self; 2] {
        [model.discriminator_tensors(), model.generator_tensors()]
            .map(|tensors| Self::new(Layout::new(&tensors, rank)))
    }

    /// What a group starting at a checkpoint holds: no residual, the
    /// initial Q. Called after every step that travelled whole.
    pub fn reset(&mut self) {
        let mut rng = ChaCha8Rng::seed_from_u64(INITIAL_Q_SEED);
        self.q = (0..self.layout.second)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        self.residual.iter_mut().for_each(|r| *r = 0.0);
    }

    /// `grads` with the residual added: what a step sends, compressed or whole.
    pub fn with_residual(&self, grads: &[f32]) -> Vec<f32> {
        assert_eq!(grads.len(), self.layout.len, "gradient of another model");
        grads
            .iter()
            .zip(&self.residual)
            .map(|(g, r)| g + r)
            .collect()
    }

    /// Starts a compressed step of `grads`: returns the round and what the
    /// first all-reduce sends (each P = M·Q, then the whole tensors).
    pub fn first(&self, grads: &[f32]) -> (Round, Vec<f32>) {
        let m = self.with_residual(grads);
        let (rank, mut sent) = (self.layout.rank, vec![0.0; self.layout.first]);
        for matrix in &self.layout.matrices {
            project(
                &m[matrix.gradient.clone()],
                &self.q[matrix.q.clone()],
                &mut sent[matrix.p.clone()],
                rank,
            );
        }
        for whole in &self.layout.wholes {
            sent[whole.sent.clone()].copy_from_slice(&m[whole.gradient.clone()]);
        }
        let round = Round {
            m,
            p: Vec::new(),
            q: Vec::new(),
        };
        (round, sent)
    }

    /// Takes the first all-reduce's mean: orthonormalises each P̂ (the
    /// same on every replica) and returns what the second sends, each
    /// Q = Mᵀ·P̂.
    pub fn second(&self, round: &mut Round, mut mean: Vec<f32>) -> Vec<f32> {
        assert_eq!(
            mean.len(),
            self.layout.first,
            "first mean of another layout"
        );
        let (rank, mut sent) = (self.layout.rank, vec![0.0; self.layout.second]);
        for matrix in &self.layout.matrices {
            let p = &mut mean[matrix.p.clone()];
            orthonormalise(p, rank);
            back_project(
                &round.m[matrix.gradient.clone()],
                p,
                &mut sent[matrix.q.clone()],
                rank,
            );
        }
        round.p = mean;
        round.q = sent.clone();
        sent
    }

    /// Takes the second all-reduce's mean: returns the gradient every
    /// replica applies (P̂·Q̂ᵀ, and the whole tensors' means), keeps Q̂ for
    /// the next step and what this worker's projection left out as its
    /// residual. A step that is skipped never calls this: state stays.
    pub fn finish(&mut self, round: Round, mean: Vec<f32>) -> Vec<f32> {
        assert_eq!(
            mean.len(),
            self.layout.second,
            "second mean of another layout"
        );
        let rank = self.layout.rank;
        let Round { m, p, q } = round;
        let mut applied = vec![0.0; self.layout.len];
        for matrix in &self.layout.matrices {
            let range = matrix.gradient.clone();
            let p = &p[matrix.p.clone()];
            outer(
                p,
                &mean[matrix.q.clone()],
                &mut applied[range.clone()],
                rank,
            );
            let own = &mut self.residual[range.clone()];
            outer(p, &q[matrix.q.clone()], own, rank);
            own.iter_mut().zip(&m[range]).for_each(|(r, m)| *r = m - *r);
        }
        // Tensors sent whole arrive whole: nothing left to carry.
        for whole in &self.layout.wholes {
            applied[whole.gradient.clone()].copy_from_slice(&p[whole.sent.clone()]);
            self.residual[whole.gradient.clone()].fill(0.0);
        }
        self.q = mean;
        applied
    }
}

// Q is kept transposed (rank × cols, row-major) so that every pass over a
// gradient reads and writes contiguous rows: a dot product per row and
// factor column for P, an axpy per row and column for Q and for P·Qᵀ.
// Rows are spread over rayon's threads; only Q sums across rows, in
// blocks of a fixed size added in order, so no bit depends on the cores.

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// `out` (rows × rank) = `m` (rows × cols) · `qt`ᵀ, with `qt` = Qᵀ.
fn project(m: &[f32], qt: &[f32], out: &mut [f32], rank: usize) {
    let cols = qt.len() / rank;
    m.par_chunks_exact(cols)
        .zip(out.par_chunks_exact_mut(rank))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, out)| {
            for (o, q) in out.iter_mut().zip(qt.chunks_exact(cols)) {
                *o = dot(row, q);
            }
        });
}

/// `qt` (rank × cols) = (`m`ᵀ · `p`)ᵀ, with `p` rows × rank.
fn back_project(m: &[f32], p: &[f32], qt: &mut [f32], rank: usize) {
    let cols = qt.len() / rank;
    let blocks: Vec<Vec<f32>> = m
        .par_chunks(cols * ROWS_PER_TASK)
        .zip(p.par_chunks(rank * ROWS_PER_TASK))
        .map(|(rows, p)| {
            let mut block = vec![0.0; qt.len()];
            for (row, p) in rows.chunks_exact(cols).zip(p.chunks_exact(rank)) {
                for (q, &p) in block.chunks_exact_mut(cols).zip(p) {
                    axpy(p, row, q);
                }
            }
            block
        })
        .collect();
    qt.fill(0.0);
    for block in blocks {
        axpy(1.0, &block, qt);
    }
}

/// `out` (rows × cols) = `p` (rows × rank) · `qt` (rank × cols).
fn outer(p: &[f32], qt: &[f32], out: &mut [f32], rank: usize) {
    let cols = qt.len() / rank;
    out.par_chunks_exact_mut(cols)
        .zip(p.par_chunks_exact(rank))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(out, p)| {
            out.fill(0.0);
            for (q, &p) in qt.chunks_exact(cols).zip(p) {
                axpy(p, q, out);
            }
        });
}

/// `y` += `a`·`x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// A dot product summed in eight fixed lanes: the compiler vectorises it
/// (it may not reorder one running sum), and the order, so the bits, is
/// the same on every replica.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let (a, b) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a
        .remainder()
        .iter()
        .zip(b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut lanes = [0.0f32; LANES];
    for (a, b) in a.zip(b) {
        for ((lane, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Gram–Schmidt on the columns of `p` (rows × rank). A column with nothing
/// left (a zero gradient) stays near zero instead of becoming NaN, as in
/// PyTorch's hook.
fn orthonormalise(p: &mut [f32], rank: usize) {
    const EPSILON: f32 = 1e-8;
    for k in 0..rank {
        for l in 0..k {
            let dot: f32 = p.chunks_exact(rank).map(|row| row[k] * row[l]).sum();
            p.chunks_exact_mut(rank)
                .for_each(|row| row[k] -= dot * row[l]);
        }
        let norm = p
            .chunks_exact(rank)
            .map(|row| row[k] * row[k])
            .sum::<f32>()
            .sqrt();
        p.chunks_exact_mut(rank)
            .for_each(|row| row[k] /= norm + EPSILON);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// W workers' PowerSGD of their gradients, all-reduced in process.
    fn step(states: &mut [PowerSgd], grads: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let mean = |parts: Vec<Vec<f32>>| -> Vec<f32> {
            let n = parts.len() as f32;
            (0..parts[0].len())
                .map(|i| parts.iter().map(|p| p[i]).sum::<f32>() / n)
                .collect()
        };
        let (mut rounds, firsts): (Vec<_>, Vec<_>) =
            states.iter().zip(grads).map(|(s, g)| s.first(g)).unzip();
        let first = mean(firsts);
        let seconds = states
            .iter()
            .zip(&mut rounds)
            .map(|(s, r)| s.second(r, first.clone()))
            .collect();
        let second = mean(seconds);
        states
            .iter_mut()
            .zip(rounds)
            .map(|(s, r)| s.finish(r, second.clone()))
            .collect()
    }

    fn close(a: &[f32], b: &[f32], tolerance: f32) -> bool {
        a.iter().zip(b).all(|(a, b)| (a - b).abs() <= tolerance)
    }

    #[test]
    fn weights_travel_as_factors_and_small_tensors_whole() {
        let model = ModelConfig::default();
        let layout = Layout::new(&model.discriminator_tensors(), 4);
        assert_eq!(layout.len() as u64, model.discriminator_params());
        // The four convolutions but the last (1 × 8192) are matrices.
        let p: usize = [64, 128, 256, 512].iter().map(|r| r * 4).sum();
        let q: usize = [48, 1024, 2048, 4096].iter().map(|c| c * 4).sum();
        let whole = 2 * (128 + 256 + 512) + 8192;
        assert_eq!(layout.first_len(), p + whole);
        assert_eq!(layout.second_len(), q);
        let sent = layout.first_len() + layout.second_len();
        assert!(layout.len() / sent > 50, "{} / {sent}", layout.len());
    }

    #[test]
    fn a_gradient_of_rank_at_most_r_arrives_exactly() {
        // Two tensors: a rank-2 6 × 5 matrix and a 3-element scale.
        let layout = Layout::new(&[vec![6, 5], vec![3]], 2);
        let (u, v) = ([1.0, -2.0, 0.5, 3.0, 0.0, 1.0], [0.5, 1.0, -1.0, 2.0, 0.25]);
        let (s, t) = ([0.0, 1.0, 1.0, -1.0, 2.0, 0.5], [1.0, 0.0, 3.0, -0.5, 1.0]);
        let mut grads: Vec<f32> = (0..30)
            .map(|i| u[i / 5] * v[i % 5] + s[i / 5] * t[i % 5])
            .collect();
        grads.extend([0.1, 0.2, 0.3]);
        let mut states = vec![PowerSgd::new(layout.clone()), PowerSgd::new(layout)];
        let applied = step(&mut states, &[grads.clone(), grads.clone()]);
        assert!(close(&applied[0], &grads, 1e-4), "{:?}", applied[0]);
        assert_eq!(applied[0], applied[1], "replicas apply the same bits");
        assert!(states[0].residual.iter().all(|r| r.abs() < 1e-4));
    }

    #[test]
    fn workers_whose_gradients_share_r_columns_get_their_exact_mean() {
        // M_w = U·V_wᵀ with one U (5 × 2): the mean has rank 2 as well.
        let u = [[1.0, 0.5], [-1.0, 2.0], [0.0, 1.0], [2.0, -0.5], [1.0, 1.0]];
        let vs = [
            [[1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0, 1.0]],
            [[0.0, 3.0, 1.0, 1.0], [-1.0, 0.5, 2.0, 0.0]],
            [[2.0, -1.0, 0.0, 0.5], [1.0, 1.0, -1.0, 2.0]],
        ];
        let grads: Vec<Vec<f32>> = vs
            .iter()
            .map(|v| {
                (0..20)
                    .map(|i| (0..2).map(|k| u[i / 4][k] * v[k][i % 4]).sum())
                    .collect()
            })
            .collect();
        let mean: Vec<f32> = (0..20)
            .map(|i| grads.iter().map(|g| g[i]).sum::<f32>() / 3.0)
            .collect();
        let layout = Layout::new(&[vec![5, 4]], 2);
        let mut states = vec![PowerSgd::new(layout); 3];
        let applied = step(&mut states, &grads);
        assert!(
            close(&applied[0], &mean, 1e-4),
            "{:?}\n{mean:?}",
            applied[0]
        );
    }

    #[test]
    fn error_feedback_delivers_every_gradient_late_not_never() {
        // One worker: what it applied plus what it still owes is what it had.
        let layout = Layout::new(&[vec![8, 12], vec![4]], 1);
        let mut state = [PowerSgd::new(layout)];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut had, mut applied) = (vec![0.0f32; 100], vec![0.0f32; 100]);
        for _ in 0..20 {
            let grads: Vec<f32> = (0..100).map(|_| rng.random_range(-1.0..1.0)).collect();
            had.iter_mut().zip(&grads).for_each(|(h, g)| *h += g);
            let step = step(&mut state, &[grads]).remove(0);
            applied.iter_mut().zip(&step).for_each(|(a, s)| *a += s);
        }
        let owed: Vec<f32> = applied
            .iter()
            .zip(&state[0].residual)
            .map(|(a, r)| a + r)
            .collect();
        assert!(close(&owed, &had, 1e-3), "{owed:?}\n{had:?}");
        assert!(
            state[0].residual.iter().any(|r| r.abs() > 1e-2),
            "rank 1 cannot carry random 8 × 12 gradients exactly"
        );
    }

    #[test]
    fn replicas_with_different_gradients_apply_identical_bits() {
        let layout = Layout::new(&ModelConfig::default().generator_tensors(), 4);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut states = vec![PowerSgd::new(layout.clone()); 3];
        for _ in 0..2 {
            let grads: Vec<Vec<f32>> = (0..3)
                .map(|_| {
                    (0..layout.len())
                        .map(|_| rng.random_range(-1e-3..1e-3))
                        .collect()
                })
                .collect();
            let applied = step(&mut states, &grads);
            assert!(applied.iter().all(|a| a == &applied[0]));
            assert!(applied[0].iter().all(|a| a.is_finite()));
        }
        assert_eq!(states[0].q, states[2].q, "the warm start is shared");
        assert_ne!(states[0].residual, states[2].residual, "residuals are not");
    }

    #[test]
    fn a_reset_state_is_a_fresh_one() {
        let layout = Layout::new(&[vec![4, 6]], 1);
        let mut state = [PowerSgd::new(layout.clone())];
        step(&mut state, &[(0..24).map(|i| i as f32).collect()]);
        let [mut used] = state;
        used.reset();
        let fresh = PowerSgd::new(layout);
        assert_eq!((used.q, used.residual), (fresh.q, fresh.residual));
    }

    #[test]
    fn orthonormalising_a_zero_gradient_gives_no_nan() {
        let mut p = vec![0.0; 8];
        orthonormalise(&mut p, 2);
        assert!(p.iter().all(|x| x.is_finite()));
        let mut p = vec![3.0, 1.0, 4.0, 1.0, 0.0, 2.0];
        orthonormalise(&mut p, 2);
        let dot = |a: usize, b: usize| -> f32 { p.chunks(2).map(|r| r[a] * r[b]).sum() };
        assert!((dot(0, 0) - 1.0).abs() < 1e-5 && (dot(1, 1) - 1.0).abs() < 1e-5);
        assert!(dot(0, 1).abs() < 1e-5);
    }
}
