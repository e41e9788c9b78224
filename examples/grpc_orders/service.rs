//! The `orders.Orders` service of the `grpc_orders` example, and the client
//! interceptor that puts a call's idempotency key in its metadata. The
//! example serves it; `tests/grpc.rs` runs the same code behind the layer.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::orders::orders_server::Orders;
use crate::orders::{CreateOrderRequest, Note, Order};

/// The service's streaming methods, for
/// `IdempotencyLayerBuilder::grpc_streaming_paths`: the layer passes them
/// through. Every other call is read to its end as a unary one.
pub(crate) const STREAMING_PATHS: [&str; 1] = ["/orders.Orders/Chat"];

/// The metadata entry a refused order carries beside its status.
pub(crate) const REJECTED_FIELD: &str = "orders-rejected-field";

/// Creates orders, counting how many times the handler ran.
#[derive(Clone, Debug, Default)]
pub(crate) struct OrdersService {
    executions: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
}

impl OrdersService {
    /// How many times `CreateOrder` has run, refused orders included.
    pub(crate) fn executions(&self) -> u64 {
        self.executions.load(SeqCst)
    }
}

#[tonic::async_trait]
impl Orders for OrdersService {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let executions = self.executions.fetch_add(1, SeqCst) + 1;
        let CreateOrderRequest { item, quantity } = request.into_inner();
        if quantity == 0 {
            // A definite answer that a retry would meet again: the layer
            // stores it, and a retry gets it without running this again.
            let mut metadata = MetadataMap::new();
            metadata.insert(REJECTED_FIELD, MetadataValue::from_static("quantity"));
            return Err(Status::with_metadata(
                Code::FailedPrecondition,
                format!("cannot order 0 of {item:?}: quantity must be at least 1"),
                metadata,
            ));
        }
        let id = self.next_id.fetch_add(1, SeqCst) + 1;
        Ok(Response::new(Order {
            id,
            item,
            quantity,
            executions,
        }))
    }

    type ChatStream = Pin<Box<dyn Stream<Item = Result<Note, Status>> + Send>>;

    /// Answers each note as it arrives, before the next one comes.
    async fn chat(
        &self,
        request: Request<Streaming<Note>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let echoes = request.into_inner().map(|note| {
            note.map(|note| Note {
                text: format!("echo: {}", note.text),
            })
        });
        Ok(Response::new(Box::pin(echoes)))
    }
}

/// The idempotency key of one logical call, in its request's extensions
/// (see [`keyed`]); every retry of the call sends the same key.
#[derive(Clone, Debug)]
pub(crate) struct CallKey(pub(crate) String);

/// A client interceptor: copies the call's [`CallKey`] into the
/// `idempotency-key` metadata entry, where the layer looks for it. A call
/// without one goes out without a key.
///
/// ```ignore
/// let client = OrdersClient::with_interceptor(channel, SetIdempotencyKey);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SetIdempotencyKey;

impl Interceptor for SetIdempotencyKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(CallKey(key)) = request.extensions().get::<CallKey>() {
            let value = MetadataValue::try_from(key.as_str()).map_err(|_| {
                Status::invalid_argument("an idempotency key must be visible ASCII")
            })?;
            request.metadata_mut().insert("idempotency-key", value);
        }
        Ok(request)
    }
}

/// A request for `message` under the idempotency key `key`.
pub(crate) fn keyed<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(CallKey(key.to_owned()));
    request
}
