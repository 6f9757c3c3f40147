use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;

use super::*;
use crate::test_support::{n, write};

struct Fixture {
    book: HintBook<Arc<MemHintBackend>>,
    backend: Arc<MemHintBackend>,
    now: Arc<AtomicU64>,
}

fn fixture(config: HintConfig) -> Fixture {
    let backend = Arc::new(MemHintBackend::default());
    let now = Arc::new(AtomicU64::new(1_000_000));
    let clock = now.clone();
    let book = HintBook::open(
        backend.clone(),
        config,
        Arc::new(move || clock.load(Ordering::SeqCst)),
    )
    .unwrap();
    Fixture { book, backend, now }
}

#[test]
fn a_second_hint_for_a_key_merges_into_the_first() {
    let f = fixture(HintConfig::default());
    f.book.store(&n("c"), b"k", &write("a", "1")).unwrap();
    f.book.store(&n("c"), b"k", &write("b", "2")).unwrap();
    let held = f.book.read(&n("c"), b"k").unwrap().unwrap();
    assert_eq!(held.sibling_count(), 2, "concurrent hints are both kept");
    assert_eq!(f.book.pending(&n("c")), 1, "one key, one hint");
    assert_eq!(f.book.read(&n("d"), b"k").unwrap(), None, "per owner");
}

/// A hint moved to another owner keeps the age it had; merged into a hint
/// already held, the newer of the two times stands.
#[test]
fn a_hint_stored_with_its_age_keeps_it() {
    let f = fixture(HintConfig::default());
    let age_of = |owner: &str| f.book.batch(&n(owner), None, 10).unwrap()[0].stored_at_ms;
    f.book
        .store_aged(&n("c"), b"k", &write("a", "1"), 400_000)
        .unwrap();
    assert_eq!(age_of("c"), 400_000, "not now (1,000,000)");
    f.book
        .store_aged(&n("c"), b"k", &write("b", "2"), 300_000)
        .unwrap();
    assert_eq!(age_of("c"), 400_000, "the newer write's time");
    f.book.store(&n("c"), b"k", &write("d", "3")).unwrap();
    assert_eq!(age_of("c"), 1_000_000);
}

/// A hint handed on with an age already past the window is not stored:
/// it would never be delivered, only take room until a sweep.
#[test]
fn a_hint_handed_on_already_expired_is_dropped() {
    let f = fixture(HintConfig {
        ttl_ms: 5_000,
        ..HintConfig::default()
    });
    let now = f.book.now_ms();
    f.book
        .store_aged(&n("c"), b"k", &write("a", "1"), now - 5_001)
        .unwrap();
    assert_eq!(f.book.pending(&n("c")), 0);
    assert_eq!(f.book.read(&n("c"), b"k").unwrap(), None);
    assert!(f.backend.map.lock().unwrap().is_empty());
    // Just inside the window, it is.
    f.book
        .store_aged(&n("c"), b"k", &write("a", "1"), now - 5_000)
        .unwrap();
    assert_eq!(f.book.pending(&n("c")), 1);
}

#[test]
fn a_hint_is_removed_only_if_unchanged_since_delivery() {
    let f = fixture(HintConfig::default());
    let first = write("a", "1");
    f.book.store(&n("c"), b"k", &first).unwrap();
    let delivered = f.book.batch(&n("c"), None, 10).unwrap()[0].clock.clone();
    // A concurrent write reaches the fallback while the delivery is in flight.
    f.book.store(&n("c"), b"k", &write("b", "2")).unwrap();
    assert!(!f.book.remove_delivered(&n("c"), b"k", &delivered).unwrap());
    assert_eq!(f.book.pending(&n("c")), 1, "the newer write is kept");
    let current = f.book.read(&n("c"), b"k").unwrap().unwrap();
    assert!(f.book.remove_delivered(&n("c"), b"k", &current).unwrap());
    assert_eq!(f.book.pending(&n("c")), 0);
    assert_eq!(f.book.read(&n("c"), b"k").unwrap(), None);
}

