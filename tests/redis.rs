//! The Redis store on its own: the shared Redis, Redis servers of a test's
//! own (faults, outages, eviction policies, fail-open) and, with feature
//! `cluster-tests`, Redis Cluster (with failover).
#![cfg(feature = "redis")]

mod support;

mod redis {
    mod admin;
    #[cfg(feature = "cluster-tests")]
    mod cluster;
    #[cfg(feature = "cluster-tests")]
    mod cluster_failover;
    mod eviction_policy;
    mod fail_open;
    mod faults;
    mod http_layer;
    mod outage;
    mod paging;
    mod replica_wait;
    mod store;
}
