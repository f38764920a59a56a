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
    encode_into(values, format, &mut out);
    out.freeze()
}

/// Encodes `values` into `out`, which holds exactly their encoded length.
fn encode_into(values: &[f32], format: WireFormat, out: &mut [u8]) {
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
}

/// Decodes a chunk into `out`, which must have exactly its element count.
pub fn decode_into(bytes: &[u8], format: WireFormat, out: &mut [f32]) -> Result<(), WireError> {
    combine(bytes, format, out, |dst, value| *dst = value)
}

/// Elements reduced at a time by [`mean`]: the block and its encoded bytes
/// stay in L1 while every part is added into it.
const MEAN_BLOCK: usize = 1024;

/// The element-wise mean of `parts` (one encoded chunk per rank, in rank
/// order), encoded in `format`: `(((p0 + p1) + p2) + …) / world` in f32,
/// so the bits do not depend on which part arrived first. Also says whether
/// every element of the mean is finite: a NaN or Inf in any part (or a sum
/// that overflows) shows in the mean, so one flag checks them all.
///
/// One pass over the inputs, block by block, with no intermediate vector:
/// this runs once per chunk on the coordinator, on bytes all workers wait for.
pub fn mean(parts: &[Bytes], format: WireFormat, world: usize) -> Result<Mean, WireError> {
    let width = format.width();
    let elems = parts.first().map_or(0, |p| p.len() / width);
    for part in parts {
        check(part, format, elems)?;
    }
    let n = world as f32;
    let mut out = BytesMut::with_capacity(elems * width);
    let mut acc = [0.0f32; MEAN_BLOCK];
    let mut encoded = [0u8; MEAN_BLOCK * 4];
    let mut finite = true;
    for start in (0..elems).step_by(MEAN_BLOCK) {
        let len = MEAN_BLOCK.min(elems - start);
        let range = start * width..(start + len) * width;
        let block = &mut acc[..len];
        combine(&parts[0][range.clone()], format, block, |dst, value| {
            *dst = value
        })?;
        for part in &parts[1..] {
            combine(&part[range.clone()], format, block, |dst, value| {
                *dst += value
            })?;
        }
        block.iter_mut().for_each(|v| {
            *v /= n;
            finite &= v.is_finite();
        });
        let bytes = &mut encoded[..len * width];
        encode_into(block, format, bytes);
        out.extend_from_slice(bytes);
    }
    Ok(Mean {
        bytes: out.freeze(),
        finite,
    })
}

/// What [`mean`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mean {
    /// The encoded mean.
    pub bytes: Bytes,
    /// Whether every element of it is finite.
    pub finite: bool,
}

/// Whether every element of one encoded part is finite (to name the rank
/// that sent NaN or Inf once [`mean`] found one).
pub fn finite(bytes: &[u8], format: WireFormat) -> bool {
    match format {
        WireFormat::F32 => bytes
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        WireFormat::Bf16 => bytes
            .chunks_exact(2)
            .all(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).is_finite()),
    }
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
    fn mean_sums_in_rank_order_then_divides() {
        // 1e8 + 1 - 1e8 depends on the order: rank order gives 0, not 1.
        let parts: Vec<Bytes> = [1e8f32, 1.0, -1e8]
            .iter()
            .map(|v| encode(&[*v], WireFormat::F32))
            .collect();
        let mut out = [f32::NAN];
        decode_into(
            &mean(&parts, WireFormat::F32, 3).unwrap().bytes,
            WireFormat::F32,
            &mut out,
        )
        .unwrap();
        assert_eq!(out[0].to_bits(), (((1e8f32 + 1.0) - 1e8) / 3.0).to_bits());
    }

    /// Block by block equals element by element, across block edges and
    /// in both formats.
    #[test]
    fn mean_matches_the_element_wise_definition() {
        let elems = 3 * MEAN_BLOCK + 17;
        for format in [WireFormat::F32, WireFormat::Bf16] {
            let ranks: Vec<Vec<f32>> = (0..3)
                .map(|r| {
                    (0..elems)
                        .map(|i| ((i * 7 + r * 13) % 101) as f32 * 0.37 - 18.0)
                        .collect()
                })
                .collect();
            let parts: Vec<Bytes> = ranks.iter().map(|v| encode(v, format)).collect();
            let decoded: Vec<Vec<f32>> = parts
                .iter()
                .map(|p| {
                    let mut v = vec![0.0; elems];
                    decode_into(p, format, &mut v).unwrap();
                    v
                })
                .collect();
            let expected: Vec<f32> = (0..elems)
                .map(|i| (decoded[0][i] + decoded[1][i] + decoded[2][i]) / 3.0)
                .collect();
            assert_eq!(
                mean(&parts, format, 3).unwrap(),
                Mean {
                    bytes: encode(&expected, format),
                    finite: true
                },
                "{format:?}"
            );
        }
    }

    #[test]
    fn a_nan_or_inf_in_any_part_or_an_overflow_is_flagged() {
        for format in [WireFormat::F32, WireFormat::Bf16] {
            let clean = encode(&[1.0, 2.0], format);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let poisoned = encode(&[1.0, bad], format);
                assert!(!finite(&poisoned, format) && finite(&clean, format));
                let parts = [clean.clone(), poisoned];
                assert!(!mean(&parts, format, 2).unwrap().finite, "{bad} {format:?}");
            }
            assert!(mean(&[clean.clone(), clean], format, 2).unwrap().finite);
        }
        let huge = encode(&[3e38], WireFormat::F32);
        let overflow = mean(&[huge.clone(), huge], WireFormat::F32, 2).unwrap();
        assert!(
            !overflow.finite,
            "3e38 + 3e38 overflows before the division"
        );
    }

    #[test]
    fn mean_refuses_parts_of_different_lengths() {
        let parts = [
            encode(&[1.0, 2.0], WireFormat::F32),
            encode(&[1.0], WireFormat::F32),
        ];
        assert!(mean(&parts, WireFormat::F32, 2).is_err());
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