#[test]
fn the_per_target_cap_refuses_new_keys_but_merges_known_ones() {
    let f = fixture(HintConfig {
        max_per_target: 2,
        ..HintConfig::default()
    });
    f.book.store(&n("c"), b"k1", &write("a", "1")).unwrap();
    f.book.store(&n("c"), b"k2", &write("a", "1")).unwrap();
    let err = f.book.store(&n("c"), b"k3", &write("a", "1")).unwrap_err();
    assert_eq!(
        err,
        HintError::TargetFull {
            owner: n("c"),
            limit: 2
        }
    );
    f.book.store(&n("c"), b"k1", &write("b", "2")).unwrap();
    f.book.store(&n("d"), b"k3", &write("a", "1")).unwrap();
    assert_eq!(f.book.pending(&n("c")), 2);
    assert_eq!(f.book.pending_total(), 3);
}

/// The byte cap refuses a new hint, and a merge that would grow one, past
/// it; what a delivery frees is counted back.
#[test]
fn the_byte_cap_refuses_what_would_pass_it_and_frees_what_is_delivered() {
    let one = {
        let f = fixture(HintConfig::default());
        f.book.store(&n("c"), b"k1", &write("a", "1")).unwrap();
        f.book.bytes()
    };
    assert!(one > 0);
    let f = fixture(HintConfig {
        max_bytes: 2 * one,
        ..HintConfig::default()
    });
    f.book.store(&n("c"), b"k1", &write("a", "1")).unwrap();
    f.book.store(&n("d"), b"k2", &write("a", "1")).unwrap();
    assert_eq!(f.book.bytes(), 2 * one);
    match f.book.store(&n("c"), b"k3", &write("a", "1")).unwrap_err() {
        HintError::BytesFull {
            held_bytes,
            limit_bytes,
            ..
        } => assert_eq!((held_bytes, limit_bytes), (2 * one, 2 * one)),
        other => panic!("{other:?}"),
    }
    // A sibling would grow k1's hint: refused too, and nothing changed.
    assert!(matches!(
        f.book.store(&n("c"), b"k1", &write("b", "2")),
        Err(HintError::BytesFull { .. })
    ));
    assert_eq!(f.book.read(&n("c"), b"k1").unwrap(), Some(write("a", "1")));
    assert_eq!((f.book.pending_total(), f.book.bytes()), (2, 2 * one));
    let held = f.book.read(&n("c"), b"k1").unwrap().unwrap();
    assert!(f.book.remove_delivered(&n("c"), b"k1", &held).unwrap());
    assert_eq!(f.book.bytes(), one);
    f.book.store(&n("c"), b"k3", &write("a", "1")).unwrap();
    assert_eq!(f.book.bytes(), 2 * one);
}

#[test]
fn hints_past_the_window_are_dropped_and_a_new_write_renews_one() {
    let f = fixture(HintConfig {
        ttl_ms: 10_000,
        ..HintConfig::default()
    });
    f.book.store(&n("c"), b"old", &write("a", "1")).unwrap();
    f.book.store(&n("c"), b"renewed", &write("a", "1")).unwrap();
    f.now.fetch_add(8_000, Ordering::SeqCst);
    f.book.store(&n("c"), b"renewed", &write("b", "2")).unwrap();
    // Re-sending a write already held does not renew the hint.
    f.book.store(&n("c"), b"old", &write("a", "1")).unwrap();
    assert_eq!(f.book.expire_all().unwrap(), 0, "nothing is 10 s old yet");
    f.now.fetch_add(3_000, Ordering::SeqCst);
    assert_eq!(f.book.expire_all().unwrap(), 1);
    assert_eq!(f.book.read(&n("c"), b"old").unwrap(), None);
    assert!(f.book.read(&n("c"), b"renewed").unwrap().is_some());
    assert_eq!(f.book.pending(&n("c")), 1);
}

