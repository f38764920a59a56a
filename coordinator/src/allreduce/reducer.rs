//! The reducer: collects each chunk from every rank, sums it in rank order
//! and broadcasts the mean, with error feedback and the non-finite policy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::config::NonFinite;
use common::protocol::pb::{self, coordinator_message};
use common::protocol::wire::{self, Chunking, WireError, WireFormat};
use tracing::warn;

use crate::allreduce::schedule::Schedule;
use crate::peers::Peers;
use crate::ui::telemetry;

use super::errors::{ChunkError, Pass, SubmitError};
use super::shape::Shape;

/// The gradient being reduced and its chunks so far.
struct Gradient {
    step: u64,
    net: pb::Net,
    /// 0, or 1 for PowerSGD's second all-reduce of the network.
    phase: u32,
    /// Fixed when its first chunk arrives: the schedule decided during the
    /// step before whether this one travels exact.
    framing: Option<Framing>,
    /// Chunks some ranks sent, by index: one part per rank.
    slots: HashMap<u32, Vec<Option<Bytes>>>,
    /// Chunks already reduced and broadcast (empty until framed).
    done: Vec<bool>,
    reduced: usize,
    /// A part was not finite and the policy is to skip.
    skip: bool,
}

/// How one all-reduce travels.
#[derive(Debug, Clone, Copy)]
struct Framing {
    /// Whole in f32, as before a checkpoint under error feedback.
    exact: bool,
    format: WireFormat,
    chunking: Chunking,
}

impl Gradient {
    fn new(step: u64, net: pb::Net, phase: u32) -> Self {
        Self {
            step,
            net,
            phase,
            framing: None,
            slots: HashMap::new(),
            done: Vec::new(),
            reduced: 0,
            skip: false,
        }
    }

    /// How this all-reduce travels, decided once. In a group of one
    /// (`alone`) every step is exact: nothing travels, so nothing is
    /// rounded, compressed or carried.
    fn framing(&mut self, shape: &Shape, schedule: &Schedule, alone: bool) -> Framing {
        if let Some(framing) = self.framing {
            return framing;
        }
        let exact = alone || schedule.exact(self.step);
        let framing = Framing {
            exact,
            format: match exact {
                true => WireFormat::F32,
                false => shape.format,
            },
            chunking: shape.chunking(self.net, self.step, self.phase, exact),
        };
        self.done = vec![false; framing.chunking.count()];
        self.framing = Some(framing);
        framing
    }

    /// The gradient the group reduces after this one.
    fn next(&self, shape: &Shape) -> Self {
        let second_follows = self.phase == 0
            && self
                .framing
                .is_some_and(|framing| shape.compressed(self.step, framing.exact));
        match self.net {
            _ if second_follows => Self::new(self.step, self.net, 1),
            pb::Net::Discriminator => Self::new(self.step, pb::Net::Generator, 0),
            _ => Self::new(
                shape.cadence.next_sync(self.step + 1),
                pb::Net::Discriminator,
                0,
            ),
        }
    }
}

/// Collects chunks from all ranks and broadcasts each mean as it completes.
pub struct Reducer {
    generation: u64,
    world: usize,
    peers: Arc<Peers>,
    schedule: Arc<Schedule>,
    shape: Shape,
    nonfinite: NonFinite,
    current: Mutex<Gradient>,
    skipped: AtomicU64,
    /// Whether any all-reduce completed in this generation.
    progressed: AtomicBool,
    /// The mean's residual by (network, chunk index), under error feedback.
    carried: Mutex<HashMap<(i32, u32), Vec<f32>>>,
}

impl Reducer {
    /// A reducer of generation `generation` for `world` ranks answering
    /// through `peers`, announcing `schedule`'s decisions, expecting
    /// all-reduces of `shape` from `first_step`'s round on, treating
    /// non-finite means as `nonfinite` says.
    pub fn new(
        generation: u64,
        world: usize,
        peers: Arc<Peers>,
        schedule: Arc<Schedule>,
        shape: Shape,
        first_step: u64,
        nonfinite: NonFinite,
    ) -> Self {
        Self {
            generation,
            world,
            peers,
            schedule,
            shape,
            nonfinite,
            current: Mutex::new(Gradient::new(
                shape.cadence.next_sync(first_step),
                pb::Net::Discriminator,
                0,
            )),
            skipped: AtomicU64::new(0),
            progressed: AtomicBool::new(false),
            carried: Mutex::default(),
        }
    }

