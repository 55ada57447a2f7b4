//! Round trips, upgrades and digests of derived states.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ms2m_core::{ServiceState, StateError};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Tier {
    Free,
    Paid { seats: u32 },
    Custom(String, Option<u64>),
}

/// Nested collections, an enum field, a set and two kinds of skipped field.
#[derive(Debug, Clone, PartialEq, ServiceState)]
#[state(version = 3)]
struct Ledger {
    accounts: HashMap<String, Vec<(u32, Option<String>)>>,
    history: BTreeMap<u64, HashMap<String, i64>>,
    tags: HashSet<u32>,
    sorted: BTreeSet<String>,
    tier: Tier,
    note: Option<Vec<u8>>,
    #[state(skip)]
    cache: HashMap<String, usize>,
    #[state(skip, rebuild = Ledger::count_entries)]
    entries: usize,
}

impl Ledger {
    fn count_entries(&self) -> usize {
        self.accounts.values().map(Vec::len).sum::<usize>() + self.history.len()
    }
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![
        Just(Tier::Free),
        any::<u32>().prop_map(|seats| Tier::Paid { seats }),
        (".{0,8}", any::<Option<u64>>()).prop_map(|(s, n)| Tier::Custom(s, n)),
    ]
}

fn ledger() -> impl Strategy<Value = Ledger> {
    use proptest::collection::{btree_map, btree_set, hash_map, hash_set, vec};
    (
        hash_map(
            "[a-z]{0,6}",
            vec((any::<u32>(), proptest::option::of("[a-z]{0,4}")), 0..4),
            0..6,
        ),
        btree_map(any::<u64>(), hash_map("[a-z]{1,3}", any::<i64>(), 0..4), 0..4),
        hash_set(any::<u32>(), 0..10),
        btree_set("[a-z]{0,4}", 0..4),
        tier(),
        proptest::option::of(vec(any::<u8>(), 0..16)),
        any::<usize>(),
    )
        .prop_map(|(accounts, history, tags, sorted, tier, note, junk)| {
            let mut l = Ledger {
                accounts,
                history,
                tags,
                sorted,
                tier,
                note,
                cache: [("junk".to_string(), junk)].into(),
                entries: 0,
            };
            l.entries = l.count_entries();
            l
        })
}

/// The same ledger, every hash collection rebuilt in reverse insertion
/// order and with another capacity, so it iterates in another order.
fn reordered(l: &Ledger) -> Ledger {
    fn rev_map<K: Clone + Eq + std::hash::Hash + Ord, V: Clone>(m: &HashMap<K, V>) -> HashMap<K, V> {
        let mut items: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        items.sort_by(|a, b| b.0.cmp(&a.0));
        let mut out = HashMap::with_capacity(m.len() * 4 + 64);
        out.extend(items);
        out
    }
    let mut tags: Vec<u32> = l.tags.iter().copied().collect();
    tags.sort_unstable_by(|a, b| b.cmp(a));
    let mut new_tags = HashSet::with_capacity(l.tags.len() * 4 + 64);
    new_tags.extend(tags);
    Ledger {
        accounts: rev_map(&l.accounts),
        history: l.history.iter().map(|(k, v)| (*k, rev_map(v))).collect(),
        tags: new_tags,
        sorted: l.sorted.clone(),
        tier: l.tier.clone(),
        note: l.note.clone(),
        cache: HashMap::new(),
        entries: l.entries,
    }
}

proptest! {
    #[test]
    fn streamed_encoding_and_restore_match_the_whole_ones(l in ledger()) {
        let bytes = l.snapshot().unwrap();
        let mut streamed = Vec::new();
        l.snapshot_to(&mut streamed).unwrap();
        prop_assert_eq!(&streamed, &bytes);
        let whole = Ledger::restore(Ledger::SCHEMA_VERSION, &bytes).unwrap();
        let back = Ledger::restore_from(Ledger::SCHEMA_VERSION, &mut &bytes[..]).unwrap();
        prop_assert_eq!(&back, &whole);
        prop_assert_eq!(back.entries, l.count_entries(), "rebuilt after a streamed restore");
    }

    #[test]
    fn struct_round_trips(l in ledger()) {
        let bytes = l.snapshot().unwrap();
        let back = Ledger::restore(Ledger::SCHEMA_VERSION, &bytes).unwrap();
        let expected = Ledger { cache: HashMap::new(), ..l.clone() };
        prop_assert_eq!(&back, &expected);
        prop_assert_eq!(back.entries, l.count_entries());
        prop_assert_eq!(back.digest(), l.digest());
    }

    #[test]
    fn digest_ignores_insertion_order(l in ledger()) {
        let r = reordered(&l);
        prop_assert_eq!(r.digest(), l.digest());
    }

    #[test]
    fn different_states_digest_differently(a in ledger(), b in ledger()) {
        let same_stored = a.accounts == b.accounts
            && a.history == b.history
            && a.tags == b.tags
            && a.sorted == b.sorted
            && a.tier == b.tier
            && a.note == b.note;
        prop_assert_eq!(same_stored, a.digest() == b.digest());
    }

    #[test]
    fn one_change_changes_the_digest(l in ledger(), key in "[a-z]{0,6}", n in any::<i64>()) {
        let mut changed = l.clone();
        let day = changed.history.entry(0).or_default();
        let before = day.insert(key, n);
        prop_assume!(before != Some(n));
        prop_assert_ne!(changed.digest(), l.digest());
    }

    #[test]
    fn garbage_bytes_are_errors_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        match Ledger::restore(Ledger::SCHEMA_VERSION, &bytes) {
            Ok(l) => prop_assert_eq!(l.entries, l.count_entries()),
            Err(e) => prop_assert!(matches!(e, StateError::Decode { version: 3, .. }), "{e:?}"),
        }
    }
}

