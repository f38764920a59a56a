//! The all-reduce as a worker sees it: its gradient out chunk by chunk
//! while the reduced chunks already come back, so the coordinator's
//! pipelining pays off (the first averaged chunk is decoded before the last
//! local one has left). Error feedback (int8's residuals, PowerSGD's state)
//! lives here, with the session. A group of one sends the chunk headers
//! alone: its mean is its own gradient.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::error::SessionError;
use super::feedback::PowerSgdSlot;
use super::inbound::{kind_name, next};
use super::outbound::send;
use super::session::Session;
use crate::protocol::pb::{self, coordinator_message, worker_message};
use crate::protocol::powersgd::PowerSgd;
use crate::protocol::wire::{self, Chunking, Net, WireFormat};

/// A reduced gradient as every replica receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reduced {
    /// The mean over all workers; empty when skipped.
    pub mean: Vec<f32>,
    /// Some worker's contribution was not finite and the policy is to skip
    /// this optimizer step (`allreduce.nonfinite = skip`).
    pub skip: bool,
}

impl Reduced {
    /// A gradient every rank skips: nothing to apply.
    fn skipped() -> Self {
        Self {
            mean: Vec::new(),
            skip: true,
        }
    }
}

/// One all-reduce's payload: f32 goes out as the gradient's own memory
/// ([`wire::f32_in_place`]), anything else is encoded chunk by chunk (with
/// the residual carried into it under error feedback). A group of one
/// keeps its values: they are the mean.
enum Outgoing {
    InPlace(Bytes),
    Encoded(Vec<f32>),
    Kept(Vec<f32>),
}

impl Outgoing {
    fn new(values: Vec<f32>, format: WireFormat, carrying: bool, alone: bool) -> Self {
        match (alone, format == WireFormat::F32 && !carrying) {
            (true, _) => Self::Kept(values),
            (false, true) => Self::InPlace(wire::f32_in_place(values)),
            (false, false) => Self::Encoded(values),
        }
    }
}

impl Session {
    /// Sends this worker's gradient for (`step`, `net`) and returns the mean
    /// over all workers, as the coordinator computed it.
    ///
    /// Under error feedback (int8, PowerSGD) the residual carried from
    /// earlier steps is added before encoding, and what this step leaves
    /// out replaces it once the mean is applied (not when every rank skips
    /// it). A step the coordinator announced as exact travels whole in f32
    /// and leaves no residual (under PowerSGD, no warm start either).
    ///
    /// Takes the gradient by value: in f32 its memory is what goes out.
    pub async fn all_reduce(
        &mut self,
        step: u64,
        net: Net,
        grads: Vec<f32>,
    ) -> Result<Reduced, SessionError> {
        self.step.store(step, Ordering::Relaxed);
        if self.alone {
            // Every step of a group of one is exact and its session started
            // with no residual and no PowerSGD state: nothing to carry.
            let (reduced, _) = self
                .exchange(step, net, 0, grads, WireFormat::F32, None)
                .await?;
            return Ok(reduced);
        }
        let exact = self.exact == Some(step);
        if self.powersgd.is_some() && !self.cadence.warming_up(step) {
            let slot = PowerSgdSlot::of(net);
            if !exact {
                return self.compressed(step, net, &grads, slot).await;
            }
            let whole = self.powersgd(slot).with_residual(&grads);
            let (reduced, _) = self
                .exchange(step, net, 0, whole, WireFormat::F32, None)
                .await?;
            self.powersgd(slot).reset();
            return Ok(reduced);
        }
        let format = match exact {
            true => WireFormat::F32,
            false => self.format,
        };
        let carried = self
            .format
            .carries_residual()
            .then(|| self.residuals.take(net, grads.len()));
        let result = self
            .exchange(step, net, 0, grads, format, carried.as_deref())
            .await;
        let (reduced, left) = match result {
            Ok(done) => done,
            Err(err) => {
                if let Some(carried) = carried {
                    self.residuals.put(net, carried);
                }
                return Err(err);
            }
        };
        // What this encoding left replaces the residual once the mean is
        // applied; after an exact step nothing is carried, skipped or not,
        // so the residual at a checkpoint is zero on every rank.
        if let (Some(carried), Some(left)) = (carried, left) {
            let (kept, spare) = match exact || !reduced.skip {
                true => (left, carried),
                false => (carried, left),
            };
            self.residuals.put(net, kept);
            self.spares.keep(spare);
        }
        Ok(reduced)
    }

    /// PowerSGD's two all-reduces of one network's gradient; a skipped
    /// one leaves the residual and the warm start as they were.
    async fn compressed(
        &mut self,
        step: u64,
        net: Net,
        grads: &[f32],
        slot: PowerSgdSlot,
    ) -> Result<Reduced, SessionError> {
        let format = self.format;
        let (mut round, first) = self.powersgd(slot).first(grads);
        let (reduced, _) = self.exchange(step, net, 0, first, format, None).await?;
        if reduced.skip {
            return Ok(Reduced::skipped());
        }
        let second = self.powersgd(slot).second(&mut round, reduced.mean);
        let (reduced, _) = self.exchange(step, net, 1, second, format, None).await?;
        if reduced.skip {
            return Ok(Reduced::skipped());
        }
        let mean = self.powersgd(slot).finish(round, reduced.mean);
        Ok(Reduced { mean, skip: false })
    }

    fn powersgd(&mut self, slot: PowerSgdSlot) -> &mut PowerSgd {
        &mut self.powersgd.as_mut().expect("PowerSGD is on")[slot as usize]
    }

