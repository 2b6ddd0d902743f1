//! The directory source under random partial writes: whatever prefix of a file a scan
//! catches, the objects it publishes never grant more than the union of the complete versions
//! written, as long as the writer pauses for less than the settle time; and once a version has
//! settled, it is exactly what is published.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use consul_smi_api::SmiObject;
use consul_smi_watcher::dir_source::DirState;
use consul_smi_watcher::store::Observed;
use proptest::prelude::*;

const SETTLE: Duration = Duration::from_secs(1);
const SOURCES: [&str; 3] = ["web", "prometheus", "batch"];
const MATCHES: [&str; 3] = ["metrics", "health", "admin"];

/// One TrafficTarget: its sources and the matches its single rule allows (indices).
#[derive(Clone, Debug)]
struct Target {
    sources: Vec<usize>,
    matches: Vec<usize>,
}

fn target() -> impl Strategy<Value = Target> {
    (
        proptest::sample::subsequence(vec![0, 1, 2], 1..=3),
        proptest::sample::subsequence(vec![0, 1, 2], 1..=3),
    )
        .prop_map(|(sources, matches)| Target { sources, matches })
}

/// A file of up to three targets in block style, so that cuts land inside lists and right
/// after `matches:` (which alone means every match). `serial` makes each version's length
/// unique, so no two versions share a stamp however fast they are written.
fn render(targets: &[Option<Target>], serial: usize) -> String {
    let mut text = String::new();
    for (i, target) in targets.iter().enumerate() {
        let Some(target) = target else { continue };
        text.push_str(&format!(
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata:\n  name: t{i}\n  namespace: default\nspec:\n  destination:\n    kind: ServiceAccount\n    name: api\n  sources:\n"
        ));
        for &s in &target.sources {
            text.push_str(&format!(
                "  - kind: ServiceAccount\n    name: {}\n",
                SOURCES[s]
            ));
        }
        text.push_str("  rules:\n  - kind: HTTPRouteGroup\n    name: api-routes\n    matches:\n");
        for &m in &target.matches {
            text.push_str(&format!("    - {}\n", MATCHES[m]));
        }
    }
    text.push_str(&format!("# version {}\n", "#".repeat(serial)));
    text
}

/// (target, source, match) triples an object set grants; `*` for "every match".
fn grants(objects: &[Observed]) -> BTreeSet<(String, String, String)> {
    let mut grants = BTreeSet::new();
    for object in objects {
        let Observed::Valid(SmiObject::TrafficTarget(t)) = object else {
            continue;
        };
        for source in &t.sources {
            for rule in &t.rules {
                let matches = rule.matches.clone().unwrap_or_else(|| vec!["*".into()]);
                for m in matches {
                    grants.insert((t.meta.name.clone(), source.name.clone(), m));
                }
            }
        }
    }
    grants
}

fn complete_grants(text: &str) -> BTreeSet<(String, String, String)> {
    let objects: Vec<Observed> = consul_smi_api::decode_manifests(text)
        .into_iter()
        .map(|o| Observed::Valid(o.unwrap()))
        .collect();
    grants(&objects)
}

/// One in-place save: the cut points (fractions of the text, in thousandths) at which the
/// writer pauses, and how many scans (each some time apart, less than the settle time in
/// total) catch each pause.
#[derive(Clone, Debug)]
struct Save {
    targets: Vec<Option<Target>>,
    cuts: Vec<u16>,
    scans: Vec<(u8, u16)>,
}

fn save() -> impl Strategy<Value = Save> {
    (
        proptest::collection::vec(proptest::option::of(target()), 3)
            .prop_filter("a file with no object is a broken edit", |t| {
                t.iter().any(Option::is_some)
            }),
        proptest::collection::vec(0u16..1000, 0..4),
        proptest::collection::vec((0u8..3, 0u16..300), 5),
    )
        .prop_map(|(targets, mut cuts, scans)| {
            cuts.sort();
            Save {
                targets,
                cuts,
                scans,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn partial_writes_never_grant_more_than_the_complete_versions(saves in proptest::collection::vec(save(), 1..5)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets.yaml");
        let mut state = DirState::new(dir.path().to_path_buf(), SETTLE);
        let mut now = Instant::now();
        let mut allowed = BTreeSet::new();

        for (serial, save) in saves.iter().enumerate() {
            let text = render(&save.targets, serial);
            let complete = complete_grants(&text);
            allowed.extend(complete.iter().cloned());

            let mut file = std::fs::File::create(&path).unwrap();
            let mut written = 0;
            let mut pauses = save.cuts.iter().map(|c| *c as usize * text.len() / 1000).chain([text.len()]);
            for (pause, &(scans, gap_ms)) in pauses.by_ref().zip(&save.scans) {
                // A pause of the writer: `scans` scans, together shorter than the settle time.
                file.write_all(&text.as_bytes()[written..pause]).unwrap();
                written = pause;
                for _ in 0..scans {
                    now += Duration::from_millis(gap_ms as u64);
                    state.rescan(now).unwrap();
                    let published = grants(&state.objects());
                    prop_assert!(
                        published.is_subset(&allowed),
                        "after {written} of {} bytes, published {:?} beyond {:?}",
                        text.len(), published.difference(&allowed).collect::<Vec<_>>(), allowed
                    );
                }
            }
            file.write_all(&text.as_bytes()[written..]).unwrap();
            drop(file);

            // Complete and left alone: it settles and is exactly what is published.
            for _ in 0..2 {
                now += SETTLE;
                state.rescan(now).unwrap();
            }
            prop_assert_eq!(grants(&state.objects()), complete);
        }
    }
}
