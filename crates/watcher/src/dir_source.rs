//! The directory source: a directory (recursively) of multi-document YAML manifests, for
//! running without a cluster (the demo, GitOps with Consul outside Kubernetes).
//!
//! It polls file metadata (default every 500 ms) rather than using inotify: one `stat` per
//! file per tick is negligible, works the same on every platform and on network or
//! bind-mounted volumes (where inotify misses changes, e.g. Kubernetes ConfigMap volumes swap
//! a symlink), and needs no extra dependency.
//!
//! After each change the complete set of objects replaces the store, so an object removed
//! from the files (or a removed file) becomes a `Deleted`.
//!
//! The directory is input from whoever can write it, possibly mid-edit, so (see the README's
//! "The directory source's rules"):
//! - A file is read only once it is stable: its identity, size, mtime and ctime unchanged for
//!   the settle time (`--dir-settle-ms`), and unchanged while it is read. A half-written file
//!   whose prefix happens to parse (a rule cut after `matches:` grants every match) is never
//!   used as long as the writer does not pause for longer than the settle time.
//! - A broken edit keeps the file's last valid version: YAML that does not parse, a document
//!   that cannot be attributed to an object (a `kind` typo, a lost `metadata.name`), a file
//!   emptied or grown past [`MAX_MANIFEST_BYTES`]. To remove a file's objects, delete it.
//! - Only regular files are read (FIFOs, devices and sockets are reported, never opened; the
//!   open is non-blocking anyway), symlinks are followed only when they resolve inside the
//!   directory, each directory is scanned once (symlink loops), and the scan is bounded in
//!   depth and entries.
//! - A subdirectory that cannot be read is reported by name; the files under it keep their
//!   last version and the rest of the tree keeps flowing.
//! - Each problem is logged once per change, not once per tick.
//!
//! Scans run on their own thread: a scan stuck in the kernel (a hung network mount) makes the
//! watcher not ready and is logged, and never holds up shutdown.

use std::collections::{BTreeMap, HashSet};
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use consul_smi_api::{DecodeErrorKind, ObjectRef, SmiKind};
use tracing::{info, warn};

use crate::shared::SharedStore;
use crate::store::{Observed, Scope};

/// Largest manifest file read. SMI objects are small; this bounds the memory a stray file
/// (a disk image, a log) can take.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// Directory levels below the top directory that are scanned.
pub const MAX_DEPTH: usize = 32;
/// Directory entries one scan looks at; a larger tree is not a manifest directory, and the
/// scan fails (keeping the last state) instead of taking unbounded time and memory.
pub const MAX_ENTRIES: usize = 200_000;
/// A scan running longer than this is reported and makes the watcher not ready.
const SCAN_STUCK_AFTER: Duration = Duration::from_secs(10);

/// How the directory is read.
#[derive(Clone, Copy, Debug)]
pub struct DirOptions {
    /// How often the directory is scanned.
    pub interval: Duration,
    /// How long a changed file must stay unchanged before it is read.
    pub settle: Duration,
}

