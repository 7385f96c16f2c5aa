//! Integration tests: the real `traild` and `trail` binaries over a real Unix socket in a temp dir.

mod util;

mod access;
mod cli;
mod connection_limits;
mod durability;
mod evidence;
mod idempotency;
mod metrics;
mod modes;
mod nats;
mod plugin_reload;
mod plugin_safety;
mod postgres_sink;
mod python_client;
mod reload;
mod rust_client;
mod sdk;
mod service;
mod sinks;
mod socket_trust;
mod submission;
mod systemd;
mod tidy;