    /// A group of one: its gradient is its mean, so only headers travel.
    fn alone(&self) -> bool {
        self.world == 1
    }

    /// Accepts `rank`'s contribution; when it completes the chunk, reduces
    /// and broadcasts it before returning.
    pub async fn submit(&self, rank: usize, mut chunk: pb::GradChunk) -> Result<(), SubmitError> {
        let data = std::mem::take(&mut chunk.data);
        let Some((parts, framing)) = self.accept(rank, &chunk, data)? else {
            return Ok(());
        };
        let format = framing.format;
        let net = pb::Net::try_from(chunk.net).unwrap_or(pb::Net::Unspecified);
        let mean = match self.alone() {
            // The sender's own gradient is the mean; it says whether it is finite.
            true => wire::Mean {
                bytes: Bytes::new(),
                finite: !chunk.not_finite,
                residual: None,
            },
            false => self.reduce(&chunk, parts.clone(), framing).await,
        };
        let skip = match mean.finite {
            true => self.current.lock().expect("reducer lock").skip,
            false => self.non_finite(&chunk, &parts, format)?,
        };
        self.finish_chunk(&chunk);
        telemetry::reduced(
            parts.iter().map(Bytes::len).sum(),
            mean.bytes.len() * parts.len(),
        );
        if net == pb::Net::Generator
            && (chunk.phase, chunk.index) == (0, 0)
            && let Some(control) = self.schedule.control(self.generation, chunk.step)
        {
            self.peers
                .broadcast(coordinator_message::Kind::Control(control))
                .await?;
        }
        let reduced = pb::GradChunk {
            data: mean.bytes,
            skip,
            ..chunk
        };
        self.peers
            .broadcast(coordinator_message::Kind::Chunk(reduced))
            .await?;
        Ok(())
    }

    /// The mean of one chunk's `parts`, off the runtime; under error
    /// feedback with the residual this chunk's mean carried, which the
    /// result replaces once it is applied.
    async fn reduce(
        &self,
        chunk: &pb::GradChunk,
        parts: Vec<Bytes>,
        framing: Framing,
    ) -> wire::Mean {
        let (format, world) = (framing.format, self.world);
        let key = (chunk.net, chunk.index);
        let carried = self.shape.format.carries_residual().then(|| {
            let elems = framing.chunking.range(chunk.index as usize).len();
            let mut carried = self.carried.lock().expect("carried lock");
            carried.remove(&key).unwrap_or_else(|| vec![0.0; elems])
        });
        let reduce = move || {
            let mean = wire::mean(&parts, format, world, carried.as_deref());
            (mean, carried)
        };
        let (mean, carried) = tokio::task::spawn_blocking(reduce)
            .await
            .expect("reduction task panicked");
        let mut mean = mean.expect("parts were checked against the shape");
        // A mean that is not applied leaves the residual as it was; after
        // an exact step there is none (f32 rounds nothing away).
        if let Some(kept) = match mean.finite || format == WireFormat::F32 {
            true => mean.residual.take(),
            false => carried,
        } {
            self.carried.lock().expect("carried lock").insert(key, kept);
        }
        mean
    }

