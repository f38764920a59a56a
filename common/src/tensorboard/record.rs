//! One record of a TensorBoard event file (TFRecord framing):
//!
//! ```text
//! u64 length (little-endian) | u32 masked_crc32c(length bytes)
//! data                       | u32 masked_crc32c(data)
//! ```
//!
//! The CRC is Castagnoli's (CRC-32C), not the IEEE one, masked as
//! TensorFlow does so that a CRC of data that itself holds CRCs stays
//! well distributed.

/// TensorFlow's mask: rotate right by 15 bits, add a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one record, ready to be written in one piece.
pub(super) fn frame(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc(&length).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc(data).to_le_bytes());
    record
}

/// The whole records at the start of `file`, as a reader that stops at the
/// first torn or corrupt one sees them.
#[cfg(test)]
pub(super) fn whole_records(mut file: &[u8]) -> Vec<&[u8]> {
    let mut records = Vec::new();
    while file.len() >= 12 {
        let (length, rest) = file.split_at(8);
        let crc = u32::from_le_bytes(rest[..4].try_into().unwrap());
        let len = u64::from_le_bytes(length.try_into().unwrap()) as usize;
        if crc != masked_crc(length) || rest.len() < 4 + len + 4 {
            break;
        }
        let data = &rest[4..4 + len];
        let crc = u32::from_le_bytes(rest[4 + len..8 + len].try_into().unwrap());
        if crc != masked_crc(data) {
            break;
        }
        records.push(data);
        file = &rest[8 + len..];
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crc_is_castagnoli_s_masked_as_tensorflow_does() {
        // CRC-32C of "123456789" is 0xE3069283 (the IEEE CRC would be 0xCBF43926).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let expected = 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), expected);
    }

    #[test]
    fn framed_records_read_back_and_a_torn_tail_is_left_out() {
        let mut file = frame(b"first");
        file.extend(frame(b""));
        file.extend(frame(b"third record"));
        assert_eq!(
            whole_records(&file),
            [&b"first"[..], &b""[..], &b"third record"[..]]
        );
        let torn = &file[..file.len() - 3];
        assert_eq!(whole_records(torn), [&b"first"[..], &b""[..]]);
        let mut corrupt = file.clone();
        corrupt[16 + 5 + 16 + 2] ^= 1;
        assert_eq!(whole_records(&corrupt), [&b"first"[..], &b""[..]]);
    }
}
