//! The operator's page in a real browser: headless Chromium loads the admin
//! server's `GET /` under its Content-Security-Policy, runs its script, and
//! the rendered DOM shows the numbers `/stats` answers, and the keys of
//! `/keys` only when asked (`#keys`). With `--admin-token-reads` the page
//! asks for the token.
//!
//! Compiled with feature `browser-tests` only (`.ci/test` turns it on):
//! `cargo test` needs no browser.

use std::process::Stdio;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::process::Command;
use tokio::time::timeout;

use super::harness::{send, send_within, Proxy, QUICK};
use super::upstream::Upstream;

/// Chromium's start-up is slow on a loaded machine.
const BROWSER: Duration = Duration::from_secs(90);

/// The DOM Chromium renders for `url` once the page's script has run.
async fn render(url: &str) -> String {
    let profile =
        std::env::temp_dir().join(format!("reverse-proxy-page-{:016x}", rand::random::<u64>()));
    let child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`chromium` is not installed: this test renders the page in a real browser \
             (apt-get install chromium; .ci/test does)"
        ),
        Err(e) => panic!("cannot start chromium: {e}"),
    };
    let output = timeout(BROWSER, child.wait_with_output())
        .await
        .expect("chromium renders the page in time")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium failed: {:?}",
        output.status
    );
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

/// The text inside the element with `id` in a serialised DOM.
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    let from = at + dom[at..].find('>').expect("the tag ends") + 1;
    let to = from + dom[from..].find('<').expect("the text ends");
    &dom[from..to]
}

#[tokio::test]
async fn the_operators_page_shows_what_the_proxy_reports_in_a_real_browser() {
    let upstream = Upstream::start().await;
    // The request held upstream must outlast the browser's start-up: the
    // proxy waits for the upstream, and the client for the proxy, that long.
    let held_for = BROWSER + QUICK;
    let upstream_timeout = held_for.as_secs().to_string();
    let proxy = Proxy::start(&[
        "--upstream",
        &upstream.url,
        "--max-entries",
        "500",
        "--upstream-timeout",
        &upstream_timeout,
    ])
    .await;
    for key in ["order-1", "order-1", "order-2"] {
        let reply = proxy.send(Method::POST, "/orders", Some(key), "{}").await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let url = format!("{}/slow", proxy.url);
    let held = tokio::spawn(async move {
        let key = [("idempotency-key", "held-key")];
        send_within(held_for, Method::POST, &url, &key, "{}").await
    });
    upstream.entered().await;

    let page = send(Method::GET, &format!("{}/", proxy.admin), None, "").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.content_type().starts_with("text/html"));
    let html = String::from_utf8_lossy(&page.body);
    for external in ["src=\"http", "href=\"http", "<link", "@import", "url("] {
        assert!(
            !html.contains(external),
            "the page loads {external}...: not offline"
        );
    }

    let stats = proxy.stats().await;
    assert_eq!(stats["executed"], 3);
    assert_eq!(stats["replayed"], 1);
    let dom = render(&format!("{}/", proxy.admin)).await;
    for name in [
        "requests",
        "executed",
        "replayed",
        "conflicts",
        "duplicates_prevented",
    ] {
        assert_eq!(
            text_of(&dom, &format!("stat-{name}")),
            stats[name].to_string(),
            "{name} on the page"
        );
    }
    let hit_rate = stats["hit_rate"].as_f64().expect("a hit rate");
    assert_eq!(text_of(&dom, "stat-hit_rate"), format!("{hit_rate:.1} %"));
    assert_eq!(text_of(&dom, "cache-entries"), stats["entries"].to_string());
    assert_eq!(text_of(&dom, "cache-max"), "500");
    // The counts refresh on their own; the keys are listed only when asked.
    assert!(
        !dom.contains("held-key") && !dom.contains("order-2"),
        "keys listed unasked:\n{dom}"
    );
    assert_eq!(text_of(&dom, "keys-count"), "");

    let dom = render(&format!("{}/#keys", proxy.admin)).await;
    assert!(
        dom.contains("held-key"),
        "the key in flight is listed:\n{dom}"
    );
    assert!(dom.contains("order-2"), "a stored key is listed:\n{dom}");
    assert_eq!(text_of(&dom, "keys-count"), "3 listed");

    upstream.release(1);
    let reply = timeout(QUICK, held).await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::CREATED);
}

/// With reads behind the token the page loads, shows no numbers, and asks
/// for the token (kept in the page's memory once given).
#[tokio::test]
async fn the_page_asks_for_the_token_when_reads_need_it() {
    let upstream = Upstream::start().await;
    let proxy =
        Proxy::start_with_token(&["--upstream", &upstream.url, "--admin-token-reads"]).await;
    let dom = render(&format!("{}/", proxy.admin)).await;
    let prompt = dom
        .find("id=\"token-prompt\"")
        .expect("the page has a token prompt");
    let tag = &dom[dom[..prompt].rfind('<').unwrap()..prompt];
    assert!(!tag.contains("hidden"), "the prompt is shown: {tag}");
    assert_eq!(
        text_of(&dom, "stat-requests"),
        "\u{2013}",
        "no numbers without the token"
    );
    assert!(text_of(&dom, "updated").contains("token"));
}
