//! Properties of the translation over random object sets drawn from small name pools (so
//! objects collide, reference each other, and miss each other often).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use consul_smi_api::{
    HttpMatch, HttpRouteGroup, Meta, ObjectRef, PortMatch, RouteRef, RuleKind, SmiKind, SmiObject,
    Subject, TcpRoute, TrafficSplit, TrafficSplitBackend, TrafficTarget, TrafficTargetRule,
    UdpRoute, Weight,
};
use consul_smi_core::{Action, DesiredState, IntentionRule};
use consul_smi_translate::{
    ConsulApi, Diagnostic, Index, NamespaceMode, TranslateOptions, apply_commands, diff, translate,
};
use proptest::prelude::*;
use proptest::sample::select;

const NAMESPACES: &[&str] = &["a", "b"];
const ACCOUNTS: &[&str] = &["s0", "s1", "s2", "s3"];
const ROUTES: &[&str] = &["r0", "r1"];
const MATCHES: &[&str] = &["m0", "m1", "m2"];

fn options() -> impl Strategy<Value = TranslateOptions> {
    (
        prop_oneof![Just(ConsulApi::Legacy), Just(ConsulApi::Modern)],
        any::<bool>(),
        prop_oneof![
            3 => Just(NamespaceMode::Oss),
            1 => Just(NamespaceMode::Enterprise { mirroring_prefix: None }),
            1 => Just(NamespaceMode::Enterprise { mirroring_prefix: Some("k-".into()) }),
        ],
        any::<bool>(),
    )
        .prop_map(
            |(target, widen_l7_on_legacy, namespaces, default_deny)| TranslateOptions {
                target,
                widen_l7_on_legacy,
                namespaces,
                default_deny,
            },
        )
}

fn subject() -> impl Strategy<Value = Subject> {
    (
        prop_oneof![
            20 => select(ACCOUNTS).prop_map(str::to_string),
            1 => Just("*".to_string()),
        ],
        prop_oneof![2 => Just(None), 1 => select(NAMESPACES).prop_map(|n| Some(n.to_string()))],
        prop_oneof![20 => Just("ServiceAccount"), 1 => Just("IdentityBinding")],
    )
        .prop_map(|(name, namespace, kind)| Subject {
            kind: kind.into(),
            name,
            namespace,
        })
}

fn rule() -> impl Strategy<Value = TrafficTargetRule> {
    (
        prop_oneof![
            4 => Just(RuleKind::HTTPRouteGroup),
            3 => Just(RuleKind::TCPRoute),
            1 => Just(RuleKind::UDPRoute),
        ],
        select(ROUTES),
        prop_oneof![
            Just(None),
            proptest::collection::vec(select(MATCHES).prop_map(str::to_string), 0..3)
                .prop_map(Some),
        ],
    )
        .prop_map(|(kind, name, matches)| TrafficTargetRule {
            kind,
            name: name.into(),
            matches,
        })
}

fn traffic_target(names: &'static [&'static str]) -> impl Strategy<Value = SmiObject> {
    (
        select(NAMESPACES),
        select(names),
        prop_oneof![Just(ACCESS_V1ALPHA1), Just(ACCESS_V1ALPHA3)],
        subject(),
        proptest::option::weighted(0.1, any::<u16>()),
        proptest::collection::vec(subject(), 0..3),
        proptest::collection::vec(rule(), 0..3),
    )
        .prop_map(
            |(ns, name, version, destination, destination_port, sources, rules)| {
                SmiObject::TrafficTarget(TrafficTarget {
                    meta: meta(ns, name, version),
                    destination,
                    destination_port,
                    sources,
                    rules,
                })
            },
        )
}

fn http_match_strategy() -> impl Strategy<Value = HttpMatch> {
    (
        select(MATCHES),
        proptest::collection::vec(select(&["GET", "post", "*", "BOGUS"][..]), 0..3),
        proptest::option::of(select(&["/a", "^/b", ""][..])),
        proptest::option::of(select(&["x-canary", "user-agent"][..])),
    )
        .prop_map(|(name, methods, path, header)| {
            let mut m = http_match(name, &methods, path);
            if let Some(header) = header {
                m.headers.insert(header.into(), ".*".into());
            }
            m
        })
}

