//! How flat gradients travel: split into chunks of raw little-endian
//! bytes, as f32 or bf16.
//!
//! bf16 halves the bytes on the wire; values are always reduced in f32
//! (the coordinator decodes, sums and divides in f32, then encodes the mean
//! again), so only the transport is lossy, identically for every replica.

use bytes::{Bytes, BytesMut};
use half::bf16;
use serde::{Deserialize, Serialize};

/// Element encoding on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// 4 bytes per element, exact.
    #[default]
    F32,
    /// 2 bytes per element (round to nearest even), reduced in f32.
    Bf16,
}

impl WireFormat {
    /// Bytes per element.
    pub fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }
}

/// A chunk whose byte length does not match what its header promises.
#[derive(Debug, thiserror::Error)]
#[error("gradient chunk holds {bytes} bytes, expected {expected} ({elems} {format:?} elements)")]
pub struct WireError {
    /// Bytes received.
    pub bytes: usize,
    /// Bytes expected.
    pub expected: usize,
    /// Elements expected.
    pub elems: usize,
    /// Declared format.
    pub format: WireFormat,
}

/// Encodes `values` for the wire.
pub fn encode(values: &[f32], format: WireFormat) -> Bytes {
    let mut out = BytesMut::zeroed(values.len() * format.width());
    match format {
        WireFormat::F32 => {
            for (dst, v) in out.chunks_exact_mut(4).zip(values) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
        WireFormat::Bf16 => {
            for (dst, v) in out.chunks_exact_mut(2).zip(values) {
                dst.copy_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
        }
    }
    out.freeze()
}

/// Decodes a chunk into `out`, which must have exactly its element count.
pub fn decode_into(bytes: &[u8], format: WireFormat, out: &mut [f32]) -> Result<(), WireError> {
    combine(bytes, format, out, |dst, value| *dst = value)
}

/// Adds a chunk element-wise into `acc`.
pub fn add_into(bytes: &[u8], format: WireFormat, acc: &mut [f32]) -> Result<(), WireError> {
    combine(bytes, format, acc, |dst, value| *dst += value)
}

/// Decodes each element of `bytes` and folds it into `target` with `op`.
fn combine(
    bytes: &[u8],
    format: WireFormat,
    target: &mut [f32],
    op: impl Fn(&mut f32, f32),
) -> Result<(), WireError> {
    check(bytes, format, target.len())?;
    match format {
        WireFormat::F32 => {
            for (dst, src) in target.iter_mut().zip(bytes.chunks_exact(4)) {
                op(
                    dst,
                    f32::from_le_bytes(src.try_into().expect("4-byte chunk")),
                );
            }
        }
        WireFormat::Bf16 => {
            for (dst, src) in target.iter_mut().zip(bytes.chunks_exact(2)) {
                op(
                    dst,
                    bf16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32(),
                );
            }
        }
    }
    Ok(())
}

fn check(bytes: &[u8], format: WireFormat, elems: usize) -> Result<(), WireError> {
    let expected = elems * format.width();
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(WireError {
            bytes: bytes.len(),
            expected,
            elems,
            format,
        })
    }
}

/// How a gradient of `total` elements splits into chunks of at most
/// `chunk_elems` elements; the last chunk may be shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Elements in the whole gradient.
    pub total: usize,
    /// Elements per full chunk.
    pub chunk_elems: usize,
}

impl Chunking {
    /// Chunking for `total` elements with chunks of `chunk_bytes` in `format`.
    pub fn new(total: usize, chunk_bytes: usize, format: WireFormat) -> Self {
        Self {
            total,
            chunk_elems: (chunk_bytes / format.width()).max(1),
        }
    }

    /// Number of chunks (at least one, even for an empty gradient).
    pub fn count(&self) -> usize {
        self.total.div_ceil(self.chunk_elems).max(1)
    }

    /// Element range of chunk `index`.
    pub fn range(&self, index: usize) -> std::ops::Range<usize> {
        let start = (index * self.chunk_elems).min(self.total);
        start..(start + self.chunk_elems).min(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_exactly() {
        let values = [0.0, -1.5, f32::MIN_POSITIVE, 3.0e38, 1.0 / 3.0];
        let mut out = [0.0; 5];
        decode_into(&encode(&values, WireFormat::F32), WireFormat::F32, &mut out).unwrap();
        assert_eq!(values.map(f32::to_bits), out.map(f32::to_bits));
    }

    #[test]
    fn bf16_keeps_about_three_significant_digits() {
        let values = [1.0, -2.5, 0.1234, 1000.0];
        let mut out = [0.0; 4];
        decode_into(
            &encode(&values, WireFormat::Bf16),
            WireFormat::Bf16,
            &mut out,
        )
        .unwrap();
        for (v, o) in values.iter().zip(out) {
            assert!((v - o).abs() <= v.abs() / 128.0, "{v} -> {o}");
        }
    }

    #[test]
    fn add_into_accumulates() {
        let mut acc = [1.0, 2.0];
        add_into(
            &encode(&[0.5, -4.0], WireFormat::F32),
            WireFormat::F32,
            &mut acc,
        )
        .unwrap();
        assert_eq!(acc, [1.5, -2.0]);
    }

    #[test]
    fn wrong_length_is_refused_with_sizes() {
        let err = decode_into(&[0; 6], WireFormat::F32, &mut [0.0; 2]).unwrap_err();
        assert_eq!((err.bytes, err.expected), (6, 8));
    }

    #[test]
    fn chunking_covers_every_element_once() {
        let c = Chunking::new(10, 12, WireFormat::F32);
        assert_eq!(c.count(), 4);
        let covered: Vec<usize> = (0..c.count()).flat_map(|i| c.range(i)).collect();
        assert_eq!(covered, (0..10).collect::<Vec<_>>());
    }
}
