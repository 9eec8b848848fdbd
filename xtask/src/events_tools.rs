//! Event tooling: `cargo xtask catalog` writes the AsyncAPI document generated from the payload
//! types; `cargo xtask kcat <args>` runs kcat against the local broker.
//!
//! Debian's kcat links librdkafka 2.0, which cannot talk to the tansu broker, so it runs with the
//! newer librdkafka that PyPI's `confluent-kafka` wheel ships, found through `LD_LIBRARY_PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::{prereqs, stack, workspace_root};

/// Where the catalog lives, relative to the workspace.
pub const CATALOG: &str = "libs/events/asyncapi.json";

/// Writes the catalog; says whether it changed.
pub fn write_catalog() -> Result<()> {
    let path = workspace_root().join(CATALOG);
    let document = serde_json::to_string_pretty(&events::catalog::asyncapi())? + "\n";
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, &document).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "xtask: {CATALOG} {}",
        if before == document {
            "unchanged"
        } else {
            "written"
        }
    );
    Ok(())
}

/// Runs kcat with `args`, e.g. `-C -b 127.0.0.1:9092 -t tasks.task.v1 -J`.
pub fn kcat(args: &[String]) -> Result<()> {
    let status = kcat_command(args)?.status().context("running kcat")?;
    ensure!(status.success(), "kcat exited with {status}");
    Ok(())
}

/// kcat with `args`, ready to run against tansu (installed when missing).
pub fn kcat_command(args: &[impl AsRef<std::ffi::OsStr>]) -> Result<Command> {
    prereqs::ensure_kcat()?;
    let mut command = Command::new("kcat");
    command.args(args).env("LD_LIBRARY_PATH", librdkafka_dir()?);
    Ok(command)
}

/// A folder holding `librdkafka.so.1` from the confluent-kafka wheel.
fn librdkafka_dir() -> Result<PathBuf> {
    let wheel_libs = prereqs::python_path(
        "import confluent_kafka, os; print(os.path.join(os.path.dirname(confluent_kafka.__file__), '..', 'confluent_kafka.libs'))",
    )?;
    let library = std::fs::read_dir(&wheel_libs)
        .with_context(|| format!("reading {}", wheel_libs.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("librdkafka"))
        });
    let Some(library) = library else {
        bail!("no librdkafka in {}", wheel_libs.display());
    };
    // The wheel's copy has a hashed name; kcat asks for librdkafka.so.1.
    let dir = stack::state_dir(&workspace_root()).join("kcat-lib");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join("librdkafka.so.1");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&library, &link)?;
    Ok(join_paths(&dir, &wheel_libs))
}

fn join_paths(first: &Path, second: &Path) -> PathBuf {
    PathBuf::from(format!("{}:{}", first.display(), second.display()))
}