/// Runs until aborted.
pub async fn run(dir: PathBuf, shared: Arc<SharedStore>, options: DirOptions) {
    let state = Arc::new(Mutex::new(DirState::new(dir.clone(), options.settle)));
    let mut failing = false;
    loop {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let scanning = state.clone();
        // A thread of its own, not `spawn_blocking`: the runtime waits for blocking tasks when
        // it shuts down, so a scan stuck in the kernel would keep the process from exiting.
        let spawned = std::thread::Builder::new()
            .name("dir-scan".into())
            .spawn(move || {
                let result = lock(&scanning).rescan(Instant::now());
                let _ = tx.send(result);
            });
        let result = match spawned {
            Err(e) => Err(std::io::Error::other(format!(
                "cannot start a scan thread: {e}"
            ))),
            Ok(_) => match tokio::time::timeout(SCAN_STUCK_AFTER, &mut rx).await {
                Ok(done) => done.unwrap_or_else(|_| Err(scan_panicked())),
                Err(_) => {
                    warn!(dir = %dir.display(), after = ?SCAN_STUCK_AFTER, "directory scan has not finished; not ready until it does");
                    shared.set_source_healthy(false);
                    rx.await.unwrap_or_else(|_| Err(scan_panicked()))
                }
            },
        };
        match result {
            Ok(scan) => {
                if failing {
                    info!(dir = %dir.display(), "manifest directory readable again");
                    failing = false;
                }
                // The initial state is complete once every file has been read (or found
                // broken) at least once.
                let initial = !scan.settling && !shared.is_ready();
                if scan.changed || initial {
                    shared.replace(Scope::All, lock(&state).objects());
                }
                if initial {
                    shared.set_ready();
                }
                shared.set_source_healthy(true);
            }
            Err(e) => {
                // Without the directory there is no complete state: keep what we have (or stay
                // not-ready) rather than announce that every object was deleted.
                if !failing {
                    warn!(dir = %dir.display(), error = %e, "cannot read manifest directory; keeping the last state, not ready, retrying");
                    failing = true;
                }
                shared.set_source_healthy(false);
            }
        }
        tokio::time::sleep(options.interval).await;
    }
}

fn scan_panicked() -> std::io::Error {
    std::io::Error::other("the directory scan panicked")
}

fn lock(state: &Mutex<DirState>) -> MutexGuard<'_, DirState> {
    // Each file's state is replaced in one step, so a scan that panicked left every file at
    // a version it had read.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What identifies one version of a file without reading it. The ctime and inode catch
