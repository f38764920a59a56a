//! A replica moving between members through the coordinator: the one a
//! donor gives when asked, cut into chunks no larger than a gradient's, and
//! the one a member receives, checked piece by piece and bounded in size
//! before the group starts.

use bytes::Bytes;

use super::error::SessionError;
use crate::protocol::limits::MAX_STATE_BYTES;
use crate::protocol::pb;

/// What a member gives when the coordinator asks it for its replica.
pub trait Donor {
    /// The bundle of the replica after `step` steps ([`crate::protocol::bundle`]).
    fn state(&mut self, step: u64) -> Result<Bytes, SessionError>;
}

/// A member that holds nothing to give (a fresh worker, a test client).
pub struct NoDonation;

impl Donor for NoDonation {
    fn state(&mut self, step: u64) -> Result<Bytes, SessionError> {
        Err(SessionError::Protocol(format!(
            "the coordinator asked for the replica of step {step}, but this member holds none"
        )))
    }
}

/// `bundle` as the StateChunks that carry it, each at most `chunk_bytes`
/// long; an empty bundle is one empty chunk, so the receiver sees it end.
pub(super) fn pieces(bundle: Bytes, chunk_bytes: usize) -> impl Iterator<Item = pb::StateChunk> {
    let size = chunk_bytes.max(1);
    let count = bundle.len().div_ceil(size).max(1);
    (0..count).map(move |index| pb::StateChunk {
        index: index as u32,
        count: count as u32,
        total_bytes: bundle.len() as u64,
        data: bundle
            .slice((index * size).min(bundle.len())..((index + 1) * size).min(bundle.len())),
    })
}

/// A replica arriving in StateChunks before Start.
#[derive(Default)]
pub(super) struct Received {
    chunks: Vec<Bytes>,
    total: u64,
}

impl Received {
    pub(super) fn add(&mut self, chunk: pb::StateChunk) -> Result<(), SessionError> {
        let bad = |what: String| {
            Err(SessionError::Protocol(format!(
                "state chunk {}: {what}",
                chunk.index
            )))
        };
        if chunk.total_bytes > MAX_STATE_BYTES {
            return bad(format!(
                "a state of {} bytes is more than {MAX_STATE_BYTES}",
                chunk.total_bytes
            ));
        }
        if chunk.index as usize != self.chunks.len()
            || (self.total != 0 && self.total != chunk.total_bytes)
        {
            return bad("out of order or of another state".into());
        }
        let held: u64 = self.chunks.iter().map(|c| c.len() as u64).sum();
        if held + chunk.data.len() as u64 > chunk.total_bytes {
            return bad("more bytes than the state's size".into());
        }
        self.total = chunk.total_bytes;
        self.chunks.push(chunk.data);
        Ok(())
    }

    /// The whole state when `start` says one was sent, else nothing.
    pub(super) fn finish(self, start: &pb::Start) -> Result<Option<Bytes>, SessionError> {
        if start.source != pb::Source::Transfer as i32 {
            return Ok(None);
        }
        let mut whole = bytes::BytesMut::with_capacity(self.total as usize);
        self.chunks.iter().for_each(|c| whole.extend_from_slice(c));
        if self.total == 0 || whole.len() as u64 != self.total {
            return Err(SessionError::Protocol(format!(
                "told to start from a transferred state, but {} of {} bytes arrived",
                whole.len(),
                self.total
            )));
        }
        Ok(Some(whole.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer() -> pb::Start {
        pb::Start {
            source: pb::Source::Transfer as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_bundle_cut_into_pieces_arrives_whole() {
        let bundle = Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<_>>());
        let chunks: Vec<_> = pieces(bundle.clone(), 300).collect();
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c.count == 4 && c.total_bytes == 1000));
        let mut received = Received::default();
        chunks
            .into_iter()
            .try_for_each(|c| received.add(c))
            .unwrap();
        assert_eq!(received.finish(&transfer()).unwrap(), Some(bundle));
    }

    #[test]
    fn an_empty_bundle_is_one_empty_piece_and_not_a_state() {
        let chunks: Vec<_> = pieces(Bytes::new(), 300).collect();
        assert_eq!(chunks.len(), 1);
        assert!(chunks[0].data.is_empty());
        let mut received = Received::default();
        received.add(chunks[0].clone()).unwrap();
        assert!(matches!(
            received.finish(&transfer()),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn pieces_out_of_order_oversized_or_of_another_state_are_refused() {
        let chunk = |index: u32, total_bytes: u64, len: usize| pb::StateChunk {
            index,
            count: 2,
            total_bytes,
            data: Bytes::from(vec![0; len]),
        };
        let refused = |chunks: Vec<pb::StateChunk>| {
            let mut received = Received::default();
            chunks
                .into_iter()
                .try_for_each(|c| received.add(c))
                .is_err()
        };
        assert!(refused(vec![chunk(1, 10, 5)]), "starts at piece 1");
        assert!(
            refused(vec![chunk(0, 10, 5), chunk(0, 10, 5)]),
            "piece 0 twice"
        );
        assert!(
            refused(vec![chunk(0, 10, 5), chunk(1, 12, 5)]),
            "sizes differ"
        );
        assert!(
            refused(vec![chunk(0, 10, 6), chunk(1, 10, 5)]),
            "more than its size"
        );
        assert!(
            refused(vec![chunk(0, MAX_STATE_BYTES + 1, 1)]),
            "beyond the bound"
        );
        assert!(!refused(vec![chunk(0, 10, 5), chunk(1, 10, 5)]));
    }

    #[test]
    fn a_state_is_only_taken_when_the_start_says_one_was_sent() {
        let mut received = Received::default();
        received
            .add(pieces(Bytes::from_static(b"abc"), 2).next().unwrap())
            .unwrap();
        let keep = pb::Start {
            source: pb::Source::Keep as i32,
            ..Default::default()
        };
        assert_eq!(received.finish(&keep).unwrap(), None);
        let mut partial = Received::default();
        partial
            .add(pieces(Bytes::from_static(b"abc"), 2).next().unwrap())
            .unwrap();
        assert!(matches!(
            partial.finish(&transfer()),
            Err(SessionError::Protocol(message)) if message.contains("2 of 3 bytes")
        ));
    }

    #[test]
    fn a_member_without_a_replica_says_so_when_asked_for_one() {
        let err = NoDonation.state(4).unwrap_err();
        assert!(err.to_string().contains("holds none"), "{err}");
    }
}
