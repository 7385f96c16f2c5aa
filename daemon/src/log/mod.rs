//! The ground floor of the on-disk format: everything that names, reads, appends to and checks the log files.
//!
//! Owns the file names, reading files in chunks, recovery of a torn tail, the append-only file, the hash chain,
//! signed checkpoints, the Merkle tree and its cache, the deletion records retention leaves (read back), the
//! sidecar indexes and what a start finds (the last checkpoint, records after a stop). It imports only
//! [`crate::record`] and [`crate::modes`]: the journal, the spool, the sinks and the tools build on it, never the
//! other way round.

pub mod append;
pub mod chain;
pub mod checkpoint;
pub mod deletion;
pub mod files;
pub mod index;
pub mod recovery;
pub mod start;
pub mod tree;