    /// Checks `chunk` against the gradient being reduced and files its
    /// payload; returns every rank's part and their format when it
    /// completes the chunk.
    fn accept(
        &self,
        rank: usize,
        chunk: &pb::GradChunk,
        data: Bytes,
    ) -> Result<Option<(Vec<Bytes>, Framing)>, ChunkError> {
        let mut current = self.current.lock().expect("reducer lock");
        let g = &mut *current;
        let net = pb::Net::try_from(chunk.net).unwrap_or(pb::Net::Unspecified);
        if (chunk.step, net, chunk.phase) != (g.step, g.net, g.phase) {
            return Err(ChunkError::Unexpected {
                step: chunk.step,
                net,
                phase: Pass(chunk.phase),
                expected_step: g.step,
                expected_net: g.net,
                expected_phase: Pass(g.phase),
            });
        }
        if !self.schedule.trains(chunk.step) {
            return Err(ChunkError::PastTheEnd {
                step: chunk.step,
                last: self.schedule.final_step(),
            });
        }
        let framing = g.framing(&self.shape, &self.schedule, self.alone());
        let (format, chunking) = (framing.format, framing.chunking);
        if chunk.format != pb::WireFormat::from(format) as i32 {
            return Err(ChunkError::Format {
                step: chunk.step,
                got: chunk.format,
                expected: format,
            });
        }
        if chunk.total_elems != chunking.total as u64 || chunk.count as usize != chunking.count() {
            return Err(ChunkError::Shape {
                net,
                total: chunk.total_elems,
                count: chunk.count,
                expected_total: chunking.total,
                expected_count: chunking.count(),
            });
        }
        let index = chunk.index;
        let Some(&done) = g.done.get(index as usize) else {
            return Err(ChunkError::Index {
                index,
                count: chunking.count(),
            });
        };
        if self.alone() && !data.is_empty() {
            return Err(ChunkError::Alone {
                index,
                step: chunk.step,
                bytes: data.len(),
            });
        }
        let elems = chunking.range(index as usize).len();
        let expected = format.encoded_len(elems);
        if !self.alone() && data.len() != expected {
            return Err(ChunkError::Length {
                index,
                step: chunk.step,
                source: WireError {
                    bytes: data.len(),
                    expected,
                    elems,
                    format,
                },
            });
        }
        let world = self.world;
        let slot = g.slots.entry(index).or_insert_with(|| vec![None; world]);
        if done || slot[rank].is_some() {
            return Err(ChunkError::Duplicate {
                index,
                step: chunk.step,
            });
        }
        slot[rank] = Some(data);
        if slot.iter().any(Option::is_none) {
            return Ok(None);
        }
        let parts = g.slots.remove(&index).expect("slot present");
        g.done[index as usize] = true;
        Ok(Some((parts.into_iter().flatten().collect(), framing)))
    }

    /// A mean with NaN or Inf in it: halts the group, or marks the gradient
    /// skipped on every rank, naming who sent what.
    fn non_finite(
        &self,
        chunk: &pb::GradChunk,
        parts: &[Bytes],
        format: WireFormat,
    ) -> Result<bool, SubmitError> {
        let ranks: Vec<usize> = match self.alone() {
            true => vec![0],
            false => (0..parts.len())
                .filter(|&r| !wire::finite(&parts[r], format))
                .collect(),
        };
        let culprits = match ranks.is_empty() {
            true => "every part is finite but their sum overflows".to_string(),
            false => format!("rank(s) {ranks:?} sent NaN or Inf"),
        };
        let net = pb::Net::try_from(chunk.net).unwrap_or(pb::Net::Unspecified);
        if self.nonfinite == NonFinite::Halt {
            return Err(SubmitError::NonFinite {
                step: chunk.step,
                net,
                culprits,
            });
        }
        let mut current = self.current.lock().expect("reducer lock");
        if !std::mem::replace(&mut current.skip, true) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            warn!(step = chunk.step, ?net, %culprits,
                "a gradient is not finite: every rank skips this optimizer step (allreduce.nonfinite = skip)");
        }
        Ok(true)
    }

    /// Counts a reduced chunk; the last one moves the group to the next gradient.
    fn finish_chunk(&self, chunk: &pb::GradChunk) {
        let mut current = self.current.lock().expect("reducer lock");
        debug_assert_eq!(current.step, chunk.step);
        current.reduced += 1;
        if current.reduced == current.done.len() {
            *current = current.next(&self.shape);
            self.progressed.store(true, Ordering::Relaxed);
        }
    }

    /// [`Reducer::steps_reduced`], once this generation reduced anything.
    pub fn progress(&self) -> Option<u64> {
        self.progressed
            .load(Ordering::Relaxed)
            .then(|| self.steps_reduced())
    }

    /// Gradient updates skipped because they were not finite.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// The step whose all-reduce the group waits for: every report before
    /// it may have been sent (when averaging, the local steps of its round
    /// too).
    pub fn steps_reduced(&self) -> u64 {
        self.current.lock().expect("reducer lock").step
    }

    /// What the all-reduce is waiting for, once some rank sent a chunk of
    /// the current gradient.
    pub fn waiting(&self) -> Option<Waiting> {
        let current = self.current.lock().expect("reducer lock");
        let index = (0..current.done.len()).find(|&i| !current.done[i])?;
        let ranks = match current.slots.get(&(index as u32)) {
            Some(parts) => (0..self.world).filter(|&r| parts[r].is_none()).collect(),
            None if current.reduced > 0 || !current.slots.is_empty() => (0..self.world).collect(),
            None => return None,
        };
        Some(Waiting {
            step: current.step,
            net: current.net,
            phase: Pass(current.phase),
            index: index as u32,
            ranks,
        })
    }
}

