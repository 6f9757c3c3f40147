//! One node's emulated links to the other regions (`--region`,
//! `--latency-matrix`; see `ringkv_core::regions`), and changing them
//! while the node runs.
//!
//! The node's caller side applies both legs of each call to a peer: the
//! request's delay before it is sent, the answer's after it came back. So
//! a node alone decides what its own calls meet, and a partition between
//! two groups of nodes needs the cut in the matrix of every node (`ringkv
//! node` re-reads its matrix file on SIGHUP; send it to each).
//!
//! A message lost on the way (a lossy or cut link) never arrives: the
//! caller's deadline ends its wait, as it would on a real network. Calls
//! under way when the matrix changes keep the legs they already drew.

use std::sync::{Arc, RwLock};

use ringkv_core::regions::{LatencyMatrix, RegionError};

/// This node's region and the matrix its calls to peers follow.
///
/// Invariant: the matrix always names `mine` (checked at start and on
/// every [`replace`](Self::replace)).
pub struct RegionLinks {
    mine: String,
    matrix: RwLock<Arc<LatencyMatrix>>,
}

impl RegionLinks {
    /// Links of a node in region `mine`; fails if `matrix` lacks it.
    pub fn new(matrix: Arc<LatencyMatrix>, mine: String) -> Result<Self, RegionError> {
        matrix.check_region(&mine)?;
        Ok(RegionLinks {
            mine,
            matrix: RwLock::new(matrix),
        })
    }

    /// This node's region.
    pub fn region(&self) -> &str {
        &self.mine
    }

    /// The matrix in effect now.
    pub fn matrix(&self) -> Arc<LatencyMatrix> {
        self.matrix
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `matrix` in effect for the calls that start from now on. A
    /// matrix without this node's region is refused and the old one kept.
    pub fn replace(&self, matrix: LatencyMatrix) -> Result<(), RegionError> {
        matrix.check_region(&self.mine)?;
        *self.matrix.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(matrix);
        Ok(())
    }

    /// Waits out one leg between this node and a peer in `peer_region`
    /// (`outbound`: the request's; else the answer's). A lost message never
    /// arrives, so this never returns: the caller's deadline ends the wait.
    pub async fn leg(&self, peer_region: &str, outbound: bool) {
        if !self.deliver(peer_region, outbound).await {
            std::future::pending::<()>().await;
        }
    }

    /// [`leg`](Self::leg), saying whether the message arrives: `false`, at
    /// once, if the link loses it.
    pub async fn deliver(&self, peer_region: &str, outbound: bool) -> bool {
        let (from, to) = if outbound {
            (self.mine.as_str(), peer_region)
        } else {
            (peer_region, self.mine.as_str())
        };
        let (jitter_u, loss_u): (f64, f64) = (rand::random(), rand::random());
        // Drawn before any wait, so no lock is held across one.
        let fate = self.matrix().sample(from, to, jitter_u, loss_u);
        match fate {
            Ok(Some(delay)) if !delay.is_zero() => crate::link_delay::sleep(delay).await,
            Ok(Some(_)) => {}
            Ok(None) => return false,
            // A peer in a region the matrix lacks (a join through a node
            // whose matrix has it): no emulated delay, but counted, as the
            // emulation is then not what the operator meant.
            Err(_) => {
                metrics::counter!("ringkv_region_links_unknown_total").increment(1);
                tracing::debug!(
                    region = peer_region,
                    "a peer's region is not in the latency matrix: not delayed"
                );
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn matrix(ab: &str) -> LatencyMatrix {
        LatencyMatrix::parse_toml(&format!(
            "regions = [\"a\", \"b\"]\n[[link]]\nbetween = [\"a\", \"b\"]\n{ab}"
        ))
        .unwrap()
    }

    /// Whether one leg from `a` to `b` ends within `within`.
    async fn passes(links: &RegionLinks, within: Duration) -> bool {
        tokio::time::timeout(within, links.leg("b", true))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_replaced_matrix_cuts_and_heals_the_calls_that_start_after() {
        let links = RegionLinks::new(Arc::new(matrix("delay_ms = 1")), "a".into()).unwrap();
        // Generous for a leg that must pass; a cut one never does.
        let (generous, any) = (Duration::from_secs(10), Duration::from_millis(100));
        assert!(passes(&links, generous).await);
        links.replace(matrix("cut = true")).unwrap();
        assert!(
            !passes(&links, any).await,
            "a cut link lets nothing through"
        );
        // Both legs, as the answer of a call sent before the cut would meet.
        assert!(tokio::time::timeout(any, links.leg("b", false))
            .await
            .is_err());
        links.replace(matrix("delay_ms = 1")).unwrap();
        assert!(passes(&links, generous).await, "healed");
    }

    #[test]
    fn a_matrix_without_the_nodes_region_is_refused_and_the_old_one_kept() {
        let links = RegionLinks::new(Arc::new(matrix("delay_ms = 7")), "a".into()).unwrap();
        let other = LatencyMatrix::parse_toml("regions = [\"x\"]").unwrap();
        let err = links.replace(other).unwrap_err().to_string();
        assert!(err.contains("unknown region \"a\""), "{err}");
        assert_eq!(links.matrix().link("a", "b").unwrap().delay_ms, 7.0);
        assert!(RegionLinks::new(Arc::new(matrix("")), "z".into()).is_err());
    }
}
