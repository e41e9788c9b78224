//! The HTTP layer over loopback, on each store: the contract, replay,
//! concurrency, disconnects, streaming, tracing, stacks and action keys.

mod support;

mod http {
    mod action_key;
    mod behaviour_rows;
    mod concurrency;
    mod contract;
    mod disconnect;
    mod grpc_layer;
    mod protocol_only_store;
    mod replay;
    mod stacks;
    mod streaming;
    mod tower_habits;
    mod trace;
    mod unclear;
}
