//! What the two gRPC test crates share (`tests/grpc.rs`, the layer on a
//! tonic server; the reverse proxy's `grpc.rs`, a tonic upstream behind the
//! proxy): the example's service held at a gate, a call, and how a replay's
//! metadata is compared. Not a module of `support/mod.rs`: only those two
//! crates hold the example's code, as `crate::orders` and `crate::service`.

use tonic::codegen::InterceptedService;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::orders::orders_client::OrdersClient;
use crate::orders::orders_server::Orders;
use crate::orders::{CreateOrderRequest, Note, Order};
use crate::service::{keyed, OrdersService, SetIdempotencyKey};
use crate::support::common::{within, Gate};

/// A trailer the server stamps on each answer it sends with a message,
/// numbered: a replay carries the first answer's number, a second run would
/// not.
pub(crate) const STAMP: &str = "orders-stamp";

pub(crate) const REPLAYED: &str = "idempotent-replayed";

pub(crate) type Client = OrdersClient<InterceptedService<Channel, SetIdempotencyKey>>;

/// The example's service, each `CreateOrder` first passing `gate` when
/// there is one (to hold a call in flight).
pub(crate) struct Gated {
    pub(crate) orders: OrdersService,
    pub(crate) gate: Option<Gate>,
}

#[tonic::async_trait]
impl Orders for Gated {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        if let Some(gate) = &self.gate {
            gate.pass().await;
        }
        self.orders.create_order(request).await
    }

    type ChatStream = <OrdersService as Orders>::ChatStream;

    async fn chat(
        &self,
        request: Request<Streaming<Note>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        self.orders.chat(request).await
    }
}

pub(crate) fn order(item: &str, quantity: u32) -> CreateOrderRequest {
    CreateOrderRequest {
        item: item.to_owned(),
        quantity,
    }
}

/// `CreateOrder` under `key` (none: no `idempotency-key`).
pub(crate) async fn create(
    client: &Client,
    key: Option<&str>,
    item: &str,
    quantity: u32,
) -> Result<Response<Order>, Status> {
    let request = match key {
        Some(key) => keyed(key, order(item, quantity)),
        None => Request::new(order(item, quantity)),
    };
    within(client.clone().create_order(request)).await
}

/// The entries of `metadata` (headers and trailers) a replay must repeat,
/// sorted: all but the replay marker, `date`, `content-length` (hyper adds
/// it to a replay's head because its body's length is known: HTTP/2
/// framing, not part of the call's answer) and the names in `fresh` (made
/// anew for each answer, such as a proxy's request id).
pub(crate) fn entries(metadata: &MetadataMap, fresh: &[&str]) -> Vec<(String, String)> {
    let mut entries: Vec<_> = metadata
        .clone()
        .into_headers()
        .iter()
        .filter(|(name, _)| {
            !matches!(name.as_str(), REPLAYED | "date" | "content-length")
                && !fresh.contains(&name.as_str())
        })
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
        .collect();
    entries.sort();
    entries
}

/// Whether `metadata` carries the replay marker (and then, that it says
/// `true`).
pub(crate) fn replayed(metadata: &MetadataMap) -> bool {
    match metadata.get(REPLAYED) {
        Some(value) => {
            assert_eq!(value, "true");
            true
        }
        None => false,
    }
}
