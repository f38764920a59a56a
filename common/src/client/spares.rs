//! Gradient-sized buffers kept from one all-reduce for the next.
//!
//! Every all-reduce needs a vector for the mean, and under int8 one more
//! for what rounding leaves; an encoded all-reduce (bf16, int8) frees one
//! of the same length, the gradient it encoded, and int8 also the residual
//! it replaced. (f32 sends the gradient's own memory, which the transport
//! frees.) A fresh 25 MB vector makes the kernel find and zero every page
//! of it again, on every worker, every step; kept vectors skip that. Their
//! old contents never show: an all-reduce writes every element of the
//! mean, and of int8's residual, before anyone reads it.

/// Vectors by length, the most recently kept first used.
#[derive(Default)]
pub(super) struct Spares(Vec<Vec<f32>>);

impl Spares {
    /// Enough for two of each length a step all-reduces under int8 (the
    /// mean and the residual of each network), with room to spare; the
    /// oldest goes beyond it, which bounds what a session holds.
    const KEPT: usize = 8;

    /// A vector of `len` elements whose contents are unspecified: kept
    /// from an earlier all-reduce, or zeros.
    pub(super) fn take(&mut self, len: usize) -> Vec<f32> {
        match self.0.iter().rposition(|v| v.len() == len) {
            Some(at) => self.0.remove(at),
            None => vec![0.0; len],
        }
    }

    /// Keeps `values` for a later [`Self::take`] of its length.
    pub(super) fn keep(&mut self, values: Vec<f32>) {
        if values.is_empty() {
            return;
        }
        if self.0.len() == Self::KEPT {
            self.0.remove(0);
        }
        self.0.push(values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_vector_serves_the_next_take_of_its_length() {
        let mut spares = Spares::default();
        let kept = vec![1.0; 5];
        let at = kept.as_ptr();
        spares.keep(kept);
        spares.keep(vec![2.0; 3]);
        let again = spares.take(5);
        assert_eq!(again.as_ptr(), at, "the kept allocation, not a new one");
        assert_eq!(
            spares.take(4),
            vec![0.0; 4],
            "no kept vector of that length"
        );
        assert_eq!(spares.take(3), vec![2.0; 3]);
        assert_eq!(spares.take(3), vec![0.0; 3], "each kept vector serves once");
    }

    #[test]
    fn the_oldest_goes_beyond_the_bound() {
        let mut spares = Spares::default();
        for len in 1..=Spares::KEPT + 1 {
            spares.keep(vec![len as f32; len]);
        }
        assert_eq!(spares.0.len(), Spares::KEPT);
        assert_eq!(spares.take(1), vec![0.0], "length 1 was the oldest");
        assert_eq!(spares.take(2), vec![2.0; 2]);
    }
}
