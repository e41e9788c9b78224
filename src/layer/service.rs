//! [`Idempotent`]: the service the layer makes.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body::Body;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{BoxError, RequestBody, ResponseBody};
use super::driver::{self, Driver};
use super::future::ResponseFuture;
use super::grpc;
use super::layer::{IdempotencyLayer, Shared};
use super::IdempotencyLayerBuilder;
use crate::engine::Idempotency;
use crate::key::{HeaderKey, KeyExtractor};
use crate::problem;
use crate::stats::Stats;
use crate::store::{MemoryStore, Store};

/// Runs protected requests at most once per key and replays their first
/// response; made by [`IdempotencyLayer`](super::IdempotencyLayer).
///
/// The inner service receives `Request<RequestBody<B>>`: the client's body
/// untouched for requests that are not protected, the buffered bytes for
/// protected ones.
pub struct Idempotent<Svc, S = MemoryStore, K = HeaderKey> {
    inner: Svc,
    shared: Arc<Shared<S, K>>,
}

impl<Svc, S, K> Idempotent<Svc, S, K> {
    pub(crate) fn new(inner: Svc, shared: Arc<Shared<S, K>>) -> Self {
        Self { inner, shared }
    }

    /// The engine: stats, cache info, queries and maintenance.
    pub fn handle(&self) -> Idempotency<S> {
        self.shared.engine.clone()
    }

    /// The inner service.
    pub fn get_ref(&self) -> &Svc {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut Svc {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> Svc {
        self.inner
    }
}

impl Idempotent<()> {
    /// A builder for the layer that makes this service: the same as
    /// [`IdempotencyLayer::builder`](super::IdempotencyLayer::builder), in the
    /// spelling of tower's middlewares.
    ///
    /// ```
    /// use tower::ServiceBuilder;
    /// use tower_idempotency::Idempotent;
    ///
    /// let layer = Idempotent::layer().require_key(true).build().unwrap();
    /// let service = ServiceBuilder::new().layer(layer).service(tower::service_fn(
    ///     |_: http::Request<tower_idempotency::RequestBody<String>>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    ///     },
    /// ));
    /// # drop(service);
    /// ```
    pub fn layer() -> IdempotencyLayerBuilder {
        IdempotencyLayer::builder()
    }
}

impl<Svc, S, K> Layer<Svc> for IdempotencyLayer<S, K> {
    type Service = Idempotent<Svc, S, K>;

    fn layer(&self, inner: Svc) -> Self::Service {
        Idempotent::new(inner, self.shared.clone())
    }
}

impl<Svc: Clone, S, K> Clone for Idempotent<Svc, S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<Svc: fmt::Debug, S, K: fmt::Debug> fmt::Debug for Idempotent<Svc, S, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .field("extractor", &self.shared.extractor)
            .finish()
    }
}

