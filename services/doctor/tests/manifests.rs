//! `doctor manifests`: every finding kind is reported on manifests that contain it, nothing is
//! reported on manifests that do everything right, and the CLI's exit code says which.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use doctor::{audit, load, FindingKind, Policy};

fn fixtures(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn findings(dir: &str) -> BTreeSet<(&'static str, String)> {
    let inventory = load::manifests(&fixtures(dir)).expect("fixtures load");
    audit(&inventory, &Policy::default())
        .into_iter()
        .map(|f| {
            let object = match f.container {
                Some(container) => format!("{} [{container}]", f.object),
                None => f.object,
            };
            (f.kind.code(), object)
        })
        .collect()
}

#[test]
fn every_bad_manifest_is_reported_with_the_right_kind() {
    let expected: BTreeSet<(&str, String)> = [
        ("resources", "Deployment shop/no-resources [app]"),
        ("resources", "Deployment shop/init-no-limits [wait]"),
        ("cpu-throttling", "Deployment shop/sub-core-limit [app]"),
        ("cpu-throttling", "Deployment shop/threads-over-limit [app]"),
        (
            "observability-placement",
            "Deployment observability/grafana",
        ),
        ("observability-placement", "Deployment observability/loki"),
        ("observability-placement", "Deployment tracing/tempo"),
        ("probes", "Deployment shop/no-probes [app]"),
        ("probes", "Deployment shop/no-readiness [app]"),
        ("pdb", "Deployment shop/no-pdb"),
        ("pdb", "Deployment shop/blocked-drain"),
        ("image-tag", "Deployment shop/latest-image [app]"),
        ("image-tag", "Job shop/untagged [run]"),
        ("stale-workload", "Deployment shop/never-ready"),
    ]
    .into_iter()
    .map(|(kind, object)| (kind, object.to_string()))
    .collect();
    let found = findings("bad");
    assert_eq!(
        found,
        expected,
        "\nmissing: {:#?}\nunexpected: {:#?}",
        expected.difference(&found).collect::<Vec<_>>(),
        found.difference(&expected).collect::<Vec<_>>()
    );
    // Every kind the doctor knows is covered by these fixtures.
    let kinds: BTreeSet<&str> = found.iter().map(|(kind, _)| *kind).collect();
    for kind in FindingKind::ALL {
        assert!(
            kinds.contains(kind.code()),
            "no fixture for {}",
            kind.code()
        );
    }
}

#[test]
fn clean_manifests_have_no_findings() {
    assert_eq!(findings("good"), BTreeSet::new());
}

#[test]
fn each_finding_names_the_object_the_file_and_the_fix() {
    let inventory = load::manifests(&fixtures("bad")).unwrap();
    for finding in audit(&inventory, &Policy::default()) {
        let line = finding.to_string();
        assert!(
            line.starts_with(&format!("[{}] ", finding.kind.code())),
            "{line}"
        );
        assert!(line.contains(&finding.object), "{line}");
        assert!(line.contains(". Fix: ") && finding.fix.len() > 20, "{line}");
        assert!(line.contains("tests/fixtures/bad/"), "{line}");
    }
}

#[test]
fn cli_exit_codes() {
    let doctor = env!("CARGO_BIN_EXE_doctor");
    let bad = Command::new(doctor)
        .arg("manifests")
        .arg(fixtures("bad"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("doctor: ") && stdout.contains("14 finding(s) in 14 object(s)"),
        "{stdout}"
    );

    let good = Command::new(doctor)
        .arg("manifests")
        .arg(fixtures("good"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert_eq!(good.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("0 finding(s)"), "{stdout}");

    let missing = Command::new(doctor)
        .args(["manifests", "/nonexistent/doctor-input"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let usage = Command::new(doctor).arg("bogus").output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[test]
fn a_broken_manifest_of_a_known_kind_is_an_error_not_a_pass() {
    let dir = std::env::temp_dir().join(format!("doctor-broken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: many}\n",
    )
    .unwrap();
    let error = load::manifests(&dir).unwrap_err();
    assert!(format!("{error:#}").contains("broken.yaml"), "{error:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}