/// The oldest gradient chunk still being collected: which step and net it
/// belongs to and which ranks have not sent it yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// Step of the chunk.
    pub step: u64,
    /// Which network's gradient.
    pub net: pb::Net,
    /// Which of its all-reduces in the step.
    pub phase: Pass,
    /// Chunk index.
    pub index: u32,
    /// Ranks whose contribution is missing.
    pub ranks: Vec<usize>,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the all-reduce waits for rank(s) {:?} to send chunk {} of the {:?} gradient of step {}{}",
            self.ranks, self.index, self.net, self.step, self.phase
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allreduce::shape::Factors;
    use common::Config;
    use common::config::ModelConfig;
    use common::protocol::powersgd::Layout;
    use common::sampling::cadence::Cadence;

    const WORLD: usize = 3;

    /// A discriminator gradient of 10 elements in chunks of 4 (4, 4, 2) and
    /// a generator gradient of 5 (4, 1).
    fn shape() -> Shape {
        Shape {
            format: WireFormat::F32,
            discriminator: 10,
            generator: 5,
            chunk_bytes: 16,
            cadence: Cadence::new(1, 0),
            factors: None,
        }
    }

    fn reducer(policy: NonFinite) -> Reducer {
        reducer_of(shape(), policy)
    }

    fn reducer_of(shape: Shape, policy: NonFinite) -> Reducer {
        reducer_in(WORLD, Schedule::new(0, 20, false), shape, policy)
    }

    /// A reducer of generation 0 for `world` ranks, from step 4's round on.
    fn reducer_in(world: usize, schedule: Schedule, shape: Shape, policy: NonFinite) -> Reducer {
        Reducer::new(
            0,
            world,
            Arc::new(Peers::new(world, std::time::Duration::from_secs(1))),
            Arc::new(schedule),
            shape,
            4,
            policy,
        )
    }

    fn chunk(step: u64, net: pb::Net, index: u32, values: &[f32]) -> pb::GradChunk {
        chunk_of(&shape(), step, net, index, values)
    }

    fn chunk_of(
        shape: &Shape,
        step: u64,
        net: pb::Net,
        index: u32,
        values: &[f32],
    ) -> pb::GradChunk {
        let chunking = shape.chunking(net, step, 0, false);
        phased(chunking, step, net, 0, index, values)
    }

    /// A chunk of all-reduce `phase` of `net` at `step`, chunked as `chunking`.
    fn phased(
        chunking: Chunking,
        step: u64,
        net: pb::Net,
        phase: u32,
        index: u32,
        values: &[f32],
    ) -> pb::GradChunk {
        pb::GradChunk {
            step,
            net: net as i32,
            index,
            count: chunking.count() as u32,
            total_elems: chunking.total as u64,
            format: pb::WireFormat::F32 as i32,
            data: wire::encode(values, WireFormat::F32),
            skip: false,
            phase,
            not_finite: false,
        }
    }

    /// Every rank sends all chunks of what `net` all-reduces at `step` (ones).
    async fn every_rank_sends(reducer: &Reducer, step: u64, net: pb::Net) {
        every_rank_sends_phase(reducer, step, net, 0, false).await
    }

    /// Every rank sends all chunks of all-reduce `phase` of `net` at `step`
    /// (ones); `exact`: the step travels whole.
    async fn every_rank_sends_phase(
        reducer: &Reducer,
        step: u64,
        net: pb::Net,
        phase: u32,
        exact: bool,
    ) {
        let chunking = reducer.shape.chunking(net, step, phase, exact);
        for rank in 0..WORLD {
            for index in 0..chunking.count() {
                let len = chunking.range(index).len();
                let c = phased(chunking, step, net, phase, index as u32, &[1.0; 4][..len]);
                reducer.submit(rank, c).await.unwrap();
            }
        }
    }

    fn d(index: u32) -> pb::GradChunk {
        chunk(4, pb::Net::Discriminator, index, &[1.0; 4])
    }

    #[tokio::test]
    async fn waiting_names_the_oldest_chunk_and_who_has_not_sent_it() {
        let reducer = reducer(NonFinite::Halt);
        assert_eq!(reducer.waiting(), None, "nobody sent anything yet");
        reducer.submit(2, d(1)).await.unwrap();
        reducer.submit(0, d(0)).await.unwrap();
        reducer.submit(2, d(0)).await.unwrap();
        let waiting = reducer.waiting().unwrap();
        assert_eq!(
            (waiting.step, waiting.net, waiting.index, waiting.ranks),
            (4, pb::Net::Discriminator, 0, vec![1])
        );
    }

    #[tokio::test]
    async fn the_group_moves_from_d_to_g_to_the_next_step_once_each_is_reduced() {
        let reducer = reducer(NonFinite::Halt);
        every_rank_sends(&reducer, 4, pb::Net::Discriminator).await;
        assert_eq!(reducer.steps_reduced(), 4);
        every_rank_sends(&reducer, 4, pb::Net::Generator).await;
        assert_eq!(reducer.steps_reduced(), 5, "step 4 is fully reduced");
    }

    /// Under post-local SGD (rounds of 3 from step 4) only each round's
    /// last step all-reduces: a chunk for a local step is refused, and
    /// the reports of a round's local steps may come before its average.
    #[tokio::test]
    async fn averaging_reduces_only_the_last_step_of_each_round() {
        let reducer = reducer_of(
            Shape {
                cadence: Cadence::new(3, 0),
                ..shape()
            },
            NonFinite::Halt,
        );
        assert_eq!(reducer.steps_reduced(), 5, "steps 4 and 5 train alone");
        match reducer.submit(0, d(0)).await {
            Err(SubmitError::Chunk(e)) => assert!(
                e.to_string().contains(
                    "step 4 while the group reduces the Discriminator gradient of step 5"
                ),
                "{e}"
            ),
            other => panic!("a local step's chunk was accepted: {other:?}"),
        }
        every_rank_sends(&reducer, 5, pb::Net::Discriminator).await;
        every_rank_sends(&reducer, 5, pb::Net::Generator).await;
        assert_eq!(
            reducer.steps_reduced(),
            8,
            "the next round averages at step 8"
        );
    }

    /// With a warm-up to step 6 and rounds of 3, steps 4 and 5 all-reduce
    /// their gradients, then step 8 averages the state, three times the
    /// elements; a gradient's length is refused there.
    #[tokio::test]
    async fn a_warm_up_reduces_gradients_then_the_rounds_average_state() {
        let reducer = reducer_of(
            Shape {
                cadence: Cadence::new(3, 6),
                ..shape()
            },
            NonFinite::Halt,
        );
        for step in [4, 5] {
            assert_eq!(
                reducer.steps_reduced(),
                step,
                "step {step} shares gradients"
            );
            every_rank_sends(&reducer, step, pb::Net::Discriminator).await;
            every_rank_sends(&reducer, step, pb::Net::Generator).await;
        }
        assert_eq!(reducer.steps_reduced(), 8, "steps 6 and 7 train alone");
        match reducer
            .submit(0, chunk(8, pb::Net::Discriminator, 0, &[1.0; 4]))
            .await
        {
            Err(SubmitError::Chunk(e)) => {
                assert!(e.to_string().contains("it has 30 elements"), "{e}")
            }
            other => panic!("a gradient-sized chunk was accepted at an averaging step: {other:?}"),
        }
        every_rank_sends(&reducer, 8, pb::Net::Discriminator).await;
        every_rank_sends(&reducer, 8, pb::Net::Generator).await;
        assert_eq!(reducer.steps_reduced(), 11);
    }

    /// Under PowerSGD each network's step is two all-reduces of the
    /// factors' sizes, but a step before a checkpoint (6 here) travels
    /// whole, once per network; a Q chunk out of turn is refused.
    #[tokio::test]
    async fn powersgd_reduces_p_then_q_except_whole_before_a_checkpoint() {
        let factors = |first, second| Factors { first, second };
        let shape = Shape {
            factors: Some([factors(3, 6), factors(2, 5)]),
            ..shape()
        };
        let reducer = reducer_in(WORLD, Schedule::new(6, 20, true), shape, NonFinite::Halt);
        let early_q = phased(
            shape.chunking(pb::Net::Discriminator, 4, 1, false),
            4,
            pb::Net::Discriminator,
            1,
            0,
            &[1.0; 4],
        );
        match reducer.submit(0, early_q).await {
            Err(SubmitError::Chunk(e)) => assert!(
                e.to_string()
                    .contains("step 4 (PowerSGD's Q factors) while"),
                "{e}"
            ),
            other => panic!("a Q chunk before the P's was accepted: {other:?}"),
        }
        for net in [pb::Net::Discriminator, pb::Net::Generator] {
            for phase in [0, 1] {
                every_rank_sends_phase(&reducer, 4, net, phase, false).await;
            }
        }
        assert_eq!(reducer.steps_reduced(), 5);
        let factor_sized = phased(
            shape.chunking(pb::Net::Discriminator, 5, 0, false),
            5,
            pb::Net::Discriminator,
            0,
            0,
            &[1.0; 3],
        );
        match reducer.submit(0, factor_sized).await {
            Err(SubmitError::Chunk(e)) => {
                assert!(e.to_string().contains("it has 10 elements"), "{e}")
            }
            other => panic!("factors were accepted at an exact step: {other:?}"),
        }
        every_rank_sends_phase(&reducer, 5, pb::Net::Discriminator, 0, true).await;
        every_rank_sends_phase(&reducer, 5, pb::Net::Generator, 0, true).await;
        assert_eq!(reducer.steps_reduced(), 6, "no Q follows a whole gradient");

        // With a warm-up to step 5, step 4 travels whole too, not exact.
        let warming = Shape {
            cadence: Cadence::new(1, 5),
            ..shape
        };
        assert_eq!(warming.chunking(pb::Net::Generator, 4, 0, false).total, 5);
        assert_eq!(warming.chunking(pb::Net::Generator, 5, 0, false).total, 2);
    }

    #[tokio::test]
    async fn chunks_of_other_gradients_shapes_or_lengths_are_blamed_on_their_sender() {
        let reducer = reducer(NonFinite::Halt);
        let refuse = |c: pb::GradChunk| async {
            match reducer.submit(1, c).await {
                Err(SubmitError::Chunk(e)) => e.to_string(),
                other => panic!("accepted: {other:?}"),
            }
        };
        let future = chunk(9, pb::Net::Discriminator, 0, &[1.0; 4]);
        assert!(
            refuse(future)
                .await
                .contains("step 9 while the group reduces")
        );
        let generator_early = chunk(4, pb::Net::Generator, 0, &[1.0; 4]);
        assert!(
            refuse(generator_early)
                .await
                .contains("Generator gradient of step 4")
        );
        let mut wrong_total = d(0);
        wrong_total.total_elems = 1 << 40;
        assert!(
            refuse(wrong_total)
                .await
                .contains("has 10 elements in 3 chunks")
        );
        assert!(
            refuse(chunk(4, pb::Net::Discriminator, 7, &[1.0; 4]))
                .await
                .contains("chunk 7")
        );
        let short = chunk(4, pb::Net::Discriminator, 0, &[1.0, 2.0]);
        assert!(refuse(short).await.contains("holds 8 bytes, expected 16"));
        let mut bf16 = d(0);
        bf16.format = pb::WireFormat::Bf16 as i32;
        assert!(refuse(bf16).await.contains("wire format"));
        reducer.submit(1, d(0)).await.unwrap();
        assert!(refuse(d(0)).await.contains("twice"));
        assert_eq!(
            reducer.waiting().unwrap().ranks,
            vec![0, 2],
            "nothing else was filed"
        );
    }

    #[tokio::test]
    async fn a_nan_halts_naming_the_rank_or_is_skipped_and_counted() {
        let poisoned = |index| chunk(4, pb::Net::Discriminator, index, &[1.0, f32::NAN, 1.0, 1.0]);
        let halting = reducer(NonFinite::Halt);
        halting.submit(0, d(0)).await.unwrap();
        halting.submit(1, poisoned(0)).await.unwrap();
        match halting.submit(2, d(0)).await {
            Err(SubmitError::NonFinite {
                culprits, step: 4, ..
            }) => {
                assert_eq!(culprits, "rank(s) [1] sent NaN or Inf")
            }
            other => panic!("{other:?}"),
        }
        let skipping = reducer(NonFinite::Skip);
        for rank in 0..WORLD {
            let c = if rank == 2 { poisoned(0) } else { d(0) };
            skipping.submit(rank, c).await.unwrap();
        }
        assert_eq!(skipping.skipped(), 1);
    }

    /// A group of one running bf16: every step is planned exact
    /// (f32 headers, the whole gradient's chunking), only headers are
    /// accepted, and the sender's word decides whether the mean is finite.
    #[tokio::test]
    async fn a_group_of_one_sends_headers_only_and_says_whether_they_are_finite() {
        let bf16 = Shape {
            format: WireFormat::Bf16,
            ..shape()
        };
        let alone = |policy| reducer_in(1, Schedule::new(0, 20, false), bf16, policy);
        let header = |step, net, index, not_finite| pb::GradChunk {
            data: Bytes::new(),
            not_finite,
            ..chunk_of(&bf16, step, net, index, &[])
        };
        let reducer = alone(NonFinite::Halt);
        for index in 0..2 {
            let c = header(4, pb::Net::Discriminator, index, false);
            reducer.submit(0, c).await.unwrap();
        }
        reducer
            .submit(0, header(4, pb::Net::Generator, 0, false))
            .await
            .unwrap();
        assert_eq!(reducer.steps_reduced(), 5, "step 4 was reduced");
        let with_data = pb::GradChunk {
            data: wire::encode(&[1.0; 8], WireFormat::F32),
            ..header(5, pb::Net::Discriminator, 0, false)
        };
        match reducer.submit(0, with_data).await {
            Err(SubmitError::Chunk(e)) => assert!(
                e.to_string()
                    .contains("sent 32 bytes in chunk 0 of step 5, but a group of one"),
                "{e}"
            ),
            other => panic!("accepted: {other:?}"),
        }
        match reducer
            .submit(0, header(5, pb::Net::Discriminator, 0, true))
            .await
        {
            Err(SubmitError::NonFinite { culprits, .. }) => {
                assert_eq!(culprits, "rank(s) [0] sent NaN or Inf")
            }
            other => panic!("{other:?}"),
        }
        let skipping = alone(NonFinite::Skip);
        let c = header(4, pb::Net::Discriminator, 1, true);
        skipping.submit(0, c).await.unwrap();
        assert_eq!(skipping.skipped(), 1);
    }

    #[test]
    fn the_shape_is_the_models_parameter_count() {
        let cfg = Config {
            model: ModelConfig {
                image_size: 64,
                ..ModelConfig::default()
            },
            ..Config::default()
        };
        let total = |shape: Shape, net, step| shape.chunking(net, step, 0, false).total;
        let shape = Shape::of(&cfg);
        assert_eq!(total(shape, pb::Net::Discriminator, 9), 2_765_568);
        assert_eq!(total(shape, pb::Net::Generator, 9), 3_576_704);
        let mut averaging = cfg.clone();
        averaging.train.sync_every = 4;
        averaging.train.sync_warmup = 8;
        let shape = Shape::of(&averaging);
        assert_eq!(
            total(shape, pb::Net::Discriminator, 7),
            2_765_568,
            "a warm-up step's gradient"
        );
        assert_eq!(
            total(shape, pb::Net::Discriminator, 11),
            3 * 2_765_568,
            "parameters and moments"
        );
        assert_eq!(total(shape, pb::Net::Generator, 11), 3 * 3_576_704);
        let mut compressed = cfg;
        compressed.allreduce.powersgd_rank = 4;
        let d = Layout::new(&compressed.model.discriminator_tensors(), 4);
        let shape = Shape::of(&compressed);
        assert_eq!(
            [0, 1].map(|phase| shape
                .chunking(pb::Net::Discriminator, 3, phase, false)
                .total),
            [d.first_len(), d.second_len()]
        );
    }
}