fn route() -> impl Strategy<Value = SmiObject> {
    let ports = proptest::option::weighted(
        0.2,
        proptest::collection::vec(1u16..100, 0..2)
            .prop_map(|ports| PortMatch { name: None, ports }),
    );
    (
        0..3u8,
        select(NAMESPACES),
        select(ROUTES),
        proptest::collection::vec(http_match_strategy(), 0..3),
        ports,
    )
        .prop_map(|(kind, ns, name, matches, ports)| match kind {
            0 => SmiObject::HttpRouteGroup(HttpRouteGroup {
                meta: meta(ns, name, SPECS_V1ALPHA4),
                matches,
            }),
            1 => SmiObject::TcpRoute(TcpRoute {
                meta: meta(ns, name, SPECS_V1ALPHA4),
                matches: ports,
            }),
            _ => SmiObject::UdpRoute(UdpRoute {
                meta: meta(ns, name, SPECS_V1ALPHA4),
                matches: ports,
            }),
        })
}

fn traffic_split() -> impl Strategy<Value = SmiObject> {
    (
        select(NAMESPACES),
        select(&["x0", "x1"][..]),
        select(&["s0", "s1"][..]),
        proptest::collection::vec((select(ACCOUNTS), 0u64..3000), 0..4),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(ns, name, service, backends, with_matches)| {
            SmiObject::TrafficSplit(TrafficSplit {
                meta: meta(ns, name, SPLIT_V1ALPHA4),
                service: service.into(),
                backends: backends
                    .into_iter()
                    .map(|(service, millis)| TrafficSplitBackend {
                        service: service.into(),
                        weight: Weight { millis },
                    })
                    .collect(),
                matches: if with_matches {
                    vec![RouteRef {
                        kind: "HTTPRouteGroup".into(),
                        name: "r0".into(),
                        api_group: None,
                    }]
                } else {
                    vec![]
                },
            })
        })
}

fn object() -> impl Strategy<Value = SmiObject> {
    prop_oneof![
        5 => traffic_target(&["t0", "t1", "t2", "t3", "t4"]),
        4 => route(),
        1 => traffic_split(),
    ]
}

/// Random objects with distinct refs (so input order is all that varies between permutations).
fn objects() -> impl Strategy<Value = Vec<SmiObject>> {
    proptest::collection::vec(object(), 0..16).prop_map(|objects| {
        let mut seen = BTreeSet::new();
        objects
            .into_iter()
            .filter(|o| seen.insert(o.object_ref()))
            .collect()
    })
}

fn sorted(diagnostics: impl Iterator<Item = Diagnostic>) -> Vec<Diagnostic> {
    let mut diagnostics: Vec<Diagnostic> = diagnostics.collect();
    diagnostics.sort();
    diagnostics
}

fn assert_index_matches(
    index: &Index,
    objects: &BTreeMap<ObjectRef, SmiObject>,
    options: &TranslateOptions,
) {
    let all: Vec<SmiObject> = objects.values().cloned().collect();
    let expected = translate(&all, options);
    assert_eq!(index.desired(), &expected.state);
    assert_eq!(sorted(index.diagnostics().cloned()), expected.diagnostics);
    assert_eq!(index.objects_len(), objects.len());
    assert_eq!(index.statuses().count(), objects.len());
}

#[derive(Clone, Debug)]
enum Op {
    Apply(Box<SmiObject>),
    Delete(ObjectRef),
    Reset(Vec<SmiObject>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => object().prop_map(|o| Op::Apply(Box::new(o))),
        5 => (
            prop_oneof![
                Just(SmiKind::TrafficTarget),
                Just(SmiKind::HTTPRouteGroup),
                Just(SmiKind::TCPRoute),
                Just(SmiKind::UDPRoute),
                Just(SmiKind::TrafficSplit),
            ],
            select(NAMESPACES),
            select(&["t0", "t1", "t2", "r0", "r1", "x0"][..]),
        )
            .prop_map(|(kind, ns, name)| Op::Delete(ObjectRef::new(kind, ns, name))),
        1 => objects().prop_map(Op::Reset),
    ]
}

/// One difference between the snapshot an index holds and the next one.
#[derive(Clone, Debug)]
enum SnapshotEdit {
    /// A new object, or a new version of a held one when its reference is taken.
    Put(Box<SmiObject>),
    Delete(proptest::sample::Index),
    /// Same object with another resourceVersion: differs, but translates the same.
    Touch(proptest::sample::Index),
    /// A stale version of a held object listed before it, so the held version must win.
    StaleDuplicate(proptest::sample::Index, Box<SmiObject>),
}

