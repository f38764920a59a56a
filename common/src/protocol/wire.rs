//! How flat gradients travel: split into chunks of raw little-endian
//! bytes, as f32, bf16 or int8 with a scale per block.
//!
//! Values are always reduced in f32 (the coordinator decodes, sums in rank
//! order and divides in f32, then encodes the mean again), so only the
//! transport is lossy, identically for every replica. int8 rounds away
//! more than a step can afford to lose, so what it drops is carried to the
//! next step instead (error feedback, [`encode_carrying`]): each worker
//! keeps the residual of its own gradient, the coordinator that of the mean.

use bytes::{Bytes, BytesMut};
use half::bf16;
use serde::{Deserialize, Serialize};

/// Elements per int8 block, each with its own f32 scale: the scale costs
/// 1.6 % more bytes, and one large element flattens at most 255 others.
pub const INT8_BLOCK: usize = 256;

/// Which network a gradient (or an averaged state) belongs to: the two
/// all-reduces of every step. [`pb::Net`] is its wire spelling, which also
/// has an "unspecified" a peer may send.
///
/// [`pb::Net`]: super::pb::Net
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// The discriminator.
    Discriminator,
    /// The generator.
    Generator,
}

/// Element encoding on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    /// 4 bytes per element, exact.
    #[default]
    F32,
    /// 2 bytes per element (round to nearest even), reduced in f32.
    Bf16,
    /// 1 byte per element plus an f32 scale per [`INT8_BLOCK`] elements
    /// (the block's largest magnitude / 127), reduced in f32; the rounding
    /// is carried to the next step (error feedback).
    Int8,
}

impl WireFormat {
    /// Bytes that `elems` elements take on the wire (for int8: from the
    /// start of a block).
    pub fn encoded_len(self, elems: usize) -> usize {
        match self {
            Self::F32 => elems * 4,
            Self::Bf16 => elems * 2,
            Self::Int8 => elems + 4 * elems.div_ceil(INT8_BLOCK),
        }
    }

    /// Whether what the encoding rounds away is carried to the next step
    /// (error feedback), which makes the residual part of the training
    /// state.
    pub fn carries_residual(self) -> bool {
        self == Self::Int8
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

/// `values` as f32 wire bytes without an encoding pass: on a little-endian
/// host (every target this builds for) the two are the same bytes, so an
/// f32 chunk is a slice of the gradient itself and the only copies left
/// are the transport's.
pub fn f32_in_place(values: Vec<f32>) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::from_owner(LittleEndian(values))
    } else {
        encode(&values, WireFormat::F32)
    }
}

/// Owns a gradient so [`Bytes`] can lend out its memory.
struct LittleEndian(Vec<f32>);

