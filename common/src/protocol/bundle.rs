//! Named objects packed into one byte string and back: how a replica's
//! state (the same objects a checkpoint holds) travels from a member that
//! has it, through the coordinator, to one that joins without it.
//!
//! Layout: a little-endian u32 count, then per object a u32 name length,
//! the UTF-8 name, a u64 length and the bytes. Decoding checks every length
//! against what is left, so a truncated or forged bundle is an error, never
//! an allocation of what it claims.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Most objects a bundle may hold.
pub const MAX_OBJECTS: usize = 64;
/// Longest object name.
pub const MAX_NAME: usize = 256;

/// A bundle that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed state bundle: {0}")]
pub struct BundleError(String);

/// Packs `objects` into one byte string.
pub fn encode(objects: &[(String, Bytes)]) -> Bytes {
    let size: usize = objects.iter().map(|(n, b)| 12 + n.len() + b.len()).sum();
    let mut out = BytesMut::with_capacity(4 + size);
    out.put_u32_le(objects.len() as u32);
    for (name, data) in objects {
        out.put_u32_le(name.len() as u32);
        out.put_slice(name.as_bytes());
        out.put_u64_le(data.len() as u64);
        out.put_slice(data);
    }
    out.freeze()
}

/// Unpacks what [`encode`] packed; the objects share `bundle`'s memory.
pub fn decode(mut bundle: Bytes) -> Result<Vec<(String, Bytes)>, BundleError> {
    let fail = |what: &str| BundleError(what.to_string());
    if bundle.remaining() < 4 {
        return Err(fail("shorter than its header"));
    }
    let count = bundle.get_u32_le() as usize;
    if count > MAX_OBJECTS {
        return Err(BundleError(format!(
            "{count} objects, at most {MAX_OBJECTS}"
        )));
    }
    let mut objects = Vec::with_capacity(count);
    for _ in 0..count {
        if bundle.remaining() < 4 {
            return Err(fail("truncated before a name"));
        }
        let name_len = bundle.get_u32_le() as usize;
        if name_len > MAX_NAME || bundle.remaining() < name_len + 8 {
            return Err(fail("a name is too long or truncated"));
        }
        let name = String::from_utf8(bundle.split_to(name_len).to_vec())
            .map_err(|_| fail("a name is not UTF-8"))?;
        let len = bundle.get_u64_le();
        if len > bundle.remaining() as u64 {
            return Err(BundleError(format!(
                "object {name:?} claims {len} bytes, {} remain",
                bundle.remaining()
            )));
        }
        objects.push((name, bundle.split_to(len as usize)));
    }
    if bundle.has_remaining() {
        return Err(fail("bytes after the last object"));
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip() {
        let objects = vec![
            ("state.json".to_string(), Bytes::from_static(b"{}")),
            ("generator.mpk".to_string(), Bytes::from(vec![7u8; 1000])),
            ("empty".to_string(), Bytes::new()),
        ];
        assert_eq!(decode(encode(&objects)).unwrap(), objects);
    }

    #[test]
    fn truncated_or_forged_bundles_are_refused_without_allocating() {
        let good = encode(&[("a".to_string(), Bytes::from_static(b"xyz"))]);
        assert!(decode(good.slice(..good.len() - 1)).is_err());
        let mut forged = BytesMut::new();
        forged.put_u32_le(1);
        forged.put_u32_le(1);
        forged.put_slice(b"a");
        forged.put_u64_le(u64::MAX);
        assert!(
            decode(forged.freeze())
                .unwrap_err()
                .to_string()
                .contains("claims")
        );
        let mut many = BytesMut::new();
        many.put_u32_le(u32::MAX);
        assert!(decode(many.freeze()).is_err());
    }
}
