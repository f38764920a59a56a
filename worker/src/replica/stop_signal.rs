//! SIGTERM (an eviction, a node drain) asks the coordinator to checkpoint
//! and stop the group, through whichever session is current.

use std::sync::{Arc, Mutex};

use common::client::Notifier;
use tokio::runtime::Runtime;
use tracing::warn;

/// Asks the coordinator to checkpoint and stop the group on SIGTERM
/// (eviction, node drain), through whichever session is current.
pub(super) struct StopForwarder {
    current: Arc<Mutex<Option<Notifier>>>,
}

impl StopForwarder {
    pub(super) fn start(runtime: &Runtime) -> Self {
        let current: Arc<Mutex<Option<Notifier>>> = Arc::default();
        let watched = current.clone();
        runtime.spawn(async move {
            let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                warn!("cannot watch for SIGTERM; an eviction will lose this worker mid-step");
                return;
            };
            // Later SIGTERMs are ignored: Kubernetes follows with SIGKILL.
            if term.recv().await.is_some() {
                warn!("SIGTERM: asking the coordinator to checkpoint and stop the group");
                let notifier = watched.lock().expect("stop lock").clone();
                if let Some(notifier) = notifier {
                    // A closed session means the run is already over.
                    let _ = notifier
                        .request_stop(format!("SIGTERM on {}", hostname()))
                        .await;
                }
            }
        });
        Self { current }
    }

    /// Forwards through `notifier` from now on.
    pub(super) fn watch(&self, notifier: Notifier) {
        *self.current.lock().expect("stop lock") = Some(notifier);
    }
}

/// This worker's name in the coordinator's logs: its pod's, or its pid.
pub(super) fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("pid {}", std::process::id()))
}