impl AsRef<[u8]> for LittleEndian {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Encodes `values` for the wire.
pub fn encode(values: &[f32], format: WireFormat) -> Bytes {
    let mut out = BytesMut::zeroed(format.encoded_len(values.len()));
    encode_into(values, format, &mut out);
    out.freeze()
}

/// Encodes `values + carried` (the residual the previous steps rounded
/// away) and writes to `left` what this encoding rounded away from that
/// sum: error feedback, so over many steps every part of every gradient
/// arrives. In f32 nothing is left. `carried` and `left` have the length
/// of `values`.
pub fn encode_carrying(
    values: &[f32],
    carried: &[f32],
    left: &mut [f32],
    format: WireFormat,
) -> Bytes {
    debug_assert!(values.len() == carried.len() && values.len() == left.len());
    let mut out = BytesMut::zeroed(format.encoded_len(values.len()));
    // One block at a time, so the sum stays in L1.
    let mut sum = [0.0f32; INT8_BLOCK];
    let mut at = 0;
    for ((v, c), l) in values
        .chunks(INT8_BLOCK)
        .zip(carried.chunks(INT8_BLOCK))
        .zip(left.chunks_mut(INT8_BLOCK))
    {
        let sum = &mut sum[..v.len()];
        sum.iter_mut()
            .zip(v.iter().zip(c))
            .for_each(|(s, (v, c))| *s = v + c);
        let bytes = format.encoded_len(v.len());
        encode_leaving(sum, format, &mut out[at..at + bytes], l);
        at += bytes;
    }
    out.freeze()
}

/// Encodes `values` into `out` (exactly their encoded length) and writes
/// to `left` what the encoding rounded away.
fn encode_leaving(values: &[f32], format: WireFormat, out: &mut [u8], left: &mut [f32]) {
    match format {
        WireFormat::F32 => {
            encode_into(values, format, out);
            left.fill(0.0);
        }
        WireFormat::Bf16 => {
            encode_into(values, format, out);
            left.copy_from_slice(values);
            combine(out, format, left, |l, sent| *l -= sent)
                .expect("the encoding has the values' length");
        }
        WireFormat::Int8 => {
            for ((block, dst), left) in values
                .chunks(INT8_BLOCK)
                .zip(out.chunks_mut(INT8_BLOCK + 4))
                .zip(left.chunks_mut(INT8_BLOCK))
            {
                int8_block(block, dst, Some(left));
            }
        }
    }
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
        WireFormat::Int8 => {
            for (block, dst) in values
                .chunks(INT8_BLOCK)
                .zip(out.chunks_mut(INT8_BLOCK + 4))
            {
                int8_block(block, dst, None);
            }
        }
    }
}

/// Adding then subtracting 1.5 · 2^23 rounds an f32 below 2^22 in
/// magnitude to the nearest integer (ties to even) with plain arithmetic,
/// which vectorises where `round` would call into libm.
const ROUNDING: f32 = 12_582_912.0;

/// One int8 block into `dst`: its scale (the largest magnitude / 127, NaN
/// when the block holds NaN or ±Inf, so the decoded block and the mean are
/// not finite and the non-finite policy sees it), then one byte per value;
/// with `left`, what the encoding rounded away from each value.
fn int8_block(values: &[f32], dst: &mut [u8], left: Option<&mut [f32]>) {
    let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let nan = values.iter().fold(false, |n, v| n | v.is_nan());
    let scale = match nan || !max.is_finite() {
        true => f32::NAN,
        false => max / 127.0,
    };
    dst[..4].copy_from_slice(&scale.to_le_bytes());
    let inverse = match scale > 0.0 {
        true => (127.0 / max).min(f32::MAX),
        false => 0.0,
    };
    for (d, v) in dst[4..].iter_mut().zip(values) {
        let q = ((v * inverse + ROUNDING) - ROUNDING).clamp(-127.0, 127.0);
        *d = q as i8 as u8;
    }
    if let Some(left) = left {
        for ((l, v), d) in left.iter_mut().zip(values).zip(&dst[4..]) {
            *l = v - f32::from(*d as i8) * scale;
        }
    }
}

/// Decodes a chunk into `out`, which must have exactly its element count.
pub fn decode_into(bytes: &[u8], format: WireFormat, out: &mut [f32]) -> Result<(), WireError> {
    combine(bytes, format, out, |dst, value| *dst = value)
}

/// Elements reduced at a time by [`mean`]: the block and its encoded bytes
/// stay in L1 while every part is added into it. A multiple of
/// [`INT8_BLOCK`], so a block's bytes start at a scale.
const MEAN_BLOCK: usize = 4 * INT8_BLOCK;

