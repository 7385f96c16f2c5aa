//! The client side of the protocol, from the `trail-client` crate (`clients/rust`): the `trail` tool, the tests and
//! the benchmarks talk to the daemon through it, as any program would.

pub use trail_client::*;
