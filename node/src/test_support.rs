//! Helpers shared by this crate's tests.

use std::time::Duration;

/// Polls `done` every 10 ms; fails naming `what` if it is still false
/// after 20 s (tokio's clock, so paused-time tests advance it too).
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
