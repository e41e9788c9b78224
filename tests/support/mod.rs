//! The helpers every test binary shares (`mod support;` in each binary's
//! root): HTTP servers and clients ([`common`]), the per-store test runner
//! and the shared stores ([`stores`]), and Redis servers of a test's own
//! ([`redis`]).
#![allow(dead_code, unreachable_pub, unused_imports, unused_macros)]

pub mod common;
#[cfg(feature = "redis")]
pub mod redis;
pub mod relay;
pub mod stores;
