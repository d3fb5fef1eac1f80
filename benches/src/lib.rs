//! Thaw's load harness and test support: the builders that start the real binaries, used
//! by the end-to-end tests of every crate and by the benchmarks.
#![forbid(unsafe_code)]

pub mod harness;
pub mod load;
pub mod promtools;
pub mod raw_app;
pub mod testbed;