#[test]
fn skipped_fields_are_not_stored_or_digested() {
    let mut a = Ledger {
        accounts: [("x".to_string(), vec![(1, None)])].into(),
        history: BTreeMap::new(),
        tags: HashSet::new(),
        sorted: BTreeSet::new(),
        tier: Tier::Free,
        note: None,
        cache: HashMap::new(),
        entries: 1,
    };
    let (bytes, digest) = (a.snapshot().unwrap(), a.digest());
    a.cache.insert("big".into(), 1);
    a.entries = 99;
    assert_eq!(a.snapshot().unwrap(), bytes);
    assert_eq!(a.digest(), digest);
    let back = Ledger::restore(3, &bytes).unwrap();
    assert!(back.cache.is_empty());
    assert_eq!(back.entries, 1, "rebuilt from the stored fields");
}

/// An enum state, stored through its own serde impls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ServiceState)]
#[state(version = 1)]
enum Machine {
    Idle,
    Running {
        jobs: BTreeMap<u32, String>,
        started: HashMap<String, u64>,
    },
    Failed(String, Option<Box<Machine>>),
}

fn machine() -> impl Strategy<Value = Machine> {
    let leaf = prop_oneof![
        Just(Machine::Idle),
        (
            proptest::collection::btree_map(any::<u32>(), ".{0,4}", 0..4),
            proptest::collection::hash_map("[a-z]{0,3}", any::<u64>(), 0..4)
        )
            .prop_map(|(jobs, started)| Machine::Running { jobs, started }),
    ];
    leaf.prop_recursive(3, 8, 1, |inner| {
        (".{0,6}", proptest::option::of(inner)).prop_map(|(s, m)| Machine::Failed(s, m.map(Box::new)))
    })
}

proptest! {
    #[test]
    fn enum_round_trips(m in machine()) {
        let back = Machine::restore(1, &m.snapshot().unwrap()).unwrap();
        let mut streamed = Vec::new();
        m.snapshot_to(&mut streamed).unwrap();
        prop_assert_eq!(&Machine::restore_from(1, &mut &streamed[..]).unwrap(), &back);
        prop_assert_eq!(back.digest(), m.digest());
        prop_assert_eq!(back, m);
    }

    #[test]
    fn enum_digest_ignores_map_order(started in proptest::collection::hash_map("[a-z]{0,3}", any::<u64>(), 0..16)) {
        let mut items: Vec<_> = started.clone().into_iter().collect();
        items.sort();
        let mut other = HashMap::with_capacity(256);
        other.extend(items.into_iter().rev());
        let a = Machine::Running { jobs: BTreeMap::new(), started };
        let b = Machine::Running { jobs: BTreeMap::new(), started: other };
        prop_assert_eq!(a.digest(), b.digest());
    }
}

