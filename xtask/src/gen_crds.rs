//! `cargo xtask gen-crds [--check]`: writes every generated schema file
//! (`consul_smi_api::crd::generated_files`), or verifies that the committed ones are current and
//! prints a unified diff when they are not.

use std::path::{Path, PathBuf};

use anyhow::Context;
use consul_smi_api::crd::{GENERATED_DIRS, generated_files};

#[derive(clap::Args)]
pub struct Args {
    /// Do not write; exit non-zero with a diff if a committed file differs from what would be generated.
    #[arg(long)]
    check: bool,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = workspace_root();
    let files = generated_files()
        .map_err(anyhow::Error::msg)
        .context("generating CRDs")?;
    // Files in generated directories that are not generated any more are stale too.
    let mut stale = Vec::new();
    for dir in GENERATED_DIRS {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let relative = format!("{dir}/{}", entry?.file_name().to_string_lossy());
            if !files.contains_key(&relative) {
                stale.push(relative);
            }
        }
    }

    if args.check {
        let mut problems = 0;
        for (path, wanted) in &files {
            let current = std::fs::read_to_string(root.join(path)).unwrap_or_default();
            if &current != wanted {
                problems += 1;
                let diff = similar::TextDiff::from_lines(&current, wanted);
                print!(
                    "{}",
                    diff.unified_diff()
                        .context_radius(3)
                        .header(&format!("a/{path}"), &format!("b/{path}"))
                );
            }
        }
        for path in &stale {
            problems += 1;
            println!("stale generated file (no longer generated): {path}");
        }
        if problems > 0 {
            // A plain message and exit code: an error return would append a backtrace to the
            // diff when RUST_BACKTRACE is set (as in CI).
            eprintln!(
                "gen-crds --check: {problems} generated file(s) out of date: run `cargo xtask gen-crds` and commit the result"
            );
            std::process::exit(1);
        }
        println!("gen-crds: {} files up to date", files.len());
        return Ok(());
    }

    for (path, contents) in &files {
        let full = root.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        if std::fs::read_to_string(&full).ok().as_deref() != Some(contents) {
            std::fs::write(&full, contents)
                .with_context(|| format!("writing {}", full.display()))?;
            println!("wrote {path}");
        }
    }
    for path in &stale {
        std::fs::remove_file(root.join(path)).with_context(|| format!("removing {path}"))?;
        println!("removed {path}");
    }
    Ok(())
}