/// A hint handed on with an age past the window is not merged into one
/// held: its values would live on at the held hint's younger age.
#[test]
fn a_hint_handed_on_expired_is_not_merged_into_a_live_one() {
    let f = fixture(HintConfig {
        ttl_ms: 5_000,
        ..HintConfig::default()
    });
    f.book.store(&n("c"), b"k", &write("a", "live")).unwrap();
    let now = f.book.now_ms();
    f.book
        .store_aged(&n("c"), b"k", &write("b", "expired"), now - 5_001)
        .unwrap();
    assert_eq!(
        f.book.read(&n("c"), b"k").unwrap(),
        Some(write("a", "live"))
    );
    assert_eq!(
        f.book.batch(&n("c"), None, 10).unwrap()[0].stored_at_ms,
        now
    );
}

/// A hint past the window, not yet swept, is as good as gone: a stand-in's
/// read does not see it, and a new write for its key replaces it rather
/// than merging into it (which would give its old values a new age).
#[test]
fn a_hint_past_the_window_is_neither_read_nor_merged_into() {
    let f = fixture(HintConfig {
        ttl_ms: 10_000,
        ..HintConfig::default()
    });
    f.book.store(&n("c"), b"k", &write("a", "old")).unwrap();
    f.now.fetch_add(10_001, Ordering::SeqCst);
    assert_eq!(
        f.book.read(&n("c"), b"k").unwrap(),
        None,
        "expired, unswept"
    );
    f.book.store(&n("c"), b"k", &write("b", "new")).unwrap();
    let held = f.book.read(&n("c"), b"k").unwrap().expect("the new write");
    assert_eq!(held, write("b", "new"), "the old value is not carried on");
    assert_eq!(f.book.pending(&n("c")), 1, "replaced, not added");
    let hint = &f.book.batch(&n("c"), None, 10).unwrap()[0];
    assert_eq!(hint.stored_at_ms, 1_010_001);
}

#[test]
fn reopening_counts_the_hints_already_stored() {
    let f = fixture(HintConfig::default());
    for i in 0..2500 {
        let owner = if i % 5 == 0 { "d" } else { "c" };
        f.book
            .store(&n(owner), format!("k{i}").as_bytes(), &write("a", "v"))
            .unwrap();
    }
    let reopened =
        HintBook::open(f.backend.clone(), HintConfig::default(), Arc::new(|| 0)).unwrap();
    assert_eq!(reopened.pending(&n("c")), 2000);
    assert_eq!(reopened.pending(&n("d")), 500);
    assert_eq!(reopened.targets(), vec![n("c"), n("d")]);
}

#[test]
fn batches_page_through_one_owner_only() {
    let f = fixture(HintConfig::default());
    for owner in ["c", "cc", "d"] {
        for i in 0..5 {
            f.book
                .store(&n(owner), format!("k{i}").as_bytes(), &write("a", "v"))
                .unwrap();
        }
    }
    let mut keys = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = f.book.batch(&n("c"), after.as_deref(), 2).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        keys.extend(page.into_iter().map(|h| String::from_utf8(h.key).unwrap()));
    }
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
}

/// Large hints come in smaller batches: a page ends once its values reach
/// `HINT_SCAN_MAX_BYTES`, and paging still visits every hint.
#[test]
fn batches_of_large_hints_are_cut_by_bytes() {
    let f = fixture(HintConfig::default());
    let big = "x".repeat(HINT_SCAN_MAX_BYTES / 2 + 1);
    for i in 0..5 {
        f.book
            .store(&n("c"), format!("k{i}").as_bytes(), &write("a", &big))
            .unwrap();
    }
    let mut pages = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = f.book.batch(&n("c"), after.as_deref(), 64).unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        pages.push(page.len());
    }
    // Two of them pass the cap: pages of 2, 2 and the last one.
    assert_eq!(pages, [2, 2, 1]);
}

