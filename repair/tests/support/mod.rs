//! What the handoff tests share: a hint book in memory and a written clock.

use std::sync::Arc;

use ringkv_core::dvv::{Clock, Payload, VersionVector};
use ringkv_core::NodeId;
use ringkv_repair::hints::{HintConfig, MemHintBackend};
use ringkv_repair::HintBook;

/// An empty hint book with the default limits, its clock stopped at 1,000 s.
pub fn book() -> Arc<HintBook<MemHintBackend>> {
    Arc::new(
        HintBook::open(
            MemHintBackend::default(),
            HintConfig::default(),
            Arc::new(|| 1_000_000),
        )
        .unwrap(),
    )
}

/// A clock holding `value`, written by node `writer`.
pub fn write(value: &str) -> Clock {
    let mut clock = Clock::new();
    clock.update(
        &VersionVector::new(),
        Payload::Value(value.as_bytes().to_vec()),
        &NodeId::new("writer").unwrap(),
    );
    clock
}
