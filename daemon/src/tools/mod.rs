//! The offline tools over the log files: `trail verify`, `trail search`, `trail prove` and `trail verify-proof`.
//!
//! They read the files directly (through [`crate::log`]) and never need the daemon.

pub mod prove;
pub mod search;
pub mod verify;
