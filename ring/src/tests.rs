use std::collections::HashMap;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;

fn ids(names: &[&str]) -> Vec<NodeId> {
    names.iter().map(|n| NodeId::new(*n).unwrap()).collect()
}

fn five_node_ring(vnodes: u32) -> Ring {
    Ring::new(
        ids(&["n1", "n2", "n3", "n4", "n5"])
            .into_iter()
            .map(|n| (n, vnodes)),
        3,
    )
    .unwrap()
}

fn names(list: &[NodeId]) -> Vec<&str> {
    list.iter().map(|n| n.as_str()).collect()
}

/// Golden placement: if this changes, a rolling upgrade would move keys to
/// nodes that do not hold them. Change it only with a migration story.
#[test]
fn placement_is_pinned() {
    let ring = five_node_ring(DEFAULT_VNODES);
    let golden: &[(&str, [&str; 3])] = GOLDEN;
    for (key, expected) in golden {
        let list = ring.preference_list(key.as_bytes());
        assert_eq!(names(&list.replicas), expected.to_vec(), "key {key:?}");
        assert_eq!(list.fallbacks.len(), 2);
    }
}

const GOLDEN: &[(&str, [&str; 3])] = &[
    ("a", ["n4", "n5", "n2"]),
    ("b", ["n4", "n1", "n5"]),
    ("user:42", ["n3", "n1", "n2"]),
    ("key-0", ["n1", "n2", "n4"]),
    ("key-1", ["n3", "n4", "n1"]),
    ("key-999", ["n5", "n1", "n3"]),
    ("\u{1F600}", ["n4", "n1", "n2"]),
];

/// Golden walks, fallbacks included (where stand-ins and hints go), on the
/// five-node ring and on one whose members have different virtual node
/// counts: the placement lives in `consistent_hash_ring` (pinned to one
/// version in Cargo.toml for this reason), and a change of it would move
/// keys and hints in a rolling upgrade.
#[test]
fn walks_are_pinned() {
    let even = five_node_ring(DEFAULT_VNODES);
    let mixed = Ring::new(
        ids(&["n1", "n2", "n3", "n4", "n5"])
            .into_iter()
            .zip([16, 64, 128, 256, 512]),
        3,
    )
    .unwrap();
    let golden: &[(&str, [&str; 5], [&str; 5])] = &[
        (
            "a",
            ["n4", "n5", "n2", "n3", "n1"],
            ["n3", "n5", "n4", "n2", "n1"],
        ),
        (
            "b",
            ["n4", "n1", "n5", "n2", "n3"],
            ["n4", "n5", "n1", "n2", "n3"],
        ),
        (
            "user:42",
            ["n3", "n1", "n2", "n5", "n4"],
            ["n5", "n4", "n3", "n2", "n1"],
        ),
        (
            "key-0",
            ["n1", "n2", "n4", "n5", "n3"],
            ["n3", "n5", "n4", "n2", "n1"],
        ),
        (
            "key-1",
            ["n3", "n4", "n1", "n5", "n2"],
            ["n3", "n4", "n5", "n1", "n2"],
        ),
        (
            "key-999",
            ["n5", "n1", "n3", "n2", "n4"],
            ["n4", "n5", "n3", "n2", "n1"],
        ),
        (
            "\u{1F600}",
            ["n4", "n1", "n2", "n5", "n3"],
            ["n4", "n1", "n5", "n2", "n3"],
        ),
    ];
    for (key, on_even, on_mixed) in golden {
        let walk = |ring: &Ring| -> Vec<String> {
            ring.walk(key.as_bytes()).map(|n| n.to_string()).collect()
        };
        assert_eq!(walk(&even), on_even.to_vec(), "key {key:?}, even ring");
        assert_eq!(walk(&mixed), on_mixed.to_vec(), "key {key:?}, mixed ring");
        let list = even.preference_list(key.as_bytes());
        assert_eq!(names(&list.fallbacks), on_even[3..].to_vec(), "key {key:?}");
    }
}

#[test]
fn longest_key_placement_is_pinned() {
    let ring = five_node_ring(DEFAULT_VNODES);
    let list = ring.preference_list("x".repeat(1024).as_bytes());
    assert_eq!(names(&list.replicas), ["n3", "n5", "n1"]);
}

#[test]
fn placement_ignores_member_order() {
    let a = five_node_ring(16);
    let b = Ring::new(
        ids(&["n5", "n3", "n1", "n4", "n2"])
            .into_iter()
            .map(|n| (n, 16)),
        3,
    )
    .unwrap();
    for i in 0..1000 {
        let key = format!("key-{i}");
        assert_eq!(
            a.preference_list(key.as_bytes()),
            b.preference_list(key.as_bytes())
        );
    }
    assert_eq!(a, b, "rings that place keys alike are equal");
}

