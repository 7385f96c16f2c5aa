//! The log as evidence: the hash chain, signed checkpoints, offline verification, search, and the upkeep of
//! closed files (indexes, compression, retention).
//!
//! Owns everything that reads the log files after they are written, and the formats that make them checkable.
//! Only [`crate::journal`] writes records; it uses [`chain`] to seal them and [`checkpoint`] to sign checkpoints.
//! The tools (`trail verify`, `trail search`) read the files directly and never need the daemon.

pub mod chain;
pub mod checkpoint;
pub mod files;
pub mod index;
pub mod maintenance;
pub mod search;
pub mod verify;
