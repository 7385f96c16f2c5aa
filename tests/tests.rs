//! Integration tests: the real `traild` and `trail` binaries over a real Unix socket in a temp dir.

mod util;

mod cli;
mod durability;
mod evidence;
mod postgres_sink;
mod sinks;
mod submission;
