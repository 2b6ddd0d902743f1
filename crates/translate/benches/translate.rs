//! Full build, snapshot reset and single-change times of the translation, on a synthetic mesh.
//!
//! `cargo bench -p consul-smi-translate` prints plain figures first (stderr, quotable), then
//! runs the criterion groups. Mesh: services spread over 20 namespaces, two TrafficTargets per
//! destination, two sources each, half TCPRoute and half HTTPRouteGroup rules (3 matches),
//! modern Consul, OSS namespaces (names are unique, so there is no collapse).
//!
//! `PLAIN_FIGURES=reset` (a comma-separated list of `full_build`, `reset`, `incremental`)
//! prints only those plain figures; `-- '^reset/'` runs only the reset benchmarks (a bare
//! `reset` filter also matches `full_build/index_reset`):
//! `PLAIN_FIGURES=reset cargo bench -p consul-smi-translate --bench translate -- '^reset/'`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use consul_smi_api::{
    HttpMatch, HttpRouteGroup, Meta, RuleKind, SmiObject, Subject, TcpRoute, TrafficTarget,
    TrafficTargetRule,
};
use consul_smi_translate::{ConsulApi, Index, TranslateOptions, translate};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const NAMESPACES: usize = 20;

fn options() -> TranslateOptions {
    TranslateOptions {
        target: ConsulApi::Modern,
        ..TranslateOptions::default()
    }
}

fn meta(namespace: String, name: String, api_version: &str) -> Meta {
    Meta {
        namespace,
        name,
        api_version: api_version.into(),
        ..Meta::default()
    }
}

fn namespace_of(service: usize) -> String {
    format!("ns{}", service % NAMESPACES)
}

fn account(service: usize) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: format!("svc-{service}"),
        namespace: Some(namespace_of(service)),
    }
}

/// TrafficTarget `i` of a mesh with `targets` TrafficTargets; `extra_source` varies it.
fn traffic_target(i: usize, targets: usize, extra_source: bool) -> SmiObject {
    let services = (targets / 2).max(1);
    let destination = i / 2;
    let mut sources = vec![
        account((i * 7 + 1) % services),
        account((i * 13 + 5) % services),
    ];
    if extra_source {
        sources.push(account((i * 17 + 3) % services));
    }
    let rule = if i.is_multiple_of(2) {
        TrafficTargetRule {
            kind: RuleKind::TCPRoute,
            name: "tcp".into(),
            matches: None,
        }
    } else {
        TrafficTargetRule {
            kind: RuleKind::HTTPRouteGroup,
            name: "http".into(),
            matches: Some(vec!["read".into(), "write".into()]),
        }
    };
    SmiObject::TrafficTarget(TrafficTarget {
        meta: meta(
            namespace_of(destination),
            format!("tt-{i}"),
            "access.smi-spec.io/v1alpha3",
        ),
        destination: account(destination),
        destination_port: None,
        sources,
        rules: vec![rule],
    })
}

fn mesh(targets: usize) -> Vec<SmiObject> {
    let mut objects = Vec::with_capacity(targets + 2 * NAMESPACES);
    for ns in 0..NAMESPACES {
        let namespace = format!("ns{ns}");
        objects.push(SmiObject::TcpRoute(TcpRoute {
            meta: meta(
                namespace.clone(),
                "tcp".into(),
                "specs.smi-spec.io/v1alpha4",
            ),
            matches: None,
        }));
        let m = |name: &str, methods: &[&str], path: &str| HttpMatch {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            path_regex: Some(path.into()),
            headers: Default::default(),
        };
        objects.push(SmiObject::HttpRouteGroup(HttpRouteGroup {
            meta: meta(namespace, "http".into(), "specs.smi-spec.io/v1alpha4"),
            matches: vec![
                m("read", &["GET", "HEAD"], "/api/.*"),
                m("write", &["POST", "PUT"], "/api/.*"),
                m("metrics", &["GET"], "/metrics"),
            ],
        }));
    }
    objects.extend((0..targets).map(|i| traffic_target(i, targets, false)));
    objects
}