/// replacements that keep size and mtime (`cp -p`, `rsync -a`, `tar x`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(metadata: &Metadata) -> Stamp {
        Stamp {
            dev: metadata.dev(),
            ino: metadata.ino(),
            len: metadata.len(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

#[derive(Default)]
struct FileState {
    /// The version last read (used, or found broken); `None` before the first read.
    read: Option<Stamp>,
    /// A different version, and when it was first seen: read once it has settled.
    pending: Option<(Stamp, Instant)>,
    /// Hash of the content the objects come from, `None` while the file is broken: a new
    /// stamp with the same bytes (`touch`, `cp -p` of the same file) changes nothing.
    content: Option<u64>,
    /// The file's last valid version.
    objects: Vec<Observed>,
    /// Why the current version is not used, if it is not.
    problem: Option<String>,
}

/// The outcome of one scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Some file's objects were added, changed or removed.
    pub changed: bool,
    /// Some file has a version that has not settled yet and was never read before.
    pub settling: bool,
}

/// The files of one manifest directory and the last valid objects of each.
pub struct DirState {
    root: PathBuf,
    settle: Duration,
    files: BTreeMap<PathBuf, FileState>,
    /// Problems found by the last walk (special files, symlinks, unreadable directories).
    walk_problems: BTreeMap<PathBuf, String>,
}

impl DirState {
    pub fn new(root: PathBuf, settle: Duration) -> DirState {
        DirState {
            root,
            settle,
            files: BTreeMap::new(),
            walk_problems: BTreeMap::new(),
        }
    }

    /// Re-reads the files that changed and have settled by `now`. `Err` when the directory
    /// itself cannot be read (or is too large): nothing changes then.
    pub fn rescan(&mut self, now: Instant) -> std::io::Result<Scan> {
        let walk = Walk::run(&self.root)?;
        let mut scan = Scan::default();

        let listed: HashSet<&Path> = walk.files.iter().map(|(p, _)| p.as_path()).collect();
        let before = self.files.len();
        // Files under a directory that could not be read are not gone: they keep their
        // objects until the directory can be read again.
        self.files.retain(|path, _| {
            listed.contains(path.as_path()) || walk.unreadable.iter().any(|d| path.starts_with(d))
        });
        scan.changed |= self.files.len() != before;

        for (path, metadata) in &walk.files {
            let stamp = Stamp::of(metadata);
            // Looked up before inserting: cloning every path on every poll is most of an idle
            // poll's cost in a large tree.
            if !self.files.contains_key(path) {
                self.files.insert(path.clone(), FileState::default());
            }
            let file = self.files.get_mut(path).expect("just inserted");
            if file.read == Some(stamp) {
                file.pending = None;
                continue;
            }
            let settled = match file.pending {
                Some((pending, since)) if pending == stamp => {
                    now.saturating_duration_since(since) >= self.settle
                }
                _ => {
                    file.pending = Some((stamp, now));
                    self.settle.is_zero()
                }
            };
            if !settled {
                scan.settling |= file.read.is_none();
                continue;
            }
            match read_stable(path, stamp) {
                Fetched::Content(bytes) => {
                    file.pending = None;
                    file.read = Some(stamp);
                    scan.changed |= file.update(path, &bytes);
                }
                Fetched::Changed(current) => {
                    // Written to while being read: wait for it to settle again.
                    file.pending = Some((current, now));
                    scan.settling |= file.read.is_none();
                }
                Fetched::Gone => file.pending = None,
                Fetched::Refused(problem) => {
                    file.pending = None;
                    file.read = Some(stamp);
                    file.keep_last_valid(path, problem);
                }
            }
        }

        for (path, problem) in &walk.problems {
            if self.walk_problems.get(path) != Some(problem) {
                warn!(path = %path.display(), %problem, "manifest directory entry not used");
            }
        }
        self.walk_problems = walk.problems;
        Ok(scan)
    }

    /// Every object, the first definition winning when two files define the same one.
    pub fn objects(&self) -> Vec<Observed> {
        let mut seen: BTreeMap<ObjectRef, &Path> = BTreeMap::new();
        let mut objects = Vec::new();
        for (path, file) in &self.files {
            for object in &file.objects {
                let reference = object.object_ref();
                if let Some(first) = seen.get(&reference) {
                    warn!(object = %reference, file = %path.display(), first = %first.display(), "object defined twice; the first definition wins");
                    continue;
                }
                seen.insert(reference, path);
                objects.push(object.clone());
            }
        }
        objects
    }

    /// Every path currently not used as it is, with the reason.
    pub fn problems(&self) -> Vec<(PathBuf, String)> {
        let files = self
            .files
            .iter()
            .filter_map(|(path, file)| Some((path.clone(), file.problem.clone()?)));
        let mut problems: Vec<_> = self
            .walk_problems
            .clone()
            .into_iter()
            .chain(files)
            .collect();
        problems.sort();
        problems
    }
}

impl FileState {
    /// Uses `bytes` as the file's new version unless it is broken. `true` when its objects
    /// changed.
    fn update(&mut self, path: &Path, bytes: &[u8]) -> bool {
        let hash = content_hash(bytes);
        if self.content == Some(hash) {
            // The bytes its objects come from (`touch`, or unreadable for a while).
            self.usable_again(path);
            return false;
        }
        let parsed = std::str::from_utf8(bytes)
            .map_err(|e| format!("not UTF-8 text: {e}"))
            .and_then(parse_manifest);
        match parsed {
            Ok(objects) => {
                info!(file = %path.display(), objects = objects.len(), "read manifest");
                self.usable_again(path);
                self.content = Some(hash);
                let changed = self.objects != objects;
                self.objects = objects;
                changed
            }
            Err(problem) => {
                self.content = None;
                self.keep_last_valid(path, problem);
                false
            }
        }
    }

    fn usable_again(&mut self, path: &Path) {
        if self.problem.take().is_some() {
            info!(file = %path.display(), "manifest usable again");
        }
    }

    fn keep_last_valid(&mut self, path: &Path, problem: String) {
        if self.problem.as_ref() != Some(&problem) {
            warn!(file = %path.display(), %problem, objects = self.objects.len(), "manifest not used; keeping its last valid version");
        }
        self.problem = Some(problem);
    }
}

fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the hash only compares versions of one file within this process.
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

enum Fetched {
    Content(Vec<u8>),
    /// The file changed since `stamp` (before or while it was read): its current stamp.
    Changed(Stamp),
    Gone,
    /// Not readable as a manifest (too large, not a regular file, permission denied).
    Refused(String),
}

/// Reads the file if it is still the version `stamp` describes, before and after the read.
fn read_stable(path: &Path, stamp: Stamp) -> Fetched {
    if stamp.len > MAX_MANIFEST_BYTES {
        return Fetched::Refused(format!(
            "larger than the {MAX_MANIFEST_BYTES}-byte limit ({} bytes)",
            stamp.len
        ));
    }
    // Non-blocking: a FIFO swapped in after the walk checked the type must not hang the scan.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let mut file = match file {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Fetched::Gone,
        Err(e) => return Fetched::Refused(format!("cannot open: {e}")),
    };
    let opened = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Fetched::Refused(format!("cannot stat: {e}")),
    };
    if !opened.is_file() {
        return Fetched::Refused("not a regular file".into());
    }
    if Stamp::of(&opened) != stamp {
        return Fetched::Changed(Stamp::of(&opened));
    }
    let mut bytes = Vec::with_capacity(stamp.len as usize);
    if let Err(e) = (&mut file)
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
    {
        return Fetched::Refused(format!("cannot read: {e}"));
    }
    match file.metadata() {
        Ok(after) if Stamp::of(&after) == stamp && bytes.len() as u64 == stamp.len => {
            Fetched::Content(bytes)
        }
        Ok(after) => Fetched::Changed(Stamp::of(&after)),
        Err(e) => Fetched::Refused(format!("cannot stat: {e}")),
    }
}

