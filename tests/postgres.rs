//! The Postgres store on its own: the store, the layer on it, and the
//! transactional form of `execute`.
#![cfg(feature = "postgres")]

mod support;

mod postgres {
    mod http_layer;
    mod isolation;
    mod paging;
    mod round_trips;
    mod store;
    mod transaction;
}