/// Time this thread has spent on a CPU (Linux `schedstat`), so figures can be told apart from
/// waiting for a CPU on a machine shared with other work. `None` elsewhere.
fn on_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let nanos: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Wall and on-CPU time of `f`; dropping its result is not counted (a build's result is
/// kept, not thrown away).
fn timed<T>(f: impl FnOnce() -> T) -> (Duration, Duration) {
    let cpu_start = on_cpu();
    let start = Instant::now();
    let result = black_box(f());
    let wall = start.elapsed();
    let cpu = match (cpu_start, on_cpu()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall,
    };
    drop(result);
    (wall, cpu)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The snapshot-reset situations the translator meets: an index and the snapshot it is reset to.
/// * `from_empty`: start-up, the first snapshot;
/// * `unchanged`: a watch restart (RESUME_UNAVAILABLE) with nothing changed, the common case;
/// * `one_percent_changed`: a watch restart after 1% of the TrafficTargets changed (one more
///   source each, so their destinations' intentions change).
///
/// `replace_from_empty` is the start-up case through [`Index::replace`], which returns no
/// commands.
fn reset_cases(targets: usize) -> Vec<(&'static str, Index, Vec<SmiObject>)> {
    let options = options();
    let objects = mesh(targets);
    let mut loaded = Index::new(options.clone());
    loaded.reset(objects.clone());
    let mut changed = objects.clone();
    let routes = changed.len() - targets;
    for i in (0..targets).step_by(100) {
        changed[routes + i] = traffic_target(i, targets, true);
    }
    vec![
        ("from_empty", Index::new(options), objects.clone()),
        ("unchanged", loaded.clone(), objects),
        ("one_percent_changed", loaded, changed),
    ]
}

/// Whether the plain figures of `section` were asked for (all unless `PLAIN_FIGURES` lists some).
fn plain_section(section: &str) -> bool {
    match std::env::var("PLAIN_FIGURES") {
        Ok(list) => list.split(',').any(|s| s.trim() == section),
        Err(_) => true,
    }
}

/// Plain figures, measured with `Instant` so they can be quoted without criterion's output.
fn print_plain_figures() {
    let options = options();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    if plain_section("reset") {
        let targets = 10_000;
        let runs = 15;
        for (case, index, objects) in reset_cases(targets) {
            let mut commands = 0;
            let (wall, cpu): (Vec<_>, Vec<_>) = (0..runs)
                .map(|_| {
                    let mut index = index.clone();
                    let objects = objects.clone();
                    timed(|| {
                        let result = index.reset(objects);
                        commands = result.len();
                        result
                    })
                })
                .unzip();
            eprintln!(
                "plain: Index::reset() at {targets} TrafficTargets, {case:<19}: {:>8.2} ms \
                 (on-CPU {:>8.2} ms), {commands} commands; medians of {runs}",
                ms(median(wall)),
                ms(median(cpu)),
            );
        }
        let objects = mesh(targets);
        let (wall, cpu): (Vec<_>, Vec<_>) = (0..runs)
            .map(|_| {
                let mut index = Index::new(options.clone());
                let objects = objects.clone();
                timed(move || {
                    index.replace(objects);
                    index
                })
            })
            .unzip();
        eprintln!(
            "plain: Index::replace() at {targets} TrafficTargets, from_empty: {:>8.2} ms \
             (on-CPU {:>8.2} ms); medians of {runs}",
            ms(median(wall)),
            ms(median(cpu)),
        );
    }
    if !plain_section("full_build") {
        return print_incremental_figures();
    }
    for (targets, runs) in [(1_000, 15), (10_000, 9), (100_000, 3)] {
        let objects = mesh(targets);
        let (full_wall, full_cpu): (Vec<_>, Vec<_>) = (0..runs)
            .map(|_| timed(|| translate(black_box(&objects), &options)))
            .unzip();
        let (index_wall, index_cpu): (Vec<_>, Vec<_>) = (0..runs)
            .map(|_| {
                let objects = objects.clone();
                timed(|| {
                    let mut index = Index::new(options.clone());
                    index.reset(objects);
                    index
                })
            })
            .unzip();
        eprintln!(
            "plain: full build {targets:>6} TrafficTargets: translate() {:>8.2} ms (on-CPU {:>8.2} ms), \
             Index::reset() {:>8.2} ms (on-CPU {:>8.2} ms); medians of {runs}",
            ms(median(full_wall)),
            ms(median(full_cpu)),
            ms(median(index_wall)),
            ms(median(index_cpu)),
        );
    }
    print_incremental_figures();
}

fn print_incremental_figures() {
    if !plain_section("incremental") {
        return;
    }
    let options = options();
    let targets = 10_000;
    let mut index = Index::new(options.clone());
    index.reset(mesh(targets));
    let changes = 2_000;
    let mut samples = Vec::with_capacity(changes);
    for n in 0..changes {
        // Alternate between two versions of one TrafficTarget, so every apply is a real change.
        let object = traffic_target(4_321, targets, n.is_multiple_of(2));
        let start = Instant::now();
        let commands = index.apply(object);
        samples.push(start.elapsed());
        assert!(!commands.is_empty());
    }
    let mean = samples.iter().sum::<Duration>() / changes as u32;
    samples.sort();
    eprintln!(
        "plain: incremental single TrafficTarget update at {targets}: mean {:.1} µs, median {:.1} µs, p99 {:.1} µs ({changes} changes)",
        mean.as_secs_f64() * 1e6,
        samples[changes / 2].as_secs_f64() * 1e6,
        samples[changes * 99 / 100].as_secs_f64() * 1e6,
    );
}

fn benches(c: &mut Criterion) {
    // Not when profiling (`--profile-time`) or asked not to (SKIP_PLAIN_FIGURES=1, to run one
    // criterion benchmark quickly).
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--bench")
        && !args.iter().any(|a| a == "--profile-time")
        && std::env::var_os("SKIP_PLAIN_FIGURES").is_none()
    {
        print_plain_figures();
    }
    let options = options();

    let mut full = c.benchmark_group("full_build");
    full.sample_size(10);
    for targets in [1_000, 10_000, 100_000] {
        let objects = mesh(targets);
        full.bench_function(format!("translate/{targets}"), |b| {
            b.iter_with_large_drop(|| translate(black_box(&objects), &options))
        });
        full.bench_function(format!("index_reset/{targets}"), |b| {
            b.iter_batched(
                || objects.clone(),
                |objects| {
                    let mut index = Index::new(options.clone());
                    index.reset(objects);
                    index
                },
                BatchSize::LargeInput,
            )
        });
    }
    full.finish();

    // The index is dropped outside the measurement (the translator keeps it); dropping the
    // replaced state inside `reset` is measured.
    let mut reset = c.benchmark_group("reset");
    reset.sample_size(10);
    for (case, index, objects) in reset_cases(10_000) {
        reset.bench_function(format!("{case}/10000"), |b| {
            b.iter_batched(
                || (index.clone(), objects.clone()),
                |(mut index, objects)| {
                    let commands = index.reset(objects);
                    (index, commands)
                },
                BatchSize::LargeInput,
            )
        });
    }
    let objects = mesh(10_000);
    reset.bench_function("replace_from_empty/10000", |b| {
        b.iter_batched(
            || objects.clone(),
            |objects| {
                let mut index = Index::new(options.clone());
                index.replace(objects);
                index
            },
            BatchSize::LargeInput,
        )
    });
    reset.finish();

    let targets = 10_000;
    let mut index = Index::new(options.clone());
    index.reset(mesh(targets));
    let versions = [
        traffic_target(4_321, targets, true),
        traffic_target(4_321, targets, false),
    ];
    let mut n = 0usize;
    c.bench_function("incremental/traffic_target_update/10000", |b| {
        b.iter(|| {
            n += 1;
            index.apply(versions[n % 2].clone())
        })
    });
}

criterion_group!(translate_benches, benches);
criterion_main!(translate_benches);