/// The element-wise mean of `parts` (one encoded chunk per rank, in rank
/// order), encoded in `format`: `(((p0 + p1) + p2) + …) / world` in f32,
/// so the bits do not depend on which part arrived first. Also says whether
/// every element of the mean is finite: a NaN or Inf in any part (or a sum
/// that overflows) shows in the mean, so one flag checks them all.
///
/// With `carried` (the coordinator's residual for this chunk, under error
/// feedback), `carried` is added to the mean before it is encoded, and
/// [`Mean::residual`] is what that encoding rounded away.
///
/// One pass over the inputs, block by block, with no intermediate vector:
/// this runs once per chunk on the coordinator, on bytes all workers wait for.
pub fn mean(
    parts: &[Bytes],
    format: WireFormat,
    world: usize,
    carried: Option<&[f32]>,
) -> Result<Mean, WireError> {
    let elems = parts.first().map_or(0, |p| elements_in(p.len(), format));
    for part in parts {
        check(part, format, elems)?;
    }
    if let Some(carried) = carried {
        check_carried(carried, elems, format)?;
    }
    let n = world as f32;
    let mut out = BytesMut::with_capacity(format.encoded_len(elems));
    let mut residual = carried.map(|_| Vec::with_capacity(elems));
    let mut acc = [0.0f32; MEAN_BLOCK];
    let mut left = [0.0f32; MEAN_BLOCK];
    let mut encoded = [0u8; MEAN_BLOCK * 4];
    let mut finite = true;
    for start in (0..elems).step_by(MEAN_BLOCK) {
        let len = MEAN_BLOCK.min(elems - start);
        let range = format.encoded_len(start)..format.encoded_len(start + len);
        let block = &mut acc[..len];
        combine(&parts[0][range.clone()], format, block, |dst, value| {
            *dst = value
        })?;
        for part in &parts[1..] {
            combine(&part[range.clone()], format, block, |dst, value| {
                *dst += value
            })?;
        }
        block.iter_mut().for_each(|v| *v /= n);
        if let Some(carried) = carried {
            block
                .iter_mut()
                .zip(&carried[start..start + len])
                .for_each(|(v, c)| *v += c);
        }
        block.iter().for_each(|v| finite &= v.is_finite());
        let bytes = &mut encoded[..format.encoded_len(len)];
        match residual.as_mut() {
            Some(residual) => {
                let left = &mut left[..len];
                encode_leaving(block, format, bytes, left);
                residual.extend_from_slice(left);
            }
            None => encode_into(block, format, bytes),
        }
        out.extend_from_slice(bytes);
    }
    Ok(Mean {
        bytes: out.freeze(),
        finite,
        residual,
    })
}

/// What [`mean`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Mean {
    /// The encoded mean.
    pub bytes: Bytes,
    /// Whether every element of it is finite.
    pub finite: bool,
    /// What the encoding rounded away, when a residual was carried in.
    pub residual: Option<Vec<f32>>,
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
        // A block's values are at most 127 times its scale.
        WireFormat::Int8 => bytes
            .chunks(INT8_BLOCK + 4)
            .all(|b| b.len() >= 4 && f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
    }
}

/// The element count of `bytes` bytes in `format`, rounded down (the length
/// check that follows refuses what does not match exactly).
fn elements_in(bytes: usize, format: WireFormat) -> usize {
    match format {
        WireFormat::F32 => bytes / 4,
        WireFormat::Bf16 => bytes / 2,
        WireFormat::Int8 => {
            let full = bytes / (INT8_BLOCK + 4);
            full * INT8_BLOCK + (bytes % (INT8_BLOCK + 4)).saturating_sub(4)
        }
    }
}

fn check_carried(carried: &[f32], elems: usize, format: WireFormat) -> Result<(), WireError> {
    match carried.len() == elems {
        true => Ok(()),
        false => Err(WireError {
            bytes: format.encoded_len(carried.len()),
            expected: format.encoded_len(elems),
            elems,
            format,
        }),
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
        WireFormat::Int8 => {
            for (values, src) in target
                .chunks_mut(INT8_BLOCK)
                .zip(bytes.chunks(INT8_BLOCK + 4))
            {
                let scale = f32::from_le_bytes(src[..4].try_into().expect("a block's scale"));
                for (dst, q) in values.iter_mut().zip(&src[4..]) {
                    op(dst, f32::from(*q as i8) * scale);
                }
            }
        }
    }
    Ok(())
}

