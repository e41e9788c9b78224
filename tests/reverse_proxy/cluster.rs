//! The proxy on a Redis Cluster (--redis-cluster, --redis-replicas): it
//! replays from the cluster, and /healthz reports the cluster down while a
//! primary is dead and not yet replaced, and up again after the failover.

use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::{timeout, Instant};

use super::cluster_support::{shared_cluster_urls, ClusterCleanup, PrivateCluster};
use super::harness::{spawn, Proxy, QUICK};
use super::upstream::Upstream;

#[tokio::test]
async fn a_proxy_on_the_cluster_with_replica_acknowledgement_replays() {
    let upstream = Upstream::start().await;
    let urls = shared_cluster_urls();
    let prefix = format!("test-proxy-cluster-{:016x}:", rand::random::<u64>());
    let _cleanup = ClusterCleanup {
        urls: urls.clone(),
        prefix: prefix.clone(),
    };
    let seeds = urls.join(",");
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--redis-cluster",
        &seeds,
        "--redis-prefix",
        &prefix,
        "--redis-replicas",
        "1",
        "--redis-replicas-timeout",
        "2",
    ])
    .await;
    for key in ["c-1", "c-2", "c-3", "c-4"] {
        let first = proxy.send(Method::POST, "/orders", Some(key), "{}").await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(!first.replayed());
        let again = proxy.send(Method::POST, "/orders", Some(key), "{}").await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert!(again.replayed());
        assert_eq!(again.body, first.body);
    }
    assert_eq!(upstream.executions(), 4);
    let (status, _) = proxy.admin_json("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    // A page of a cluster scan may end before every primary was seen.
    let keys = proxy.all_keys("limit=100").await;
    assert_eq!(keys.len(), 4, "{keys:?}");
}

#[tokio::test]
async fn replica_flags_need_a_redis_and_a_positive_count() {
    for (args, code) in [
        (&["--redis-replicas", "1"][..], 2),
        (
            &[
                "--redis-cluster",
                "redis://127.0.0.1:7000",
                "--redis-replicas",
                "0",
            ],
            2,
        ),
        (
            &[
                "--redis",
                "redis://127.0.0.1:6379",
                "--redis-cluster",
                "redis://127.0.0.1:7000",
            ],
            2,
        ),
    ] {
        let (mut child, ready, _log) = spawn(args).await;
        assert!(ready.is_none(), "{args:?} was accepted");
        let status = timeout(QUICK, child.wait()).await.unwrap().unwrap();
        assert_eq!(status.code(), Some(code), "{args:?}");
    }
}

/// Polls /healthz (bounded) until it answers `want`.
async fn healthz_becomes(proxy: &Proxy, want: StatusCode, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, _) = proxy.admin_json("/healthz").await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz still {status}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_the_cluster_down_while_a_primary_is_dead_and_up_after_the_failover() {
    let cluster = timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(PrivateCluster::start),
    )
    .await
    .unwrap()
    .unwrap();
    let upstream = Upstream::start().await;
    let seeds = cluster.urls().join(",");
    let proxy = Proxy::start(&["--upstream", &upstream.url, "--redis-cluster", &seeds]).await;
    healthz_becomes(&proxy, StatusCode::OK, Duration::from_secs(20)).await;

    cluster.kill(cluster.ports()[0]);
    healthz_becomes(
        &proxy,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(20),
    )
    .await;
    let (_, health) = proxy.admin_json("/healthz").await;
    assert_eq!(health["status"], "store_unavailable");
    // The replica takes over within a few node timeouts (1 s here).
    healthz_becomes(&proxy, StatusCode::OK, Duration::from_secs(60)).await;
    let reply = proxy
        .send(Method::POST, "/orders", Some("after"), "{}")
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
}
