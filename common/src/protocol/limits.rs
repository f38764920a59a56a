//! The sizes both sides hold every peer to, whatever it claims, and the
//! HTTP/2 settings gradient streams need. Not configuration keys: a worker
//! and a coordinator of one protocol version agree on them.

/// The largest gRPC message: one chunk plus headers.
pub const MAX_CHUNK_BYTES: usize = 64 << 20;

/// HTTP/2 flow-control windows for gradient streams. h2's 64 KiB default
/// costs a window-update round trip every 64 KiB, which caps a 25 MB
/// all-reduce far below what the socket can carry.
pub const STREAM_WINDOW_BYTES: u32 = 16 << 20;
/// Connection-wide window (several streams share one connection).
pub const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;
/// Largest HTTP/2 DATA frame each side accepts: h2's 16 KiB default splits
/// a 4 MiB chunk into 256 frames.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Largest replica state a member receives (a DCGAN-128 with Adam is
/// well under 1 GiB).
pub const MAX_STATE_BYTES: u64 = 4 << 30;

/// Scheme of a coordinator reached through a Unix domain socket.
pub const UNIX_SCHEME: &str = "unix://";