impl<Svc, S, K, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotent<Svc, S, K>
where
    Svc: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    S: Store,
    K: KeyExtractor,
    ReqBody: Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = Svc::Error;
    type Future = ResponseFuture<Svc::Future, ResBody, Svc::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let counters = shared.engine.counters();
        Stats::incr(&counters.here().requests);
        let settings = &shared.settings;
        if !settings.methods.contains(request.method()) {
            return ResponseFuture::passthrough(
                self.inner.call(request.map(RequestBody::passthrough)),
            );
        }
        let (parts, body) = request.into_parts();
        let extracted = shared.extractor.extract(&parts);
        // A request without a key, where none is required, passes through
        // whatever its protocol: it costs the read of the key's header and
        // nothing more (the content type is read only for what follows).
        if matches!(extracted, Ok(None)) && !settings.require_key {
            let request = Request::from_parts(parts, RequestBody::passthrough(body));
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        let grpc = grpc::is_grpc(&parts.headers);
        if grpc && settings.is_grpc_streaming(parts.uri.path()) {
            let request = Request::from_parts(parts, RequestBody::passthrough(body));
            return ResponseFuture::passthrough(self.inner.call(request));
        }
        let key = match extracted {
            Ok(Some(key)) => key,
            Ok(None) => {
                Stats::incr(&counters.here().rejected_keys);
                return ResponseFuture::answered(grpc::own_answer(grpc, problem::missing_key()));
            }
            Err(rejection) => {
                Stats::incr(&counters.here().rejected_keys);
                let answer = problem::malformed_key(rejection.detail());
                return ResponseFuture::answered(grpc::own_answer(grpc, answer));
            }
        };
        // A declared length over the limit is refused before reading a byte.
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > settings.max_request_body as u64) {
            Stats::incr(&counters.here().too_large);
            let answer = problem::too_large(settings.max_request_body);
            return ResponseFuture::answered(grpc::own_answer(grpc, answer));
        }
        // The driver calls the service only after awaiting the store, so it
        // must own a service that is ready: take the one `poll_ready` readied
        // and leave a clone in its place for the next `poll_ready` (tower's
        // documented pattern for middleware that call the inner service
        // from a future).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let driver = Driver {
            inner,
            shared: self.shared.clone(),
            span: tracing::Span::current(),
        };
        ResponseFuture::deciding(Box::pin(driver::drive(driver, parts, body, key, grpc)))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    use super::*;
    use crate::IdempotencyLayer;

    async fn echo(
        request: Request<RequestBody<Full<Bytes>>>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let body = request.into_body().collect().await.unwrap().to_bytes();
        Ok(Response::new(Full::new(body)))
    }

    fn post(key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
        let mut request = Request::post("/echo");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[tokio::test]
    async fn keyless_request_is_not_recorded() {
        let layer = IdempotencyLayer::new();
        let handle = layer.handle();
        let service = ServiceBuilder::new().layer(layer).service_fn(echo);
        let response = service.oneshot(post(None, "hi")).await.unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "hi"
        );
        assert_eq!(handle.stats().requests, 1);
        assert_eq!(handle.cache_info().await.unwrap().entries, 0);
    }

    #[tokio::test]
    async fn keyed_request_is_replayed() {
        let service = ServiceBuilder::new()
            .layer(IdempotencyLayer::new())
            .service(service_fn(echo));
        let first = service
            .clone()
            .oneshot(post(Some("k"), "hi"))
            .await
            .unwrap();
        assert!(first.headers().get("idempotent-replayed").is_none());
        first.into_body().collect().await.unwrap();
        let replay = service.oneshot(post(Some("k"), "hi")).await.unwrap();
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(replay.into_body().collect().await.unwrap().to_bytes(), "hi");
    }

    #[test]
    fn outside_a_tokio_runtime_a_stored_key_replays_and_a_new_one_is_a_500() {
        use std::future::Future;
        use std::task::Waker;

        let service = ServiceBuilder::new()
            .layer(IdempotencyLayer::new())
            .service(service_fn(echo));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let first = service
                .clone()
                .oneshot(post(Some("k"), "hi"))
                .await
                .unwrap();
            first.into_body().collect().await.unwrap();
        });
        drop(runtime);
        // Polled once, with no runtime around: both answer at once.
        let answer = |request| {
            let mut future = std::pin::pin!(service.clone().call(request));
            match future
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
            {
                Poll::Ready(response) => response.unwrap(),
                Poll::Pending => panic!("the layer waited for a runtime that is not there"),
            }
        };
        let replay = answer(post(Some("k"), "hi"));
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        let fresh = answer(post(Some("new"), "hi"));
        assert_eq!(fresh.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(fresh.headers()["content-type"], "application/problem+json");
    }

    #[test]
    fn a_layer_around_an_engine_keeps_that_engine() {
        let engine = Idempotency::new();
        let layer = IdempotencyLayer::with_engine(engine.clone())
            .require_key(true)
            .build()
            .unwrap();
        assert_eq!(layer.handle().config().ttl, crate::engine::DEFAULT_TTL);
        engine
            .configure(|config| config.ttl = Duration::from_secs(5))
            .unwrap();
        assert_eq!(layer.handle().config().ttl, Duration::from_secs(5));
    }

    #[test]
    fn zero_ttl_is_refused() {
        assert!(IdempotencyLayer::builder()
            .ttl(Duration::ZERO)
            .build()
            .is_err());
        assert!(IdempotencyLayer::builder()
            .lease_ttl(Duration::ZERO)
            .build()
            .is_err());
        assert!(IdempotencyLayer::builder().max_entries(0).build().is_err());
    }
}