    /// One all-reduce: sends `values` of (`step`, `net`, `phase`) in
    /// `format` and collects the mean. With `carried` (int8's residual),
    /// it is added before encoding, and what the encoding rounded away
    /// comes back beside the mean.
    ///
    /// Alone, the values are the mean and only the headers travel, each
    /// saying whether its chunk is finite, so the coordinator's pacing,
    /// decisions and non-finite policy stay the same.
    async fn exchange(
        &mut self,
        step: u64,
        net: Net,
        phase: u32,
        values: Vec<f32>,
        format: WireFormat,
        carried: Option<&[f32]>,
    ) -> Result<(Reduced, Option<Vec<f32>>), SessionError> {
        // Chunked by the run's format whatever this step's: the coordinator
        // knows the chunking before it knows whether the step is exact.
        let len = values.len();
        let chunking = Chunking::new(len, self.chunk_bytes, self.format);
        let mut left = carried.map(|_| self.spares.take(len));
        let alone = self.alone;
        let outgoing = Outgoing::new(values, format, carried.is_some(), alone);
        let outbound = &self.outbound;
        let header = |index: usize| pb::GradChunk {
            step,
            net: pb::Net::from(net) as i32,
            index: index as u32,
            count: chunking.count() as u32,
            total_elems: len as u64,
            format: pb::WireFormat::from(format) as i32,
            data: Default::default(),
            skip: false,
            phase,
            not_finite: false,
        };
        let send = async {
            for index in 0..chunking.count() {
                let range = chunking.range(index);
                let mut not_finite = false;
                let data = match (&outgoing, carried, left.as_mut()) {
                    (Outgoing::Kept(values), ..) => {
                        // Folded, not short-circuited, so it vectorises.
                        not_finite = !values[range].iter().fold(true, |ok, v| ok & v.is_finite());
                        Bytes::new()
                    }
                    (Outgoing::InPlace(bytes), ..) => bytes.slice(range.start * 4..range.end * 4),
                    (Outgoing::Encoded(values), Some(carried), Some(left)) => {
                        wire::encode_carrying(
                            &values[range.clone()],
                            &carried[range.clone()],
                            &mut left[range],
                            format,
                        )
                    }
                    (Outgoing::Encoded(values), ..) => wire::encode(&values[range], format),
                };
                let chunk = pb::GradChunk {
                    data,
                    not_finite,
                    ..header(index)
                };
                send(outbound, worker_message::Kind::Chunk(chunk)).await?;
            }
            Ok::<_, SessionError>(())
        };
        let mut mean = match alone {
            true => Vec::new(),
            false => self.spares.take(len),
        };
        let (inbound, control, announced) = (&mut self.inbound, &mut self.control, &mut self.exact);
        let proof = &self.proof;
        let receive = async {
            let mut skip = false;
            let mut seen = vec![false; chunking.count()];
            let mut received = 0;
            while received < chunking.count() {
                let chunk = match next(inbound, proof).await? {
                    coordinator_message::Kind::Chunk(chunk) => chunk,
                    coordinator_message::Kind::Control(c) => {
                        if c.exact_next {
                            *announced = Some(c.step + 1);
                        }
                        *control = Some(c);
                        continue;
                    }
                    other => {
                        return Err(SessionError::Protocol(format!(
                            "expected a reduced chunk, got {}",
                            kind_name(&other)
                        )));
                    }
                };
                let index = chunk.index as usize;
                if (chunk.step, chunk.net, chunk.phase) != (step, pb::Net::from(net) as i32, phase)
                    || index >= seen.len()
                    || seen[index]
                {
                    return Err(SessionError::Protocol(format!(
                        "unexpected reduced chunk {index} of step {} net {} phase {} while \
                         reducing phase {phase} of step {step} {net:?}",
                        chunk.step, chunk.net, chunk.phase
                    )));
                }
                seen[index] = true;
                received += 1;
                skip |= chunk.skip;
                match alone {
                    true if !chunk.data.is_empty() => {
                        return Err(SessionError::Protocol(format!(
                            "reduced chunk {index} of step {step} carries {} bytes, but a group \
                             of one receives headers only",
                            chunk.data.len()
                        )));
                    }
                    true => {}
                    false => {
                        wire::decode_into(&chunk.data, format, &mut mean[chunking.range(index)])?
                    }
                }
            }
            Ok(skip)
        };
        let (sent, skip) = tokio::join!(send, receive);
        // The coordinator's last word (a regroup, an abort) explains a send
        // that failed because it closed the stream.
        let skip = skip?;
        sent?;
        match outgoing {
            Outgoing::Kept(values) => mean = values,
            Outgoing::Encoded(values) => self.spares.keep(values),
            // Its memory went out as the chunks, which the transport frees.
            Outgoing::InPlace(_) => {}
        }
        Ok((Reduced { mean, skip }, left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_goes_out_in_place_encodings_are_encoded_and_a_group_of_one_keeps_its_values() {
        let values = || vec![1.0f32, 2.0];
        assert!(matches!(
            Outgoing::new(values(), WireFormat::F32, false, false),
            Outgoing::InPlace(bytes) if bytes.len() == 8
        ));
        assert!(matches!(
            Outgoing::new(values(), WireFormat::F32, true, false),
            Outgoing::Encoded(_)
        ));
        assert!(matches!(
            Outgoing::new(values(), WireFormat::Bf16, false, false),
            Outgoing::Encoded(_)
        ));
        for format in [WireFormat::F32, WireFormat::Int8] {
            assert!(matches!(
                Outgoing::new(values(), format, false, true),
                Outgoing::Kept(v) if v == values()
            ));
        }
    }
}
