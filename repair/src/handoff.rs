//! Hinted handoff delivery (Dynamo §4.6): hand hinted writes back to their
//! owners once they are reachable again.
//!
//! One worker per node walks the [`HintBook`]: for every owner the failure
//! detector believes up and whose back-off has passed, it sends that owner's
//! hints in batches (each hint a `Sync` that the owner writes through its
//! WAL before answering, so an answer is a durable acknowledgement) and
//! removes a hint only if it is unchanged since it was read. A failed send
//! ends the owner's round and doubles its back-off ([`DeliverySchedule`]);
//! sends are paced to [`HandoffConfig::max_rate_per_s`] so a returning node
//! is not flooded while it also serves clients. Every so often the worker
//! also drops hints past the window, for owners that stay away.
//!
//! The worker is bounded (one batch in flight), observable (the hint metrics
//! of [`HintBook`]) and stops at shutdown between two sends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ringkv_core::wire::{ReplicaRequest, Request, Response};
use ringkv_core::{NodeId, Transport};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::hints::{HintBackend, HintBook};

/// Whether the failure detector believes a node is up.
pub type IsUp = Arc<dyn Fn(&NodeId) -> bool + Send + Sync>;

/// Tuning of the delivery worker.
#[derive(Debug, Clone)]
pub struct HandoffConfig {
    /// How often the worker looks for owners to deliver to.
    pub tick: Duration,
    /// Hints sent at once to one owner.
    pub batch_size: usize,
    /// Hints sent per second at most, over all owners.
    pub max_rate_per_s: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long one send may take before it counts as failed.
    pub send_timeout: Duration,
    /// How often hints past the window are swept out.
    pub sweep_interval: Duration,
}

impl HandoffConfig {
    /// The defaults for a hint window of `ttl`: sweeps four times a window,
    /// between once a second and once a minute.
    pub fn for_ttl(ttl: Duration) -> Self {
        HandoffConfig {
            tick: Duration::from_millis(250),
            batch_size: 64,
            max_rate_per_s: DEFAULT_MAX_RATE_PER_S,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            send_timeout: Duration::from_secs(2),
            sweep_interval: (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }
}

/// The default pace of delivery, in hints per second.
pub const DEFAULT_MAX_RATE_PER_S: u32 = 5_000;

/// When each owner may next be tried: exponential back-off per owner after a
/// failed delivery, reset by a successful one. Time is passed in.
#[derive(Debug)]
pub struct DeliverySchedule {
    initial: Duration,
    max: Duration,
    waiting: HashMap<NodeId, (Instant, Duration)>,
}

impl DeliverySchedule {
    pub fn new(initial: Duration, max: Duration) -> Self {
        DeliverySchedule {
            initial,
            max,
            waiting: HashMap::new(),
        }
    }

    /// Whether `owner` may be tried at `now`.
    pub fn is_due(&self, owner: &NodeId, now: Instant) -> bool {
        self.waiting.get(owner).is_none_or(|(at, _)| *at <= now)
    }

    /// A delivery to `owner` failed at `now`: wait before the next, twice as
    /// long as last time (up to the maximum).
    pub fn failed(&mut self, owner: &NodeId, now: Instant) {
        let backoff = match self.waiting.get(owner) {
            Some((_, last)) => (*last * 2).min(self.max),
            None => self.initial,
        };
        self.waiting.insert(owner.clone(), (now + backoff, backoff));
    }

    /// A delivery to `owner` went through: no more waiting.
    pub fn succeeded(&mut self, owner: &NodeId) {
        self.waiting.remove(owner);
    }
}

/// Starts the delivery worker. It runs until `shutdown` turns true.
pub fn start<T: Transport, B: HintBackend>(
    book: Arc<HintBook<B>>,
    transport: Arc<T>,
    is_up: IsUp,
    config: HandoffConfig,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut schedule = DeliverySchedule::new(config.backoff_initial, config.backoff_max);
        let mut tick = tokio::time::interval(config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_sweep = Instant::now() + config.sweep_interval;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            if Instant::now() >= next_sweep {
                match book.expire_all() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(dropped = n, "dropped hints past the hint window"),
                    Err(e) => tracing::warn!(error = %e, "hint sweep failed"),
                }
                next_sweep = Instant::now() + config.sweep_interval;
            }
            for owner in book.targets() {
                if !is_up(&owner) || !schedule.is_due(&owner, Instant::now()) {
                    continue;
                }
                let round = deliver_to(&book, &transport, &owner, &config);
                let outcome = tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    outcome = round => outcome,
                };
                match outcome {
                    Ok(delivered) => {
                        schedule.succeeded(&owner);
                        if delivered > 0 {
                            tracing::info!(%owner, delivered, "handed off hints");
                        }
                    }
                    Err(reason) => {
                        schedule.failed(&owner, Instant::now());
                        tracing::debug!(%owner, %reason, "hint delivery failed; backing off");
                    }
                }
            }
        }
    })
}

