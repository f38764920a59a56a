//! Local mode: the coordinator starts the worker processes itself, watches
//! them and restarts the ones a re-formed group needs ([`launcher`]), each
//! on its own GPU ([`gpus`]).

pub(crate) mod gpus;
pub(crate) mod launcher;
