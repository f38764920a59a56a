//! Local mode: the coordinator starts the worker processes itself, watches
//! them and restarts the ones a re-formed group needs.

pub(crate) mod launcher;