#[derive(Debug, Clone)]
enum Op {
    /// A store as written `age_ms` ago (a moved hint keeps its age).
    Store {
        owner: u8,
        key: u8,
        actor: u8,
        age_ms: u16,
    },
    Deliver {
        owner: u8,
        key: u8,
    },
    Tick {
        ms: u16,
    },
    Expire,
    /// Begins a sweep pass over an owner, beside those in flight.
    BeginPass {
        owner: u8,
    },
    /// The next page (of 2) of one of the passes in flight.
    PassPage {
        pass: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 0u8..6, 0u8..3, prop_oneof![Just(0u16), 0u16..7000]).prop_map(
            |(owner, key, actor, age_ms)| Op::Store {
                owner,
                key,
                actor,
                age_ms
            }
        ),
        (0u8..3, 0u8..6).prop_map(|(owner, key)| Op::Deliver { owner, key }),
        (0u16..4000).prop_map(|ms| Op::Tick { ms }),
        Just(Op::Expire),
        (0u8..3).prop_map(|owner| Op::BeginPass { owner }),
        any::<u8>().prop_map(|pass| Op::PassPage { pass }),
    ]
}

proptest! {
    /// `pending` always equals what the backend holds, and `bytes` the
    /// size of its entries, within the caps (a book opened over the same
    /// entries counts the same); every stored write is either still held
    /// (merged) or was delivered or expired. No owner's stored hint is
    /// older than the owner's `oldest_bound_ms`, whatever sweep passes
    /// overlap the stores, so a sweep that reads only the owners past the
    /// window leaves no hint past it.
    #[test]
    fn pending_counts_match_the_stored_entries(ops in prop::collection::vec(op(), 1..60)) {
        const MAX_BYTES: u64 = 400;
        let config = HintConfig { ttl_ms: 5_000, max_per_target: 4, max_bytes: MAX_BYTES };
        let f = fixture(config.clone());
        let owners = [n("x"), n("y"), n("z")];
        let mut passes: Vec<ExpiryPass> = Vec::new();
        for op in ops {
            match op {
                Op::Store { owner, key, actor, age_ms } => {
                    let clock = write(["a", "b", "c"][actor as usize], "v");
                    let at = f.book.now_ms() - u64::from(age_ms);
                    let _ = f.book.store_aged(&owners[owner as usize], &[key], &clock, at);
                }
                Op::Deliver { owner, key } => {
                    let owner = &owners[owner as usize];
                    if let Some(held) = f.book.read(owner, &[key]).unwrap() {
                        prop_assert!(f.book.remove_delivered(owner, &[key], &held).unwrap());
                    }
                }
                Op::Tick { ms } => { f.now.fetch_add(u64::from(ms), Ordering::SeqCst); }
                Op::Expire => {
                    f.book.expire_all().unwrap();
                    let now = f.book.now_ms();
                    for owner in &owners {
                        let hints = f.book.batch(owner, None, 100).unwrap();
                        prop_assert!(hints.iter().all(|h| !f.book.is_expired(h, now)), "swept");
                    }
                }
                Op::BeginPass { owner } => passes.push(f.book.begin_expiry(&owners[owner as usize])),
                Op::PassPage { pass } if !passes.is_empty() => {
                    let at = pass as usize % passes.len();
                    if !f.book.expire_page(&mut passes[at], 2).unwrap() {
                        passes.remove(at);
                    }
                }
                Op::PassPage { .. } => {}
            }
            for owner in &owners {
                let hints = f.book.batch(owner, None, 100).unwrap();
                prop_assert_eq!(f.book.pending(owner), hints.len() as u64);
                prop_assert!(hints.len() <= 4, "the cap holds");
                if let Some(oldest) = hints.iter().map(|h| h.stored_at_ms).min() {
                    let bound = f.book.oldest_bound_ms(owner);
                    prop_assert!(bound.is_some_and(|b| b <= oldest), "{:?} > {}", bound, oldest);
                }
            }
            let entries = f.backend.scan(&[], None, 10_000, usize::MAX).unwrap();
            let held: u64 = entries.iter().map(|(id, value)| entry_bytes(id, value)).sum();
            prop_assert_eq!(f.book.bytes(), held);
            prop_assert!(held <= MAX_BYTES, "the byte cap holds");
        }
        let reopened = HintBook::open(f.backend.clone(), config, Arc::new(|| 0)).unwrap();
        prop_assert_eq!(reopened.bytes(), f.book.bytes());
        for owner in &owners {
            let oldest = f.book.batch(owner, None, 100).unwrap().iter().map(|h| h.stored_at_ms).min();
            prop_assert_eq!(reopened.oldest_bound_ms(owner), oldest, "exact at open");
        }
    }
}

