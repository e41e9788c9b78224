//! The `reverse_proxy` example, run for real (see `reverse_proxy/mod.rs`).

mod reverse_proxy;
mod support;
