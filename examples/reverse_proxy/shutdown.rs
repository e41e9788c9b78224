//! Signals and the graceful-shutdown trigger.

use tokio::sync::watch;

/// SIGINT (Ctrl-C) and SIGTERM, listened for from the moment this is made:
/// made before the proxy reports ready, so a signal sent right after the
/// `ready:` line is never missed (it would kill the process otherwise).
pub(crate) struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub(crate) async fn recv(&mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => tracing::info!("SIGINT"),
                _ = self.terminate.recv() => tracing::info!("SIGTERM"),
            }
            Ok(())
        }
        #[cfg(not(unix))]
        {
            tokio::signal::ctrl_c().await
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn changed(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
