//! The directory source's costs, which must grow linearly: parsing one file of N documents,
//! and scanning a directory of N files (an idle poll, and a poll where one file changed).
//! Prints figures, asserts nothing: `cargo bench -p consul-smi-watcher --bench dir_source`.

use std::path::Path;
use std::time::{Duration, Instant};

use consul_smi_watcher::dir_source::DirState;

fn route(i: usize) -> String {
    format!("apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: r{i}}}\n")
}

/// Reads `dir` the way the watcher does at start-up (no settle time: every file at once).
fn read_all(dir: &Path) -> (DirState, Duration) {
    let mut state = DirState::new(dir.to_path_buf(), Duration::ZERO);
    let start = Instant::now();
    state.rescan(Instant::now()).unwrap();
    (state, start.elapsed())
}

/// `document(i)` is the i-th document; `smi` whether it is an SMI object.
fn documents_in_one_file(n: usize, smi: bool) {
    let dir = tempfile::tempdir().unwrap();
    let document = |i| if smi { route(i) } else { format!("a: {i}\n") };
    let text: String = (0..n).map(|i| format!("---\n{}", document(i))).collect();
    std::fs::write(dir.path().join("routes.yaml"), &text).unwrap();
    let (state, took) = read_all(dir.path());
    assert_eq!(state.objects().len(), if smi { n } else { 0 });
    let what = if smi { "TCPRoutes" } else { "tiny documents" };
    println!(
        "one file, {n:>6} {what:<14} ({:>4} KB): read and parsed in {:>8.1} ms ({:.2} µs/document)",
        text.len() / 1024,
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / n as f64
    );
}

fn files_in_one_directory(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        std::fs::write(dir.path().join(format!("r{i}.yaml")), route(i)).unwrap();
    }
    let (mut state, first) = read_all(dir.path());
    assert_eq!(state.objects().len(), n);
    let start = Instant::now();
    let idle = state.rescan(Instant::now()).unwrap();
    let idle_took = start.elapsed();
    assert!(!idle.changed);
    std::fs::write(dir.path().join("r0.yaml"), route(n)).unwrap();
    let start = Instant::now();
    let changed = state.rescan(Instant::now()).unwrap();
    let objects = state.objects();
    let changed_took = start.elapsed();
    assert!(changed.changed && objects.len() == n);
    println!(
        "{n:>6} files: first read {:>8.1} ms; idle poll {:>7.1} ms ({:.2} µs/file); poll with one change + listing {:>7.1} ms",
        first.as_secs_f64() * 1e3,
        idle_took.as_secs_f64() * 1e3,
        idle_took.as_secs_f64() * 1e6 / n as f64,
        changed_took.as_secs_f64() * 1e3
    );
}

fn main() {
    for smi in [false, true] {
        for n in [10_000, 20_000, 40_000] {
            documents_in_one_file(n, smi);
        }
    }
    for n in [5_000, 10_000, 20_000] {
        files_in_one_directory(n);
    }
}
