//! The orders service over gRPC: a tonic server with `IdempotencyLayer` on
//! it, and a tonic client that retries with the same key.
//!
//! ```text
//! cargo run --example grpc_orders -- [--listen 127.0.0.1:50051] [--concurrent reject|wait] [--demo-only]
//! ```
//!
//! The layer goes on the server with `Server::builder().layer(...)`, like
//! any Tower layer. It knows a gRPC call by its `content-type`
//! (`application/grpc*`), takes the key from the `idempotency-key` metadata
//! entry, and answers in gRPC: a replay carries the first call's message,
//! status and trailers, marked with `idempotent-replayed: true` metadata; a
//! missing key is `INVALID_ARGUMENT`, the same key with another message
//! `FAILED_PRECONDITION`, a duplicate in flight `ABORTED` (or, with
//! `--concurrent wait`, the first call's answer). `Chat`, a bidirectional
//! stream, is listed with `grpc_streaming_paths`, so it passes through.
//!
//! The client sets the key with an interceptor (`SetIdempotencyKey`), from
//! the key the caller gave the call. On start, a client in this process
//! creates an order and retries it (one run, the retry replayed), and orders
//! 0 of something (`FAILED_PRECONDITION`, replayed too); then the server
//! runs until Ctrl-C (or exits, with `--demo-only`) and prints `grpcurl`
//! lines to try. The protobuf code is generated once and checked in
//! (`grpc_orders/orders.rs`, from `grpc_orders/orders.proto`), so building
//! this needs no `protoc`.

// A crate root finds its modules beside it: these live in `grpc_orders/`.
#[path = "grpc_orders/orders.rs"]
// Generated, and kept as generated: all of the service's API, used or not.
#[allow(unreachable_pub, dead_code)]
#[rustfmt::skip]
mod orders;
#[path = "grpc_orders/service.rs"]
mod service;

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tower_idempotency::{Concurrent, IdempotencyLayer};

use orders::orders_client::OrdersClient;
use orders::orders_server::OrdersServer;
use orders::CreateOrderRequest;
use service::{keyed, OrdersService, SetIdempotencyKey, STREAMING_PATHS};

#[derive(Debug, Parser)]
#[command(about = "An orders gRPC service behind tower-idempotency, on tonic")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// What a duplicate gets while the first call is in flight.
    #[arg(long, value_enum, default_value_t = Mode::Reject)]
    concurrent: Mode,
    /// Run the client demo, then exit instead of serving on.
    #[arg(long)]
    demo_only: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// ABORTED, with `grpc-retry-pushback-ms`.
    Reject,
    /// Wait for the first call and replay its answer.
    Wait,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args = Args::parse();
    let concurrent = match args.concurrent {
        Mode::Reject => Concurrent::Reject,
        Mode::Wait => Concurrent::wait(),
    };
    let layer = IdempotencyLayer::builder()
        .concurrent(concurrent)
        .require_key(true)
        .grpc_streaming_paths(STREAMING_PATHS)
        .build()?;
    let engine = layer.handle();
    let orders = OrdersService::default();

    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let server = Server::builder()
        .layer(layer)
        .add_service(OrdersServer::new(orders.clone()))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        });
    let server = tokio::spawn(server);
    println!(
        "orders gRPC service behind tower-idempotency on http://{addr} (concurrent: {:?})\n",
        args.concurrent
    );

    demo(addr).await?;
    println!(
        "CreateOrder ran {} times for 4 calls; the layer's counters: {:?}\n",
        orders.executions(),
        engine.stats()
    );
    if args.demo_only {
        return Ok(());
    }
    print_grpcurl(addr);
    server.await??;
    Ok(())
}

/// A first call and its retry, for an order and for a refused order.
async fn demo(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = OrdersClient::with_interceptor(channel, SetIdempotencyKey);

    for attempt in ["first call", "retry"] {
        let request = CreateOrderRequest {
            item: "book".into(),
            quantity: 2,
        };
        let response = client.create_order(keyed("demo-order-1", request)).await?;
        let replayed = response.metadata().get("idempotent-replayed").is_some();
        println!("{attempt}: {:?} (replayed: {replayed})", response.get_ref());
    }
    for attempt in ["first call", "retry"] {
        let request = CreateOrderRequest {
            item: "pen".into(),
            quantity: 0,
        };
        let status = client
            .create_order(keyed("demo-order-2", request))
            .await
            .expect_err("quantity 0 is refused");
        let replayed = status.metadata().get("idempotent-replayed").is_some();
        println!(
            "{attempt}: {:?} {:?} (replayed: {replayed})",
            status.code(),
            status.message()
        );
    }
    println!();
    Ok(())
}

fn print_grpcurl(addr: SocketAddr) {
    let proto = "-import-path examples/grpc_orders -proto orders.proto";
    println!(
        "# Replay: run it twice; the second answer has the same id and `idempotent-replayed: true`"
    );
    println!(
        "grpcurl -plaintext -v {proto} -H 'idempotency-key: demo-1' \
         -d '{{\"item\":\"book\",\"quantity\":1}}' {addr} orders.Orders/CreateOrder\n"
    );
    println!("# FAILED_PRECONDITION (mismatch): the same key with another message");
    println!(
        "grpcurl -plaintext -v {proto} -H 'idempotency-key: demo-1' \
         -d '{{\"item\":\"pen\",\"quantity\":1}}' {addr} orders.Orders/CreateOrder\n"
    );
    println!("# INVALID_ARGUMENT: no key");
    println!(
        "grpcurl -plaintext -v {proto} -d '{{\"item\":\"book\",\"quantity\":1}}' \
         {addr} orders.Orders/CreateOrder\n"
    );
    println!("# The streaming method passes through");
    println!("grpcurl -plaintext {proto} -d '{{\"text\":\"hi\"}}' {addr} orders.Orders/Chat\n");
}