#[test]
fn rings_differ_when_placement_can() {
    let base = five_node_ring(16);
    assert_ne!(base, five_node_ring(8), "virtual nodes");
    let four = Ring::new(
        ids(&["n1", "n2", "n3", "n4"]).into_iter().map(|n| (n, 16)),
        3,
    )
    .unwrap();
    assert_ne!(base, four, "members");
    let n2 = Ring::new(
        ids(&["n1", "n2", "n3", "n4", "n5"])
            .into_iter()
            .map(|n| (n, 16)),
        2,
    )
    .unwrap();
    assert_ne!(base, n2, "replicas");
}

#[test]
fn a_million_keys_spread_within_15_to_25_percent() {
    let ring = five_node_ring(64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut owned: HashMap<NodeId, usize> = HashMap::new();
    let total = 1_000_000;
    let mut key = [0u8; 16];
    for _ in 0..total {
        rng.fill(&mut key);
        *owned
            .entry(ring.primary(&key).unwrap().clone())
            .or_default() += 1;
    }
    assert_eq!(owned.len(), 5);
    for (node, count) in owned {
        let share = count as f64 / total as f64;
        assert!((0.15..=0.25).contains(&share), "{node} owns {share:.3}");
    }
}

#[test]
fn small_clusters_use_every_node() {
    let ring = Ring::new(ids(&["a", "b"]).into_iter().map(|n| (n, 8)), 3).unwrap();
    let list = ring.preference_list(b"k");
    assert_eq!(list.replicas.len(), 2);
    assert!(list.fallbacks.is_empty());
}

#[test]
fn nodes_lists_every_member_once_sorted() {
    let ring = five_node_ring(16);
    assert_eq!(names(&ring.nodes()), ["n1", "n2", "n3", "n4", "n5"]);
}

#[test]
fn bad_rings_are_refused() {
    assert_eq!(
        Ring::new(Vec::new(), 0).unwrap_err(),
        RingError::ZeroReplicas
    );
    let dup = Ring::new(ids(&["a", "a"]).into_iter().map(|n| (n, 8)), 3).unwrap_err();
    assert_eq!(dup.to_string(), "node a appears twice in the member list");
    assert!(matches!(
        Ring::new(ids(&["a"]).into_iter().map(|n| (n, 0)), 1),
        Err(RingError::ZeroVnodes { .. })
    ));
    assert!(Ring::new(ids(&["a"]).into_iter().map(|n| (n, VNODES_MAX)), 1).is_ok());
    assert!(matches!(
        Ring::new(ids(&["a"]).into_iter().map(|n| (n, VNODES_MAX + 1)), 1),
        Err(RingError::TooManyVnodes { vnodes: 1025, .. })
    ));
    assert_eq!(
        Ring::new(ids(&["a"]).into_iter().map(|n| (n, 8)), 65).unwrap_err(),
        RingError::TooManyReplicas { replicas: 65 }
    );
}

proptest! {
    #[test]
    fn preference_lists_are_distinct_and_cover_the_ring(key in prop::collection::vec(any::<u8>(), 1..64)) {
        let ring = five_node_ring(32);
        let list = ring.preference_list(&key);
        prop_assert_eq!(list.replicas.len(), 3);
        prop_assert_eq!(Some(&list.replicas[0]), ring.primary(&key));
        prop_assert_eq!(&ring.replicas_of(&key), &list.replicas, "the same replicas without the fallbacks");
        for node in list.replicas.iter().chain(&list.fallbacks) {
            prop_assert_eq!(ring.is_replica(&key, node), list.contains(node));
        }
        let mut all: Vec<NodeId> = list.replicas.iter().chain(&list.fallbacks).cloned().collect();
        all.sort();
        all.dedup();
        prop_assert_eq!(all.len(), 5);
    }
}

/// Members `m0..m{count}`, each with its own virtual node count.
fn members(vnodes: &[u32]) -> Vec<(NodeId, u32)> {
    vnodes
        .iter()
        .enumerate()
        .map(|(i, v)| (NodeId::new(format!("m{i}")).unwrap(), *v))
        .collect()
}

/// The key's full walk of the ring: replicas, then fallbacks.
fn walk(ring: &Ring, key: &[u8]) -> Vec<NodeId> {
    let list = ring.preference_list(key);
    list.replicas.into_iter().chain(list.fallbacks).collect()
}

/// A large cluster's preference list stops after `max(N, FALLBACKS_MIN)`
/// fallbacks: distinct, none a replica, and the start of the same walk
/// whatever N is.
#[test]
fn a_large_clusters_fallbacks_are_bounded() {
    let big = members(&[8; 100]);
    let ring = Ring::new(big.clone(), 3).unwrap();
    let wide = Ring::new(big, 20).unwrap();
    for key in ["a", "b", "c"] {
        let list = ring.preference_list(key.as_bytes());
        assert_eq!(list.fallbacks.len(), crate::FALLBACKS_MIN);
        let mut all = walk(&ring, key.as_bytes());
        assert!(all
            .iter()
            .all(|n| list.replicas.contains(n) != list.fallbacks.contains(n)));
        let wide_walk = walk(&wide, key.as_bytes());
        assert_eq!(
            wide.preference_list(key.as_bytes()).fallbacks.len(),
            20,
            "N of them"
        );
        assert_eq!(wide_walk[..all.len()], all[..], "one walk");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 3 + crate::FALLBACKS_MIN);
    }
}