fn snapshot_edit() -> impl Strategy<Value = SnapshotEdit> {
    prop_oneof![
        4 => object().prop_map(|o| SnapshotEdit::Put(Box::new(o))),
        2 => any::<proptest::sample::Index>().prop_map(SnapshotEdit::Delete),
        2 => any::<proptest::sample::Index>().prop_map(SnapshotEdit::Touch),
        1 => (any::<proptest::sample::Index>(), object())
            .prop_map(|(i, o)| SnapshotEdit::StaleDuplicate(i, Box::new(o))),
    ]
}

/// `snapshot` after `edits`, with distinct references except for stale duplicates.
fn edited(snapshot: &[SmiObject], edits: &[SnapshotEdit]) -> Vec<SmiObject> {
    let mut next = snapshot.to_vec();
    for edit in edits {
        match edit {
            SnapshotEdit::Put(object) => {
                let object_ref = object.object_ref();
                match next.iter_mut().find(|o| o.object_ref() == object_ref) {
                    Some(held) => *held = (**object).clone(),
                    None => next.push((**object).clone()),
                }
            }
            SnapshotEdit::Delete(i) if !next.is_empty() => {
                next.remove(i.index(next.len()));
            }
            SnapshotEdit::Touch(i) if !next.is_empty() => {
                let i = i.index(next.len());
                let meta = next[i].meta_mut();
                let version = meta.resource_version.as_deref().unwrap_or("0");
                meta.resource_version = Some(format!("{version}+"));
            }
            SnapshotEdit::StaleDuplicate(i, stale) if !next.is_empty() => {
                let i = i.index(next.len());
                let mut stale = (**stale).clone();
                // Same kind and name as the held object; the content is another object's.
                let held = next[i].meta().clone();
                if stale.kind() == next[i].kind() {
                    *stale.meta_mut() = Meta {
                        resource_version: Some("stale".into()),
                        ..held
                    };
                    next.insert(i, stale);
                }
            }
            _ => {}
        }
    }
    next
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=N for a longer soak.
    #[test]
    fn result_is_independent_of_input_order(
        (objects, shuffled) in objects().prop_flat_map(|o| (Just(o.clone()), Just(o).prop_shuffle())),
        options in options(),
    ) {
        prop_assert_eq!(translate(&objects, &options), translate(&shuffled, &options));
    }

    #[test]
    fn applying_the_diff_of_a_to_b_to_a_gives_b(a in objects(), b in objects(), options in options()) {
        let a = translate(&a, &options).state;
        let b = translate(&b, &options).state;
        let mut state = a.clone();
        apply_commands(&mut state, &diff(&a, &b));
        prop_assert_eq!(&state, &b);
        prop_assert!(diff(&b, &b).is_empty());
    }

    #[test]
    fn deleting_every_object_yields_the_empty_state(
        (objects, order) in objects().prop_flat_map(|o| (Just(o.clone()), Just(o).prop_shuffle())),
        options in options(),
    ) {
        let mut index = Index::new(options.clone());
        let mut consul = DesiredState::default();
        apply_commands(&mut consul, &diff(&DesiredState::default(), index.desired()));
        apply_commands(&mut consul, &index.reset(objects));
        for object in &order {
            apply_commands(&mut consul, &index.delete(&object.object_ref()));
        }
        let empty = translate(&[], &options).state;
        prop_assert_eq!(index.desired(), &empty);
        prop_assert_eq!(&consul, &empty);
        prop_assert_eq!(empty.intentions.len(), usize::from(options.default_deny));
        prop_assert!(empty.splitters.is_empty() && empty.service_defaults.is_empty());
        prop_assert_eq!(index.diagnostics().count(), 0);
        prop_assert_eq!(index.objects_len(), 0);
    }

    #[test]
    fn adding_a_traffic_target_never_removes_a_grant(
        objects in objects(),
        extra in traffic_target(&["t-new"]),
        options in options(),
    ) {
        let before = translate(&objects, &options).state;
        let mut more = objects.clone();
        more.push(extra);
        let after = translate(&more, &options).state;
        for (key, old) in &before.intentions {
            let new = after.intentions.get(key);
            prop_assert!(new.is_some(), "{} disappeared", key);
            match (&old.rule, &new.unwrap().rule) {
                (IntentionRule::L4(a), IntentionRule::L4(b)) => prop_assert_eq!(a, b),
                (IntentionRule::L7(_), IntentionRule::L4(b)) => prop_assert_eq!(*b, Action::Allow),
                (IntentionRule::L7(old), IntentionRule::L7(new)) => {
                    prop_assert!(old.iter().all(|p| new.contains(p)), "{} lost permissions", key)
                }
                (old, new) => prop_assert!(false, "{} went from {:?} to {:?}", key, old, new),
            }
        }
    }

    #[test]
    fn incremental_index_equals_full_translation(ops in proptest::collection::vec(op(), 1..24), options in options()) {
        let mut index = Index::new(options.clone());
        let mut model: BTreeMap<ObjectRef, SmiObject> = BTreeMap::new();
        for op in ops {
            let previous = index.desired().clone();
            let commands = match op {
                Op::Apply(object) => {
                    model.insert(object.object_ref(), (*object).clone());
                    index.apply(*object)
                }
                Op::Delete(object) => {
                    model.remove(&object);
                    index.delete(&object)
                }
                Op::Reset(objects) => {
                    model = objects.iter().map(|o| (o.object_ref(), o.clone())).collect();
                    index.reset(objects)
                }
            };
            // The commands of one change are exactly the diff it made, in diff order.
            prop_assert_eq!(&commands, &diff(&previous, index.desired()));
            assert_index_matches(&index, &model, &options);
        }
    }

    /// A reset to a snapshot close to the held one (the index replaces only what differs when
    /// few objects do, and rebuilds otherwise; few edits of up to 16 objects exercise both)
    /// ends exactly where loading the snapshot into a fresh index does, with or without
    /// commands.
    #[test]
    fn reset_to_an_edited_snapshot_equals_a_fresh_load(
        before in objects(),
        edits in proptest::collection::vec(snapshot_edit(), 0..4),
        shuffle in any::<bool>(),
        options in options(),
    ) {
        let mut after = edited(&before, &edits);
        if shuffle {
            // Order must not matter, except that a stale duplicate stays before the held one.
            after.sort_by_key(|o| {
                (o.object_ref(), o.meta().resource_version.as_deref() != Some("stale"))
            });
        }
        let mut index = Index::new(options.clone());
        index.reset(before.clone());
        let mut replaced = index.clone();
        replaced.replace(after.clone());
        let previous = index.desired().clone();
        let commands = index.reset(after.clone());

        let mut fresh = Index::new(options.clone());
        fresh.reset(after.clone());
        prop_assert_eq!(index.desired(), fresh.desired());
        prop_assert_eq!(&commands, &diff(&previous, fresh.desired()));
        let mut consul = previous;
        apply_commands(&mut consul, &commands);
        prop_assert_eq!(&consul, fresh.desired());
        let model: BTreeMap<ObjectRef, SmiObject> =
            after.iter().map(|o| (o.object_ref(), o.clone())).collect();
        assert_index_matches(&index, &model, &options);
        prop_assert_eq!(
            index.diagnostics().collect::<Vec<_>>(),
            fresh.diagnostics().collect::<Vec<_>>()
        );
        prop_assert_eq!(index.statuses().collect::<Vec<_>>(), fresh.statuses().collect::<Vec<_>>());
        for (object_ref, object) in &model {
            prop_assert_eq!(index.get(object_ref), Some(object));
        }
        prop_assert_eq!(replaced.desired(), fresh.desired());
        prop_assert_eq!(
            replaced.diagnostics().collect::<Vec<_>>(),
            fresh.diagnostics().collect::<Vec<_>>()
        );
        prop_assert!(index.reset(after).is_empty());
    }
}

#[test]
fn splitter_percentages_always_pass_consuls_sum_check() {
    // Every weight set the generators can make, plus a few awkward ones.
    let cases: Vec<Vec<u64>> = vec![
        vec![1, 1, 1],
        vec![1; 7],
        vec![u64::MAX, 1],
        vec![u64::MAX, u64::MAX, u64::MAX],
        vec![3, 3, 3, 1],
        vec![999, 1],
        vec![1, 99_999],
    ];
    for weights in cases {
        let backends: Vec<(String, u64)> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("v{i}"), *w))
            .collect();
        let refs: Vec<(&str, u64)> = backends.iter().map(|(s, w)| (s.as_str(), *w)).collect();
        let t = translate(
            &[split("default", "s", "web", &refs)],
            &TranslateOptions::default(),
        );
        let splitter = t.state.splitters.values().next().expect("a splitter");
        let scaled: i64 = splitter
            .splits
            .iter()
            .map(|s| (f64::from(s.weight) * 100.0).round() as i64)
            .sum();
        assert_eq!(scaled, 10_000, "{weights:?}");
    }
}