/// The keys of `owner`'s first batch of hints (up to 10).
fn batch_keys(book: &HintBook<Arc<MemHintBackend>>, owner: &str) -> Vec<Vec<u8>> {
    book.batch(&n(owner), None, 10)
        .unwrap()
        .into_iter()
        .map(|h| h.key)
        .collect()
}

#[test]
fn a_corrupt_record_is_dropped_without_blocking_the_others() {
    let f = fixture(HintConfig::default());
    f.book.store(&n("c"), b"a", &write("a", "1")).unwrap();
    f.book.store(&n("c"), b"z", &write("a", "1")).unwrap();
    f.backend.put(&entry_id(&n("c"), b"m"), b"garbage").unwrap();
    let book = HintBook::open(f.backend.clone(), HintConfig::default(), Arc::new(|| 0)).unwrap();
    assert_eq!(book.pending(&n("c")), 3);
    let keys = batch_keys(&book, "c");
    assert_eq!(keys, [b"a".to_vec(), b"z".to_vec()]);
    assert_eq!(book.pending(&n("c")), 2, "the corrupt one is gone");
}

/// A new hint for a key whose held record is corrupt replaces it (before,
/// every store for the key failed until the sweep dropped the record), and
/// the owner's count, which counted the corrupt record, stays.
#[test]
fn a_new_hint_replaces_a_corrupt_one() {
    let f = fixture(HintConfig::default());
    f.book.store(&n("c"), b"a", &write("a", "1")).unwrap();
    f.backend.put(&entry_id(&n("c"), b"m"), b"garbage").unwrap();
    let book = HintBook::open(f.backend.clone(), HintConfig::default(), Arc::new(|| 0)).unwrap();
    assert_eq!(book.pending(&n("c")), 2);
    assert!(book.read(&n("c"), b"m").is_err(), "still corrupt");
    book.store(&n("c"), b"m", &write("b", "2")).unwrap();
    assert_eq!(book.read(&n("c"), b"m").unwrap(), Some(write("b", "2")));
    assert_eq!(book.pending(&n("c")), 2);
    let keys = batch_keys(&book, "c");
    assert_eq!(keys, [b"a".to_vec(), b"m".to_vec()]);
}

/// An entry whose id names no owner (a corrupt write, a bad disk) does not
/// stop the book from opening, and so the node from starting: it is
/// dropped, and the others are counted.
#[test]
fn an_entry_with_a_corrupt_id_is_dropped_at_open() {
    let f = fixture(HintConfig::default());
    f.book.store(&n("c"), b"a", &write("a", "1")).unwrap();
    f.backend.put(b"\xff-not-an-owner", b"garbage").unwrap();
    f.backend.put(b"", b"empty id").unwrap();
    let book = HintBook::open(f.backend.clone(), HintConfig::default(), Arc::new(|| 0)).unwrap();
    assert_eq!(book.targets(), vec![n("c")]);
    assert_eq!(book.pending(&n("c")), 1);
    assert_eq!(
        f.backend.get(b"\xff-not-an-owner").unwrap(),
        None,
        "dropped"
    );
    assert_eq!(f.backend.get(b"").unwrap(), None, "dropped");
}

/// A page of nothing but corrupt records does not end the owner's hints:
/// callers (delivery, expiry) take an empty batch as the end.
#[test]
fn a_page_of_corrupt_records_is_read_past() {
    let f = fixture(HintConfig::default());
    for key in [b"a", b"b", b"c"] {
        f.backend.put(&entry_id(&n("c"), key), b"garbage").unwrap();
    }
    f.book.store(&n("c"), b"d", &write("a", "1")).unwrap();
    let book = HintBook::open(f.backend.clone(), HintConfig::default(), Arc::new(|| 0)).unwrap();
    let batch = book.batch(&n("c"), None, 2).unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].key, b"d");
    assert_eq!(book.pending(&n("c")), 1, "the corrupt ones are gone");
    assert!(book.batch(&n("c"), Some(b"d"), 2).unwrap().is_empty());
}