/// One walk of the directory tree: the manifest files and what was refused.
#[derive(Default)]
struct Walk {
    /// Regular manifest files (after following symlinks) with their metadata.
    files: Vec<(PathBuf, Metadata)>,
    /// Directories below the top that could not be read.
    unreadable: Vec<PathBuf>,
    problems: BTreeMap<PathBuf, String>,
    /// (device, inode) of every directory scanned: each is scanned once, which ends symlink
    /// loops and keeps a directory linked twice from being read twice.
    visited: HashSet<(u64, u64)>,
    entries: usize,
}

impl Walk {
    fn run(dir: &Path) -> std::io::Result<Walk> {
        // Symlinks must resolve inside the directory as it is now (the top may itself be a
        // symlink, as a ConfigMap volume's files are).
        let root = std::fs::canonicalize(dir)?;
        let metadata = std::fs::metadata(&root)?;
        let mut walk = Walk::default();
        walk.visited.insert((metadata.dev(), metadata.ino()));
        walk.scan(&root, dir, 0)?;
        Ok(walk)
    }

    fn scan(&mut self, root: &Path, dir: &Path, depth: usize) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if depth == 0 => return Err(e),
            Err(e) => {
                self.unreadable(dir, e);
                return Ok(());
            }
        };
        let mut listed = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => listed.push(entry),
                Err(e) if depth == 0 => return Err(e),
                Err(e) => {
                    self.unreadable(dir, e);
                    return Ok(());
                }
            }
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(std::io::Error::other(format!(
                    "more than {MAX_ENTRIES} entries; not scanned"
                )));
            }
        }
        // In name order, so that a directory reachable twice (through a symlink) is always
        // read under the same path: a path that flips between scans would briefly revoke.
        listed.sort_by_key(|entry| entry.file_name());
        for entry in listed {
            let path = entry.path();
            // Hidden entries: editors' swap files, `.git`, and the `..data` symlink farm of
            // Kubernetes ConfigMap volumes (whose files are also visible under their own names).
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let is_manifest = is_manifest_name(&path);
            // A file deleted mid-scan is skipped, not a failed scan.
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let metadata = if file_type.is_symlink() {
                match std::fs::canonicalize(&path) {
                    Ok(target) if target.starts_with(root) => {}
                    Ok(target) => {
                        if is_manifest || target.is_dir() {
                            self.problem(
                                &path,
                                format!(
                                    "symlink to {} outside the directory; refused",
                                    target.display()
                                ),
                            );
                        }
                        continue;
                    }
                    // Dangling (e.g. mid-swap) or a loop of symlinks.
                    Err(_) => continue,
                }
                std::fs::metadata(&path)
            } else {
                entry.metadata()
            };
            let Ok(metadata) = metadata else {
                continue;
            };
            if metadata.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    self.problem(
                        &path,
                        format!("deeper than {MAX_DEPTH} levels; not scanned"),
                    );
                } else if self.visited.insert((metadata.dev(), metadata.ino())) {
                    self.scan(root, &path, depth + 1)?;
                }
            } else if is_manifest {
                if metadata.is_file() {
                    self.files.push((path, metadata));
                } else {
                    self.problem(
                        &path,
                        "not a regular file (a FIFO, device or socket); not read".into(),
                    );
                }
            }
        }
        Ok(())
    }

    fn unreadable(&mut self, dir: &Path, error: std::io::Error) {
        self.problem(
            dir,
            format!("cannot read directory: {error}; its files keep their last version"),
        );
        self.unreadable.push(dir.to_path_buf());
    }

    fn problem(&mut self, path: &Path, problem: String) {
        self.problems.insert(path.to_path_buf(), problem);
    }
}