/// Delivers every hint held for `owner`, batch by batch. Returns how many
/// were delivered, or why the round stopped.
async fn deliver_to<T: Transport, B: HintBackend>(
    book: &HintBook<B>,
    transport: &Arc<T>,
    owner: &NodeId,
    config: &HandoffConfig,
) -> Result<u64, String> {
    let mut delivered = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let batch = book
            .batch(owner, after.as_deref(), config.batch_size)
            .map_err(|e| e.to_string())?;
        let Some(last) = batch.last() else {
            return Ok(delivered);
        };
        after = Some(last.key.clone());
        let started = Instant::now();
        let now_ms = book.now_ms();
        let mut sends = tokio::task::JoinSet::new();
        for hint in batch {
            if book.is_expired(&hint, now_ms) {
                book.drop_if_expired(owner, &hint.key)
                    .map_err(|e| e.to_string())?;
                continue;
            }
            let transport = transport.clone();
            let owner = owner.clone();
            let timeout = config.send_timeout;
            sends.spawn(async move {
                let request = Request::Replica(ReplicaRequest::Sync {
                    key: hint.key.clone(),
                    clock: hint.clock.clone(),
                });
                let result = tokio::time::timeout(timeout, transport.call(&owner, request)).await;
                (hint, result)
            });
        }
        let sent = sends.len();
        let mut failure = None;
        while let Some(joined) = sends.join_next().await {
            let Ok((hint, result)) = joined else { continue };
            match result {
                Ok(Ok(Response::Clock(_))) => {
                    if book
                        .remove_delivered(owner, &hint.key, &hint.clock)
                        .map_err(|e| e.to_string())?
                    {
                        delivered += 1;
                    }
                }
                Ok(Ok(Response::Error(e))) => failure = Some(e.message),
                Ok(Ok(other)) => failure = Some(format!("unexpected answer {other:?}")),
                Ok(Err(e)) => failure = Some(e.to_string()),
                Err(_) => failure = Some("timed out".to_string()),
            }
        }
        if let Some(reason) = failure {
            return Err(reason);
        }
        // Pace: `sent` hints may take no less than sent / rate seconds.
        let budget = Duration::from_secs_f64(sent as f64 / f64::from(config.max_rate_per_s.max(1)));
        tokio::time::sleep_until(started + budget).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_the_maximum_and_resets_on_success() {
        let t0 = Instant::now();
        let owner = NodeId::new("c").unwrap();
        let mut s = DeliverySchedule::new(Duration::from_secs(1), Duration::from_secs(3));
        assert!(s.is_due(&owner, t0));
        s.failed(&owner, t0);
        assert!(!s.is_due(&owner, t0 + Duration::from_millis(999)));
        assert!(s.is_due(&owner, t0 + Duration::from_secs(1)));
        s.failed(&owner, t0);
        assert!(!s.is_due(&owner, t0 + Duration::from_millis(1999)));
        s.failed(&owner, t0);
        s.failed(&owner, t0);
        assert!(
            s.is_due(&owner, t0 + Duration::from_secs(3)),
            "capped at the maximum"
        );
        s.succeeded(&owner);
        assert!(s.is_due(&owner, t0));
    }
}