/// The sweep reads only the owners that may hold a hint past the window:
/// the book keeps a time no hint of each owner's is older than, lowered by
/// every store (a moved hint's old age too) and raised by a pass that read
/// them all.
#[test]
fn a_sweep_reads_only_the_owners_that_may_hold_a_hint_past_the_window() {
    let f = fixture(HintConfig {
        ttl_ms: 10_000,
        ..HintConfig::default()
    });
    let start = f.book.now_ms();
    f.book.store(&n("c"), b"k1", &write("a", "1")).unwrap();
    f.now.fetch_add(6_000, Ordering::SeqCst);
    f.book.store(&n("c"), b"k2", &write("a", "1")).unwrap();
    f.book.store(&n("d"), b"k1", &write("a", "1")).unwrap();
    f.now.fetch_add(3_000, Ordering::SeqCst);
    assert!(f.book.owners_to_sweep().is_empty(), "all within the window");
    f.now.fetch_add(2_000, Ordering::SeqCst);
    assert_eq!(f.book.owners_to_sweep(), [n("c")]);
    let mut pass = f.book.begin_expiry(&n("c"));
    while f.book.expire_page(&mut pass, 1).unwrap() {}
    assert_eq!((pass.read, pass.dropped), (2, 1));
    assert_eq!(f.book.oldest_bound_ms(&n("c")), Some(start + 6_000));
    assert!(f.book.owners_to_sweep().is_empty(), "k2 is 5 s old");
    // A moved hint 9 s old (one older than the window is not stored).
    f.book
        .store_aged(&n("d"), b"moved", &write("b", "2"), start + 2_000)
        .unwrap();
    assert!(f.book.owners_to_sweep().is_empty());
    f.now.fetch_add(1_500, Ordering::SeqCst);
    assert_eq!(f.book.owners_to_sweep(), [n("d")], "an old moved hint");
}

/// A store refused for want of room (either cap) says so until the next
/// sweep begins, so that the handoff worker can sweep early.
#[test]
fn a_store_refused_for_room_is_reported_once() {
    let f = fixture(HintConfig {
        max_per_target: 1,
        ..HintConfig::default()
    });
    f.book.store(&n("c"), b"k1", &write("a", "1")).unwrap();
    assert!(!f.book.refused_for_room());
    assert!(f.book.store(&n("c"), b"k2", &write("a", "1")).is_err());
    assert!(f.book.refused_for_room());
    f.book.begin_sweep();
    assert!(!f.book.refused_for_room(), "answered by the sweep");
}

/// A record that does not decode counts as past any window at open, so the
/// first sweep reads its owner and drops it, whatever its first 8 bytes
/// (which would otherwise read as its time) say.
#[test]
fn a_corrupt_record_found_at_open_is_swept() {
    let config = HintConfig {
        ttl_ms: 10_000,
        ..HintConfig::default()
    };
    let f = fixture(config.clone());
    f.book.store(&n("c"), b"a", &write("a", "1")).unwrap();
    f.backend
        .put(&entry_id(&n("c"), b"m"), &[0xff; 40])
        .unwrap();
    let now = f.book.now_ms();
    let book = HintBook::open(f.backend.clone(), config, Arc::new(move || now)).unwrap();
    assert_eq!(
        book.owners_to_sweep(),
        [n("c")],
        "the corrupt record is due"
    );
    book.expire_all().unwrap();
    assert_eq!(book.pending(&n("c")), 1, "the corrupt one is gone");
    assert!(book.owners_to_sweep().is_empty());
}

