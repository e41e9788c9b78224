//! The helpers every test binary shares (`mod support;` in each binary's
//! root): HTTP servers and clients ([`common`]), the per-store test runner
//! and the shared stores ([`stores`]), and Redis servers of a test's own
//! ([`redis`]).
#![allow(dead_code, unreachable_pub, unused_imports, unused_macros)]

pub mod common;
#[cfg(feature = "redis")]
pub mod redis;
pub mod relay;
pub mod stores;

/// Builds `example` with exactly the features this test binary was built
/// with, so the build reuses the library `cargo test` built (another feature
/// set would compile the crate again, and relink the example each run), and
/// answers the path of its binary.
pub fn build_example(example: &str) -> std::path::PathBuf {
    let features: Vec<&str> = [
        ("redis", cfg!(feature = "redis")),
        ("postgres", cfg!(feature = "postgres")),
        ("test-util", cfg!(feature = "test-util")),
        ("browser-tests", cfg!(feature = "browser-tests")),
        ("cluster-tests", cfg!(feature = "cluster-tests")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--example", example])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if !features.is_empty() {
        build.args(["--features", &features.join(",")]);
    }
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building the {example} example failed");
    // target/<profile>/deps/<this test> -> target/<profile>/examples/
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    profile_dir
        .join("examples")
        .join(format!("{example}{}", std::env::consts::EXE_SUFFIX))
}
