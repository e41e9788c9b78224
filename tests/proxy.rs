//! The `reverse_proxy` example, run for real (see `reverse_proxy/mod.rs`).

// The `grpc_orders` example's generated code, where its service (run as
// the upstream of `reverse_proxy::grpc`) finds it: `crate::orders`.
#[path = "../examples/grpc_orders/orders.rs"]
#[allow(unreachable_pub, dead_code)]
#[rustfmt::skip]
mod orders;
mod reverse_proxy;
mod support;
