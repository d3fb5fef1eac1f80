//! The end-to-end harness lives in `thaw-benches` so every crate's tests share it.
#![allow(unused_imports)]

pub use thaw_benches::harness::*;
