//! Tasks owned by a value: [`AbortOnDropHandle`] aborts them when the owner
//! is dropped; [`stop`] ends them on purpose.

use tokio_util::task::AbortOnDropHandle;

/// Aborts `task` and waits until it is gone, and with it whatever it held
/// (a socket, the handlers).
pub(crate) async fn stop<T>(task: AbortOnDropHandle<T>) {
    task.abort();
    let _ = task.await;
}
