//! Measuring a generator: the Sliced Wasserstein Distance ([`swd`]) and
//! its use against held-out real images ([`held_out`]).

pub mod held_out;
pub mod swd;