proptest! {
    /// Whatever the members, their virtual nodes and N: a key's replicas
    /// are min(N, members) distinct nodes, the first its primary, and
    /// replicas and fallbacks together name every member exactly once (up
    /// to 12 members, so fewer than `FALLBACKS_MIN` fallbacks), in an
    /// order that does not depend on the order members were given in.
    #[test]
    fn preference_lists_hold_for_any_ring(
        vnodes in prop::collection::vec(1u32..=64, 1..=12),
        n in 1usize..=5,
        key in prop::collection::vec(any::<u8>(), 0..32),
    ) {
        let given = members(&vnodes);
        let ring = Ring::new(given.clone(), n).unwrap();
        let list = ring.preference_list(&key);
        prop_assert_eq!(list.replicas.len(), n.min(vnodes.len()));
        prop_assert_eq!(Some(&list.replicas[0]), ring.primary(&key));
        let mut all = walk(&ring, &key);
        all.sort();
        let mut expected: Vec<NodeId> = given.iter().map(|(id, _)| id.clone()).collect();
        expected.sort();
        prop_assert_eq!(all, expected);
        let reversed = Ring::new(given.into_iter().rev(), n).unwrap();
        prop_assert_eq!(walk(&reversed, &key), walk(&ring, &key));
    }

    /// Consistent hashing moves only what it must (Dynamo §4.2). The walk
    /// draws a fresh point per candidate (see the crate docs), so a
    /// newcomer can reorder the others; what holds is that, for every k,
    /// the first k candidates after it joins, less the newcomer, are among
    /// the first k before. So each key's N replicas change by at most the
    /// one slot the newcomer takes, and not at all when it takes none.
    #[test]
    fn a_new_member_takes_at_most_one_replica_slot_of_a_key(
        vnodes in prop::collection::vec(1u32..=64, 1..=8),
        newcomer_vnodes in 1u32..=64,
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..16), 1..20),
    ) {
        let before = Ring::new(members(&vnodes), 1).unwrap();
        let newcomer = NodeId::new("new").unwrap();
        let after = Ring::new(
            members(&vnodes).into_iter().chain([(newcomer.clone(), newcomer_vnodes)]),
            1,
        )
        .unwrap();
        for key in &keys {
            let (old, new) = (walk(&before, key), walk(&after, key));
            for k in 1..=old.len() {
                let kept: Vec<&NodeId> = new[..k].iter().filter(|m| **m != newcomer).collect();
                prop_assert!(
                    kept.iter().all(|m| old[..k].contains(m)),
                    "first {} after {:?} not among {:?}", k, &new[..k], &old[..k]
                );
            }
        }
    }
}

/// Equal rings (whatever order members were given in) share a
/// fingerprint; a member, a virtual node count or N more or less changes it.
#[test]
fn the_fingerprint_follows_placement() {
    let ring = |members: &[(&str, u32)], n: usize| {
        Ring::new(
            members
                .iter()
                .map(|(id, vnodes)| (NodeId::new(*id).unwrap(), *vnodes)),
            n,
        )
        .unwrap()
        .fingerprint()
    };
    let base = ring(&[("n1", 8), ("n2", 8), ("n3", 8)], 3);
    assert_eq!(base, ring(&[("n3", 8), ("n1", 8), ("n2", 8)], 3));
    for other in [
        ring(&[("n1", 8), ("n2", 8)], 2),
        ring(&[("n1", 8), ("n2", 8), ("n3", 8), ("n4", 8)], 3),
        ring(&[("n1", 8), ("n2", 8), ("n3", 9)], 3),
        ring(&[("n1", 8), ("n2", 8), ("n3", 8)], 2),
        ring(&[("n1", 8), ("n2", 8), ("n33", 8)], 3),
    ] {
        assert_ne!(base, other);
    }
}

/// A ring rebuilt from its members and N (as a node's data dir keeps
/// one) is the same ring: it places every key alike.
#[test]
fn a_ring_rebuilt_from_its_members_is_equal() {
    let ring = Ring::new(
        [("n2", 5), ("n1", 7), ("n3", 1)].map(|(id, v)| (NodeId::new(id).unwrap(), v)),
        2,
    )
    .unwrap();
    assert_eq!(names(&ring.nodes()), ["n1", "n2", "n3"]);
    let again = Ring::new(ring.members().iter().cloned(), ring.replicas()).unwrap();
    assert_eq!(again, ring);
    assert_eq!(again.fingerprint(), ring.fingerprint());
    for i in 0..200 {
        let key = format!("k{i}");
        assert_eq!(
            again.replicas_of(key.as_bytes()),
            ring.replicas_of(key.as_bytes())
        );
    }
}

#[test]
fn has_node_says_which_nodes_are_on_the_ring() {
    let ring = five_node_ring(8);
    for node in ids(&["n1", "n5"]) {
        assert!(ring.has_node(&node), "{node}");
    }
    assert!(!ring.has_node(&NodeId::new("n6").unwrap()));
}