/// A stand-in coordinator's mint on a hint: `write`'s value under the
/// recorded actor if there is one, else under `fresh`. Returns the actor
/// `mint` was given.
fn mint_on(book: &HintBook<Arc<MemHintBackend>>, value: &str, fresh: &str) -> Option<NodeId> {
    let mut given = None;
    book.mint(&n("c"), b"k", &mut |mut clock, recorded| {
        given = recorded.clone();
        let actor = recorded.unwrap_or_else(|| n(fresh));
        let context = clock.context();
        clock.update(
            &context,
            ringkv_core::dvv::Payload::Value(value.as_bytes().to_vec()),
            &actor,
        );
        Some((clock, actor))
    })
    .unwrap();
    given
}

/// The actor a stand-in mints under lives as long as the hint: merges
/// keep it, delivery removes it with the hint, and a record of the format
/// from before actors (no flag) still reads.
#[test]
fn a_hints_actor_lives_and_goes_with_it() {
    let f = fixture(HintConfig::default());
    assert_eq!(mint_on(&f.book, "v1", "x.1"), None, "a new hint has none");
    assert_eq!(mint_on(&f.book, "v2", "x.2"), Some(n("x.1")));
    f.book.store(&n("c"), b"k", &write("a", "merged")).unwrap();
    assert_eq!(
        mint_on(&f.book, "v3", "x.3"),
        Some(n("x.1")),
        "kept by a merge"
    );
    let held = f.book.read(&n("c"), b"k").unwrap().unwrap();
    assert_eq!(held.counter(&n("x.1")), 3);
    assert_eq!(f.book.pending(&n("c")), 1);
    // Its bytes are counted with the record's.
    let stored: u64 = f
        .backend
        .map
        .lock()
        .unwrap()
        .iter()
        .map(|(id, value)| entry_bytes(id, value))
        .sum();
    assert_eq!(f.book.bytes(), stored);
    assert!(f.book.remove_delivered(&n("c"), b"k", &held).unwrap());
    assert_eq!(
        mint_on(&f.book, "v4", "x.4"),
        None,
        "delivered with its hint"
    );

    // The format before actors: the time, then the clock.
    let old = {
        let mut value = 1_000_000u64.to_le_bytes().to_vec();
        value.extend_from_slice(&encode_clock(&write("a", "old")));
        value
    };
    let held = decode_hint(&old).unwrap();
    assert_eq!((held.stored_at_ms, held.actor), (1_000_000, None));
    let with_actor = Held {
        clock: write("a", "new"),
        stored_at_ms: 2_000_000,
        actor: Some(n("x.9")),
    };
    assert_eq!(decode_hint(&encode_hint(&with_actor)).unwrap(), with_actor);
}

/// A hint replaced rather than merged into (past the window) loses its
/// actor: its dots went with the old clock, so continuing the actor could
/// mint one of them again.
#[test]
fn a_hint_replaced_past_the_window_loses_its_actor() {
    let f = fixture(HintConfig {
        ttl_ms: 5_000,
        ..HintConfig::default()
    });
    mint_on(&f.book, "v1", "x.1");
    f.now.fetch_add(5_001, Ordering::SeqCst);
    assert_eq!(mint_on(&f.book, "v2", "x.2"), None);
    let held = f.book.read(&n("c"), b"k").unwrap().unwrap();
    assert_eq!(held.counter(&n("x.1")), 0, "the old clock was replaced");
    assert_eq!(held.counter(&n("x.2")), 1);
}

/// A record whose actor does not fit, or is no node id, is corrupt.
#[test]
fn a_record_with_a_bad_actor_is_corrupt() {
    let flagged = (1_000_000u64 | ACTOR_FLAG).to_le_bytes().to_vec();
    for (tail, what) in [
        (vec![], "no length"),
        (vec![5, b'a'], "shorter than its length"),
        (vec![1, 0xff], "not UTF-8"),
        (vec![0], "empty name"),
    ] {
        let mut value = flagged.clone();
        value.extend_from_slice(&tail);
        value.extend_from_slice(&encode_clock(&write("a", "v")));
        assert!(
            matches!(decode_hint(&value), Err(HintError::Corrupt { .. })),
            "{what}"
        );
    }
}