#[derive(Debug, PartialEq, ServiceState)]
#[state(version = 1)]
struct Pair(u64, #[state(skip)] Vec<u8>, String);

#[derive(Debug, PartialEq, ServiceState)]
#[state(version = 7)]
struct Empty;

#[test]
fn tuple_and_unit_structs() {
    let p = Pair(5, vec![1], "x".into());
    let back = Pair::restore(1, &p.snapshot().unwrap()).unwrap();
    let mut streamed = Vec::new();
    p.snapshot_to(&mut streamed).unwrap();
    assert_eq!(Pair::restore_from(1, &mut &streamed[..]).unwrap(), back);
    assert_eq!(back, Pair(5, vec![], "x".into()));
    assert_eq!(Empty::restore(7, &Empty.snapshot().unwrap()).unwrap(), Empty);
    assert!(Empty.snapshot().unwrap().is_empty());
}

// ---- upgrades ----

/// Version 1 as the old build defined it. Its `Deserialize` would read
/// `scratch` and fail on v1 bytes: upgrades must prefer `restore`.
#[derive(Debug, Clone, PartialEq, Deserialize, ServiceState)]
#[state(version = 1)]
struct CounterV1 {
    total: u32,
    names: Vec<String>,
    #[state(skip)]
    scratch: Vec<u8>,
}

/// Version 2: totals widened, names became a count map.
#[derive(Debug, PartialEq, ServiceState)]
#[state(version = 2, upgrade(from = 1, via = CounterV1))]
struct CounterV2 {
    total: u64,
    names: BTreeMap<String, u32>,
}

impl From<CounterV1> for CounterV2 {
    fn from(v1: CounterV1) -> Self {
        let mut names = BTreeMap::new();
        for n in v1.names {
            *names.entry(n).or_default() += 1;
        }
        CounterV2 {
            total: v1.total.into(),
            names,
        }
    }
}

/// Version 3 reads v1 and v2 snapshots by chaining through `CounterV2`.
#[derive(Debug, PartialEq, ServiceState)]
#[state(version = 3, upgrade(from = 2, via = CounterV2), upgrade(from = 1, via = CounterV2))]
struct CounterV3 {
    total: i128,
    distinct: u32,
    #[state(skip, rebuild = CounterV3::check)]
    valid: bool,
}

impl CounterV3 {
    fn check(&self) -> bool {
        self.total >= 0
    }
}

impl From<CounterV2> for CounterV3 {
    fn from(v2: CounterV2) -> Self {
        CounterV3 {
            total: v2.total.into(),
            distinct: v2.names.len() as u32,
            valid: false,
        }
    }
}

fn counter_v1() -> impl Strategy<Value = CounterV1> {
    (any::<u32>(), proptest::collection::vec("[ab]{1,2}", 0..8)).prop_map(|(total, names)| CounterV1 {
        total,
        names,
        scratch: vec![1, 2, 3],
    })
}

proptest! {
    #[test]
    fn upgrade_v1_to_v2(v1 in counter_v1()) {
        let bytes = v1.snapshot().unwrap();
        let v2 = CounterV2::restore(1, &bytes).unwrap();
        prop_assert_eq!(&v2, &CounterV2::from(CounterV1 { scratch: vec![], ..v1.clone() }));
        // v3 chains v1 -> v2 -> v3, and runs its rebuild after the upgrade.
        let v3 = CounterV3::restore(1, &bytes).unwrap();
        prop_assert_eq!(v3, CounterV3 { total: v1.total.into(), distinct: v2.names.len() as u32, valid: true });
        let v3 = CounterV3::restore(2, &v2.snapshot().unwrap()).unwrap();
        prop_assert_eq!(v3.total, i128::from(v1.total));
        // A streamed restore of an older version upgrades the same way.
        let streamed = CounterV3::restore_from(1, &mut &bytes[..]).unwrap();
        prop_assert_eq!(streamed, CounterV3::restore(1, &bytes).unwrap());
    }
}

/// The old version known only as a serde type (no `ServiceState`): the
/// mirror's encoding matches a serde struct with the stored fields in order.
#[derive(Deserialize)]
struct CounterV1Plain {
    total: u32,
    names: Vec<String>,
}

#[derive(Debug, PartialEq, ServiceState)]
#[state(version = 2, upgrade(from = 1, via = CounterV1Plain))]
struct CounterFromPlain {
    total: u64,
    count: usize,
}

impl From<CounterV1Plain> for CounterFromPlain {
    fn from(v1: CounterV1Plain) -> Self {
        CounterFromPlain {
            total: v1.total.into(),
            count: v1.names.len(),
        }
    }
}

#[test]
fn upgrade_through_a_serde_type() {
    let v1 = CounterV1 {
        total: 9,
        names: vec!["a".into(), "b".into()],
        scratch: vec![],
    };
    let up = CounterFromPlain::restore(1, &v1.snapshot().unwrap()).unwrap();
    assert_eq!(up, CounterFromPlain { total: 9, count: 2 });
}

#[test]
fn unknown_versions_are_typed_errors() {
    let bytes = CounterV2 {
        total: 1,
        names: BTreeMap::new(),
    }
    .snapshot()
    .unwrap();
    for found in [0, 3, u32::MAX] {
        match CounterV2::restore(found, &bytes) {
            Err(StateError::UnknownSchemaVersion {
                found: f,
                current: 2,
                upgradable,
            }) => {
                assert_eq!((f, upgradable), (found, vec![1]));
            }
            other => panic!("version {found}: {other:?}"),
        }
    }
    match CounterV3::restore(4, &bytes) {
        Err(StateError::UnknownSchemaVersion { upgradable, .. }) => assert_eq!(upgradable, vec![1, 2]),
        other => panic!("{other:?}"),
    }
    // v2 bytes read as v1 do not decode into a garbled v1: they are an error.
    let v2 = CounterV2 {
        total: 300,
        names: [("x".to_string(), 2)].into(),
    }
    .snapshot()
    .unwrap();
    assert!(matches!(
        CounterV2::restore(1, &v2),
        Err(StateError::Decode { version: 1, .. })
    ));
}

/// A fallible upgrade: its error becomes `StateError::Upgrade`.
#[derive(Debug, ServiceState)]
#[state(version = 2, upgrade(from = 1, via = CounterV1))]
struct Strict {
    total: u8,
}

#[derive(Debug)]
struct TooBig(u32);

impl std::fmt::Display for TooBig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} does not fit", self.0)
    }
}