fn check(bytes: &[u8], format: WireFormat, elems: usize) -> Result<(), WireError> {
    let expected = format.encoded_len(elems);
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
    ///
    /// int8 chunks hold whole blocks, as many as fit `chunk_bytes` in f32:
    /// the steps before a checkpoint travel exact, in f32, chunked alike.
    pub fn new(total: usize, chunk_bytes: usize, format: WireFormat) -> Self {
        let chunk_elems = match format {
            WireFormat::Int8 => (chunk_bytes / 4 / INT8_BLOCK).max(1) * INT8_BLOCK,
            _ => (chunk_bytes / format.encoded_len(1)).max(1),
        };
        Self { total, chunk_elems }
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
    fn a_chunk_sliced_in_place_is_the_chunk_encoded() {
        let values = vec![0.0, -1.5, f32::MIN_POSITIVE, 3.0e38, 1.0 / 3.0, f32::NAN];
        let chunk = encode(&values[1..4], WireFormat::F32);
        let whole = encode(&values, WireFormat::F32);
        let shared = f32_in_place(values);
        assert_eq!(shared, whole);
        assert_eq!(shared.slice(4..16), chunk);
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
            &mean(&parts, WireFormat::F32, 3, None).unwrap().bytes,
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
        for format in [WireFormat::F32, WireFormat::Bf16, WireFormat::Int8] {
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
                mean(&parts, format, 3, None).unwrap(),
                Mean {
                    bytes: encode(&expected, format),
                    finite: true,
                    residual: None,
                },
                "{format:?}"
            );
        }
    }

    #[test]
    fn a_nan_or_inf_in_any_part_or_an_overflow_is_flagged() {
        for format in [WireFormat::F32, WireFormat::Bf16, WireFormat::Int8] {
            let clean = encode(&[1.0, 2.0], format);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let poisoned = encode(&[1.0, bad], format);
                assert!(!finite(&poisoned, format) && finite(&clean, format));
                let parts = [clean.clone(), poisoned];
                assert!(
                    !mean(&parts, format, 2, None).unwrap().finite,
                    "{bad} {format:?}"
                );
            }
            assert!(
                mean(&[clean.clone(), clean], format, 2, None)
                    .unwrap()
                    .finite
            );
        }
        let huge = encode(&[3e38], WireFormat::F32);
        let overflow = mean(&[huge.clone(), huge], WireFormat::F32, 2, None).unwrap();
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
        assert!(mean(&parts, WireFormat::F32, 2, None).is_err());
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

    fn ramp(elems: usize, seed: usize) -> Vec<f32> {
        (0..elems)
            .map(|i| (((i * 37 + seed * 11) % 199) as f32 - 99.0) * 1e-3 * (1 + i % 5) as f32)
            .collect()
    }

    #[test]
    fn int8_is_within_half_a_step_of_its_block_scale() {
        let values = ramp(3 * INT8_BLOCK + 5, 1);
        let bytes = encode(&values, WireFormat::Int8);
        assert_eq!(bytes.len(), values.len() + 4 * 4);
        let mut out = vec![0.0; values.len()];
        decode_into(&bytes, WireFormat::Int8, &mut out).unwrap();
        for (block, sent) in values.chunks(INT8_BLOCK).zip(out.chunks(INT8_BLOCK)) {
            let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (v, o) in block.iter().zip(sent) {
                assert!((v - o).abs() <= scale * 0.5 + f32::EPSILON, "{v} -> {o}");
            }
        }
        let zeros = encode(&[0.0; 7], WireFormat::Int8);
        let mut out = [1.0; 7];
        decode_into(&zeros, WireFormat::Int8, &mut out).unwrap();
        assert_eq!(
            out, [0.0; 7],
            "an all-zero block has scale 0 and stays zero"
        );
    }

    /// Error feedback's promise: what was sent plus what is still carried
    /// is exactly what was given, step after step, so nothing is lost,
    /// only delayed.
    #[test]
    fn error_feedback_delays_what_int8_rounds_away_and_loses_none_of_it() {
        let elems = 2 * INT8_BLOCK + 9;
        let mut carried = vec![0.0f32; elems];
        let mut given = vec![0.0f64; elems];
        let mut sent = vec![0.0f64; elems];
        for step in 0..50 {
            let grads = ramp(elems, step);
            let mut left = vec![0.0; elems];
            let bytes = encode_carrying(&grads, &carried, &mut left, WireFormat::Int8);
            let mut out = vec![0.0; elems];
            decode_into(&bytes, WireFormat::Int8, &mut out).unwrap();
            for i in 0..elems {
                given[i] += f64::from(grads[i]);
                sent[i] += f64::from(out[i]);
                // Exact in f32 for one step: the residual is what was not sent.
                assert_eq!((grads[i] + carried[i]) - out[i], left[i]);
            }
            carried = left;
        }
        for i in 0..elems {
            let owed = given[i] - sent[i];
            assert!((owed - f64::from(carried[i])).abs() < 1e-4, "element {i}");
        }
        let mut left = carried.clone();
        encode_carrying(&ramp(elems, 0), &carried, &mut left, WireFormat::F32);
        assert!(
            left.iter().all(|v| *v == 0.0),
            "f32 leaves nothing to carry"
        );
    }

    /// The coordinator's residual: the mean it sends plus what it carries
    /// equals the true mean plus what it carried before.
    #[test]
    fn the_mean_carries_its_own_rounding_to_the_next_step() {
        let elems = MEAN_BLOCK + INT8_BLOCK + 3;
        let parts: Vec<Bytes> = (0..3)
            .map(|r| encode(&ramp(elems, r), WireFormat::Int8))
            .collect();
        let plain = mean(&parts, WireFormat::Int8, 3, None).unwrap();
        let carried = ramp(elems, 7).iter().map(|v| v * 0.01).collect::<Vec<_>>();
        let with = mean(&parts, WireFormat::Int8, 3, Some(&carried)).unwrap();
        let residual = with.residual.clone().expect("a residual was carried in");
        let (mut m, mut sent) = (vec![0.0; elems], vec![0.0; elems]);
        decode_into(&plain.bytes, WireFormat::Int8, &mut m).unwrap();
        decode_into(&with.bytes, WireFormat::Int8, &mut sent).unwrap();
        let mut exact = vec![0.0f32; elems];
        for part in &parts {
            let mut v = vec![0.0; elems];
            decode_into(part, WireFormat::Int8, &mut v).unwrap();
            exact.iter_mut().zip(&v).for_each(|(e, v)| *e += v);
        }
        for i in 0..elems {
            let owed = exact[i] / 3.0 + carried[i];
            assert_eq!(owed - sent[i], residual[i], "element {i}");
        }
        let exact_step = mean(
            &parts
                .iter()
                .map(|_| encode(&exact, WireFormat::F32))
                .collect::<Vec<_>>(),
            WireFormat::F32,
            3,
            Some(&carried),
        )
        .unwrap();
        assert!(exact_step.residual.unwrap().iter().all(|v| *v == 0.0));
    }

    #[test]
    fn int8_lengths_are_checked_and_a_scale_that_is_not_finite_is_seen() {
        let ok = encode(&ramp(INT8_BLOCK + 1, 0), WireFormat::Int8);
        assert_eq!(elements_in(ok.len(), WireFormat::Int8), INT8_BLOCK + 1);
        assert!(
            decode_into(
                &ok[..ok.len() - 1],
                WireFormat::Int8,
                &mut vec![0.0; INT8_BLOCK + 1]
            )
            .is_err()
        );
        let mut forged = ok.to_vec();
        forged[..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(!finite(&forged, WireFormat::Int8));
        let parts = [Bytes::from(forged), ok];
        assert!(!mean(&parts, WireFormat::Int8, 2, None).unwrap().finite);
    }

    #[test]
    fn int8_chunks_hold_whole_blocks_that_fit_in_f32() {
        let c = Chunking::new(10_000, 4096, WireFormat::Int8);
        assert_eq!(c.chunk_elems, INT8_BLOCK * 4);
        assert!(WireFormat::F32.encoded_len(c.chunk_elems) <= 4096);
        assert_eq!(
            Chunking::new(10, 1024, WireFormat::Int8).chunk_elems,
            INT8_BLOCK
        );
    }
}
