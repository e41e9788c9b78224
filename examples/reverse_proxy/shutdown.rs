//! Signals and the graceful-shutdown trigger.

use tokio::sync::watch;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(crate) async fn signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn changed(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