impl std::error::Error for TooBig {}

impl TryFrom<CounterV1> for Strict {
    type Error = TooBig;
    fn try_from(v1: CounterV1) -> Result<Self, TooBig> {
        u8::try_from(v1.total)
            .map(|total| Strict { total })
            .map_err(|_| TooBig(v1.total))
    }
}

#[test]
fn failed_upgrade_is_an_upgrade_error() {
    let ok = CounterV1 {
        total: 200,
        names: vec![],
        scratch: vec![],
    };
    assert_eq!(Strict::restore(1, &ok.snapshot().unwrap()).unwrap().total, 200);
    let big = CounterV1 { total: 256, ..ok };
    match Strict::restore(1, &big.snapshot().unwrap()) {
        Err(StateError::Upgrade { from: 1, source }) => assert_eq!(source.to_string(), "256 does not fit"),
        other => panic!("{other:?}"),
    }
}

/// A state of persistent collections and shared blobs: `freeze` is O(1).
#[derive(Debug, Clone, PartialEq, ServiceState)]
#[state(version = 1, freeze)]
struct Persistent {
    sessions: imbl::HashMap<u64, (u32, bytes::Bytes)>,
    tags: imbl::HashSet<String>,
    events: u64,
}

#[test]
fn a_frozen_state_encodes_and_digests_as_it_was_when_frozen() {
    let mut live = Persistent {
        sessions: (0..100u64)
            .map(|p| (p, (0, bytes::Bytes::from(vec![p as u8; 64]))))
            .collect(),
        tags: ["a", "b"].into_iter().map(String::from).collect(),
        events: 100,
    };
    let at_freeze = live.clone();
    let frozen = live.freeze().expect("#[state(freeze)] freezes");
    // The live state moves on; the frozen copy does not.
    live.sessions.insert(7, (1, bytes::Bytes::from_static(b"changed")));
    live.tags.insert("c".into());
    live.events += 1;
    assert_eq!(frozen.snapshot().unwrap(), at_freeze.snapshot().unwrap());
    assert_eq!(frozen.digest(), at_freeze.digest());
    assert_ne!(frozen.digest(), live.digest());
    let back = Persistent::restore(1, &frozen.snapshot().unwrap()).unwrap();
    assert_eq!(back, at_freeze);
}

#[test]
fn persistent_and_std_maps_digest_alike() {
    #[derive(ServiceState)]
    #[state(version = 1)]
    struct Std {
        sessions: HashMap<u64, u32>,
        tags: HashSet<String>,
    }
    #[derive(Clone, ServiceState)]
    #[state(version = 1, freeze)]
    struct Imbl {
        sessions: imbl::HashMap<u64, u32>,
        tags: imbl::HashSet<String>,
    }
    let std = Std {
        sessions: (0..50).map(|i| (i, i as u32 * 3)).collect(),
        tags: ["x", "y", "z"].into_iter().map(String::from).collect(),
    };
    let imbl = Imbl {
        sessions: std.sessions.iter().map(|(k, v)| (*k, *v)).collect(),
        tags: std.tags.iter().cloned().collect(),
    };
    assert_eq!(std.digest(), imbl.digest());
    assert_eq!(imbl.freeze().unwrap().digest(), std.digest());
}

#[test]
fn plain_states_do_not_freeze() {
    let ledger = Ledger {
        accounts: HashMap::new(),
        history: BTreeMap::new(),
        tags: HashSet::new(),
        sorted: BTreeSet::new(),
        tier: Tier::Free,
        note: None,
        cache: HashMap::new(),
        entries: 0,
    };
    assert!(ledger.freeze().is_none());
}
