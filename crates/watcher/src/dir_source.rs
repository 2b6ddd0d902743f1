//! The directory source: a directory (recursively) of multi-document YAML manifests, for
//! running without a cluster (the demo, GitOps with Consul outside Kubernetes).
//!
//! It polls file sizes and modification times (default every 500 ms) rather than using
//! inotify: a handful of `stat` calls per tick is negligible, works the same on every
//! platform and on network or bind-mounted volumes (where inotify misses changes, e.g.
//! Kubernetes ConfigMap volumes swap a symlink), and needs no extra dependency.
//!
//! After each change the complete set of objects replaces the store, so an object removed
//! from the files (or a removed file) becomes a `Deleted`. A file that does not parse as YAML
//! keeps its previous objects: an editor or `git checkout` writing it half-way must not delete
//! everything it defined.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use consul_smi_api::{DecodeErrorKind, ObjectRef, SmiKind};
use tracing::{info, warn};

use crate::shared::SharedStore;
use crate::store::{Observed, Scope};

/// Runs until aborted.
pub async fn run(dir: PathBuf, shared: Arc<SharedStore>, interval: Duration) {
    let mut state = DirState::default();
    let mut announced_missing = false;
    loop {
        let scan_dir = dir.clone();
        let previous = std::mem::take(&mut state);
        let scanned = tokio::task::spawn_blocking(move || {
            let mut state = previous;
            let result = state.rescan(&scan_dir);
            (state, result)
        })
        .await;
        match scanned {
            Ok((new_state, Ok(changed))) => {
                state = new_state;
                announced_missing = false;
                if changed || !shared.is_ready() {
                    shared.replace(Scope::All, state.objects());
                    shared.set_ready();
                }
            }
            Ok((new_state, Err(e))) => {
                state = new_state;
                // Without the directory there is no complete state: keep what we have (or stay
                // not-ready) rather than announce that every object was deleted.
                if !announced_missing {
                    warn!(dir = %dir.display(), error = %e, "cannot read manifest directory; keeping the last state and retrying");
                    announced_missing = true;
                }
            }
            Err(e) => warn!(error = %e, "directory scan task failed"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[derive(Default)]
struct FileState {
    modified: Option<SystemTime>,
    len: u64,
    objects: Vec<Observed>,
}

#[derive(Default)]
pub(crate) struct DirState {
    files: BTreeMap<PathBuf, FileState>,
}

impl DirState {
    /// Re-reads changed files. `Ok(true)` when any file was added, changed or removed.
    pub(crate) fn rescan(&mut self, dir: &Path) -> std::io::Result<bool> {
        let mut paths = Vec::new();
        collect_manifests(dir, &mut paths)?;
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| paths.contains(path));
        if self.files.len() != before {
            changed = true;
        }
        for path in paths {
            let Ok(metadata) = std::fs::metadata(&path) else {
                continue;
            };
            let modified = metadata.modified().ok();
            let len = metadata.len();
            if let Some(known) = self.files.get(&path)
                && known.modified == modified
                && known.len == len
            {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot read manifest; keeping its previous objects");
                    continue;
                }
            };
            match parse_manifest(&path, &text) {
                Ok(objects) => {
                    info!(file = %path.display(), objects = objects.len(), "read manifest");
                    self.files.insert(
                        path,
                        FileState {
                            modified,
                            len,
                            objects,
                        },
                    );
                    changed = true;
                }
                Err(reason) => {
                    warn!(file = %path.display(), %reason, "manifest does not parse; keeping its previous objects");
                    // Remember the stamp so the broken file is not re-parsed every tick; its
                    // previous objects stay.
                    let objects = self
                        .files
                        .remove(&path)
                        .map(|f| f.objects)
                        .unwrap_or_default();
                    self.files.insert(
                        path,
                        FileState {
                            modified,
                            len,
                            objects,
                        },
                    );
                }
            }
        }
        Ok(changed)
    }

    /// Every object, the first definition winning when two files define the same one.
    pub(crate) fn objects(&self) -> Vec<Observed> {
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
}

fn collect_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        // Hidden entries: editors' swap files, `.git`, and the `..data` symlink farm of
        // Kubernetes ConfigMap volumes (whose files are also visible under their own names).
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        // A dangling symlink or a file deleted mid-scan is skipped, not a failed scan.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        let file_type = metadata.file_type();
        if file_type.is_dir() {
            collect_manifests(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

/// SMI objects of one manifest file; documents that are not SMI are skipped. `Err` when the
/// file is not readable YAML at all.
fn parse_manifest(path: &Path, text: &str) -> Result<Vec<Observed>, String> {
    let mut objects = Vec::new();
    for result in consul_smi_api::decode_manifests(text) {
        match result {
            Ok(object) => objects.push(Observed::Valid(object)),
            Err(e) if e.error_kind == DecodeErrorKind::Syntax => return Err(e.to_string()),
            Err(e) if e.error_kind == DecodeErrorKind::NotSmi => {}
            Err(e) => {
                let kind = e.kind.as_deref().and_then(SmiKind::from_kind);
                match (kind, &e.name) {
                    (Some(kind), Some(name)) => objects.push(Observed::Invalid {
                        object: ObjectRef::new(
                            kind,
                            e.namespace.clone().unwrap_or_else(|| "default".to_string()),
                            name.clone(),
                        ),
                        api_version: e.api_version.clone().unwrap_or_default(),
                        reason: e.to_string(),
                    }),
                    // Without a kind and name there is no object to report against.
                    _ => warn!(file = %path.display(), error = %e, "skipping undecodable document"),
                }
            }
        }
    }
    Ok(objects)
}