/// `*.yaml`, `*.yml` and `*.json`, in any letter case.
fn is_manifest_name(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["yaml", "yml", "json"]
            .iter()
            .any(|m| e.eq_ignore_ascii_case(m))
    })
}

/// SMI objects of one manifest file; documents that are not SMI are skipped. `Err` when the
/// file cannot be used as a whole: it is not YAML, holds no document, or has a document that
/// looks like SMI but names no object (then which object it was meant to be is unknown, and
/// dropping the file's objects would revoke them because of a typo).
fn parse_manifest(text: &str) -> Result<Vec<Observed>, String> {
    let mut objects = Vec::new();
    let mut documents = 0;
    for result in consul_smi_api::decode_manifests(text) {
        documents += 1;
        let e = match result {
            Ok(object) => {
                objects.push(Observed::Valid(object));
                continue;
            }
            Err(e) => e,
        };
        let kind = e.kind.as_deref().and_then(SmiKind::from_kind);
        match (e.error_kind, kind, &e.name) {
            (DecodeErrorKind::Syntax, _, _) => return Err(e.to_string()),
            // Another API's object (a ConfigMap next to the SMI objects).
            (DecodeErrorKind::NotSmi, None, _) if e.api_version.is_some() => {}
            (DecodeErrorKind::NotSmi, _, _) => {
                return Err(format!(
                    "{e} (the document has an SMI kind or no apiVersion)"
                ));
            }
            (_, Some(kind), Some(name)) => objects.push(Observed::Invalid {
                object: ObjectRef::new(
                    kind,
                    e.namespace.clone().unwrap_or_else(|| "default".to_string()),
                    name.clone(),
                ),
                api_version: e.api_version.clone().unwrap_or_default(),
                reason: e.to_string(),
            }),
            _ => return Err(format!("a document names no SMI object: {e}")),
        }
    }
    if documents == 0 {
        return Err("no documents (to remove a file's objects, delete the file)".into());
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn target(name: &str) -> String {
        format!(
            "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: {name}}}\nspec:\n  destination: {{kind: ServiceAccount, name: api}}\n  sources: [{{kind: ServiceAccount, name: web}}]\n  rules: [{{kind: TCPRoute, name: db}}]\n"
        )
    }

    fn names(state: &DirState) -> Vec<String> {
        state
            .objects()
            .iter()
            .map(|o| o.object_ref().name)
            .collect()
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Runs `f` on a thread whose file accesses are checked as user `nobody`: the tests run as
    /// root, which permission bits do not stop. (The filesystem uid, and the capabilities it
    /// drops, are per thread on Linux.)
    fn as_nobody<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                unsafe { libc::setfsuid(65534) };
                f()
            })
            .join()
            .unwrap()
        })
    }

    #[test]
    fn an_unreadable_subdirectory_is_named_and_the_rest_keeps_flowing() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let sub = dir.path().join("team-b");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(dir.path().join("a.yaml"), target("a")).unwrap();
        std::fs::write(dir.path().join("c.yaml"), target("c")).unwrap();
        std::fs::write(sub.join("b.yaml"), target("b")).unwrap();
        let mut state = DirState::new(dir.path().to_path_buf(), Duration::ZERO);
        let now = Instant::now();
        as_nobody(|| state.rescan(now)).unwrap();
        assert_eq!(names(&state), ["a", "c", "b"]);

        chmod(&sub, 0o000);
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        let scan = as_nobody(|| state.rescan(now)).unwrap();
        chmod(&sub, 0o755);
        // The revocation is published; team-b's objects stay as they were.
        assert!(scan.changed);
        assert_eq!(names(&state), ["c", "b"]);
        let problems = state.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].0, sub);
        assert!(problems[0].1.contains("Permission denied"), "{problems:?}");

        // Readable again: its files are read as usual, and the problem is gone.
        std::fs::remove_file(sub.join("b.yaml")).unwrap();
        assert!(as_nobody(|| state.rescan(now)).unwrap().changed);
        assert_eq!(names(&state), ["c"]);
        assert!(state.problems().is_empty());
    }

    #[test]
    fn an_unreadable_file_keeps_its_objects_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, target("a")).unwrap();
        let mut state = DirState::new(dir.path().to_path_buf(), Duration::ZERO);
        let now = Instant::now();
        as_nobody(|| state.rescan(now)).unwrap();
        std::fs::write(&file, target("a2")).unwrap();
        chmod(&file, 0o000);
        assert!(!as_nobody(|| state.rescan(now)).unwrap().changed);
        assert_eq!(names(&state), ["a"]);
        assert!(state.problems()[0].1.contains("cannot open"));
        // Readable again with the bytes already used: nothing changes, nothing is reported.
        std::fs::write(&file, target("a")).unwrap();
        chmod(&file, 0o644);
        assert!(!as_nobody(|| state.rescan(now)).unwrap().changed);
        assert_eq!(names(&state), ["a"]);
        assert!(state.problems().is_empty(), "{:?}", state.problems());
    }

    #[test]
    fn a_changed_file_is_read_once_it_has_settled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, target("a")).unwrap();
        let settle = Duration::from_secs(1);
        let mut state = DirState::new(dir.path().to_path_buf(), settle);
        let start = Instant::now();
        let scan = state.rescan(start).unwrap();
        assert!(scan.settling && !scan.changed);
        assert!(state.rescan(start + settle / 2).unwrap().settling);
        assert!(state.objects().is_empty());
        let scan = state.rescan(start + settle).unwrap();
        assert_eq!(
            scan,
            Scan {
                changed: true,
                settling: false
            }
        );
        assert_eq!(names(&state), ["a"]);
    }

    #[test]
    fn special_huge_and_outside_files_are_reported_by_path_and_not_read() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("zero.yaml")).unwrap();
        let fifo = std::ffi::CString::new(dir.path().join("pipe.yml").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        // Sparse: 5 GB that take no disk space.
        std::fs::File::create(dir.path().join("huge.JSON"))
            .unwrap()
            .set_len(5 << 30)
            .unwrap();
        std::fs::write(dir.path().join("a.yaml"), target("a")).unwrap();
        let mut state = DirState::new(dir.path().to_path_buf(), Duration::ZERO);
        let scan = state.rescan(Instant::now()).unwrap();
        assert!(scan.changed && !scan.settling);
        assert_eq!(names(&state), ["a"]);
        let problems: Vec<(String, String)> = state
            .problems()
            .into_iter()
            .map(|(path, problem)| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (
                    name,
                    problem.split(' ').take(3).collect::<Vec<_>>().join(" "),
                )
            })
            .collect();
        assert_eq!(
            problems,
            [
                ("huge.JSON".to_string(), "larger than the".to_string()),
                ("pipe.yml".to_string(), "not a regular".to_string()),
                ("zero.yaml".to_string(), "symlink to /dev/zero".to_string()),
            ]
        );
    }

    /// Counts WARN events on the current thread while `f` runs.
    fn warnings_during(f: impl FnOnce()) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tracing_subscriber::layer::SubscriberExt;

        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(
                &self,
                event: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                if *event.metadata().level() == tracing::Level::WARN {
                    self.0.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let count = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry().with(Count(count.clone()));
        tracing::subscriber::with_default(subscriber, f);
        count.load(Ordering::Relaxed)
    }

    #[test]
    fn each_problem_is_logged_once_per_change_not_every_poll() {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let unreadable = dir.path().join("unreadable.yaml");
        std::fs::write(&unreadable, target("u")).unwrap();
        chmod(&unreadable, 0o000);
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, "kind: [\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("outside.yaml")).unwrap();
        let mut state = DirState::new(dir.path().to_path_buf(), Duration::ZERO);
        let now = Instant::now();
        let polls = |state: &mut DirState| {
            as_nobody(|| {
                warnings_during(|| {
                    for _ in 0..5 {
                        state.rescan(now).unwrap();
                    }
                })
            })
        };
        // At most once per problem over five polls (every poll warned before). An upper
        // bound only: tracing's per-callsite interest cache, shared with tests running in
        // parallel, can hide an event from this thread's counting subscriber.
        assert!(polls(&mut state) <= 3);
        assert_eq!(state.problems().len(), 3);
        std::fs::write(&broken, "apiVersion: {\n").unwrap();
        assert!(polls(&mut state) <= 1);
        assert_eq!(state.problems().len(), 3);
    }

    #[test]
    fn a_configmap_volume_is_followed_through_its_symlink_swap() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2026_01")).unwrap();
        std::fs::write(root.join("..2026_01/a.yaml"), target("a")).unwrap();
        symlink("..2026_01", root.join("..data")).unwrap();
        symlink("..data/a.yaml", root.join("a.yaml")).unwrap();
        let mut state = DirState::new(root.to_path_buf(), Duration::ZERO);
        state.rescan(Instant::now()).unwrap();
        assert_eq!(names(&state), ["a"]);
        assert!(state.problems().is_empty(), "{:?}", state.problems());

        // The kubelet's update: a new timestamped directory, then `..data` renamed over.
        std::fs::create_dir(root.join("..2026_02")).unwrap();
        std::fs::write(root.join("..2026_02/a.yaml"), target("b")).unwrap();
        symlink("..2026_02", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        assert!(state.rescan(Instant::now()).unwrap().changed);
        assert_eq!(names(&state), ["b"]);
    }

    #[test]
    fn too_many_levels_and_non_manifest_entries_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for _ in 0..=MAX_DEPTH {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("a.yaml"), target("a")).unwrap();
        let mut state = DirState::new(dir.path().to_path_buf(), Duration::ZERO);
        state.rescan(Instant::now()).unwrap();
        assert!(state.objects().is_empty());
        assert!(state.problems()[0].1.contains("deeper than"));
    }
}
