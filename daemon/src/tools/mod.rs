//! The offline tools over the log files: `trail verify` and `trail search`.
//!
//! They read the files directly (through [`crate::log`]) and never need the daemon.

pub mod search;
pub mod verify;
