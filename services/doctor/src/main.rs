//! `doctor`: audits rendered Kubernetes manifests or a live cluster for the deployment mistakes
//! that hurt at scale. Exit codes: 0 nothing found, 1 findings, 2 usage or input errors.
//!
//!   doctor manifests DIR [options]   every .yaml/.yml/.json under DIR (e.g. rendered charts)
//!   doctor cluster [options]         the current kubeconfig context (or in-cluster account)
//!
//! Options:
//!   --namespace NS                 cluster: only this namespace (repeatable; default: all but
//!                                  kube-system, kube-public, kube-node-lease)
//!   --node-class-label KEY         node label naming the pool class (node.taskstream.io/class)
//!   --burstable-value VALUE        its value on burstable nodes (burstable)
//!   --observability-namespace NS   namespaces holding observability (observability, monitoring)
//!   --stale-after-minutes N        zero ready replicas tolerated this long (15)

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use doctor::load::{self, Namespaces};
use doctor::{audit, Policy};
use k8s_openapi::jiff::SignedDuration;

const USAGE: &str = "usage: doctor manifests DIR [options] | doctor cluster [options] \
                     (options: --namespace NS, --node-class-label KEY, --burstable-value VALUE, \
                     --observability-namespace NS, --stale-after-minutes N)";

enum Mode {
    Manifests(PathBuf),
    Cluster(Namespaces),
}

fn parse(args: &[String]) -> Result<(Mode, Policy)> {
    let mut policy = Policy::default();
    let mut namespaces = Vec::new();
    let mut observability = Vec::new();
    let mut positional = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let mut value = || {
            iter.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--namespace" => namespaces.push(value()?),
            "--node-class-label" => policy.node_class_label = value()?,
            "--burstable-value" => policy.burstable_value = value()?,
            "--observability-namespace" => observability.push(value()?),
            "--stale-after-minutes" => {
                let minutes: i64 = value()?.parse().context("--stale-after-minutes")?;
                policy.stale_after = SignedDuration::from_mins(minutes);
            }
            flag if flag.starts_with("--") => bail!("unknown option {flag}"),
            _ => positional.push(arg.clone()),
        }
    }
    if !observability.is_empty() {
        policy.observability_namespaces = observability;
    }
    let mode = match positional.as_slice() {
        [mode, dir] if mode == "manifests" => Mode::Manifests(PathBuf::from(dir)),
        [mode] if mode == "cluster" => Mode::Cluster(if namespaces.is_empty() {
            Namespaces::AllButSystem
        } else {
            Namespaces::Only(namespaces)
        }),
        _ => bail!("{USAGE}"),
    };
    Ok((mode, policy))
}

async fn run(mode: Mode, policy: &Policy) -> Result<usize> {
    let (inventory, target) = match mode {
        Mode::Manifests(dir) => (load::manifests(&dir)?, dir.display().to_string()),
        Mode::Cluster(namespaces) => {
            let config = kube::Config::infer().await.context(
                "no usable kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster account",
            )?;
            let target = config.cluster_url.to_string();
            let client = kube::Client::try_from(config).context("building the API client")?;
            (load::cluster(client, &namespaces).await?, target)
        }
    };
    let findings = audit(&inventory, policy);
    for finding in &findings {
        println!("{finding}");
    }
    let objects: std::collections::BTreeSet<&str> =
        findings.iter().map(|f| f.object.as_str()).collect();
    println!(
        "doctor: {target}: {} finding(s) in {} object(s); audited {}",
        findings.len(),
        objects.len(),
        load::describe(&inventory)
    );
    Ok(findings.len())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, policy) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(err) => {
            eprintln!("doctor: {err:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("doctor: cannot start a runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(mode, &policy)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(err) => {
            eprintln!("doctor: {err:#}");
            ExitCode::from(2)
        }
    }
}
