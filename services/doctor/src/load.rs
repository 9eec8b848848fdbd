//! Building an [`Inventory`]: from YAML/JSON files, or from a cluster's API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Node, Pod, PodTemplateSpec};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::Client;
use serde_json::Value;

use crate::{Inventory, Workload, WorkloadStatus};

/// Reads every `.yaml`, `.yml` and `.json` file under `dir` (recursively; multi-document YAML
/// and `kind: List` are fine). Kinds the doctor does not audit are counted and skipped; a known
/// kind that does not parse is an error naming the file.
pub fn manifests(dir: &Path) -> Result<Inventory> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    if files.is_empty() {
        bail!("no .yaml, .yml or .json files under {}", dir.display());
    }
    let mut inventory = Inventory {
        now: Some(Timestamp::now()),
        ..Inventory::default()
    };
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let documents: Vec<Value> = if file.extension().is_some_and(|e| e == "json") {
            vec![serde_json::from_str(&text).with_context(|| format!("{}", file.display()))?]
        } else {
            serde_saphyr::from_multiple(&text)
                .with_context(|| format!("parsing YAML in {}", file.display()))?
        };
        let source = file.display().to_string();
        for document in documents {
            add_object(&mut inventory, document, Some(&source))
                .with_context(|| format!("in {source}"))?;
        }
    }
    Ok(inventory)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_files(&path, files)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            files.push(path);
        }
    }
    Ok(())
}

/// Adds one object (or each item of a List) to the inventory.
pub fn add_object(inventory: &mut Inventory, object: Value, source: Option<&str>) -> Result<()> {
    if object.is_null() {
        return Ok(());
    }
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
    if kind.ends_with("List") {
        if let Some(items) = object["items"].as_array() {
            for item in items.clone() {
                add_object(inventory, item, source)?;
            }
            return Ok(());
        }
    }
    let parse = |what: &str| format!("{what} {}", object["metadata"]["name"]);
    match (api_version.as_str(), kind.as_str()) {
        ("apps/v1", "Deployment") => {
            let d: Deployment = serde_json::from_value(object.clone()).context(parse(&kind))?;
            let spec = d.spec.unwrap_or_default();
            let status = d.status.map(|s| WorkloadStatus {
                desired: s.replicas.unwrap_or(spec.replicas.unwrap_or(1)),
                ready: s.ready_replicas.unwrap_or(0),
                unavailable_since: s
                    .conditions
                    .iter()
                    .flatten()
                    .find(|c| c.type_ == "Available" && c.status == "False")
                    .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0)),
            });
            push(
                inventory,
                &kind,
                d.metadata,
                spec.template,
                spec.replicas,
                status,
                source,
            );
        }
        ("apps/v1", "StatefulSet") => {
            let s: StatefulSet = serde_json::from_value(object.clone()).context(parse(&kind))?;
            let spec = s.spec.unwrap_or_default();
            let status = s.status.map(|st| WorkloadStatus {
                desired: spec.replicas.unwrap_or(1),
                ready: st.ready_replicas.unwrap_or(0),
                unavailable_since: None,
            });
            push(
                inventory,
                &kind,
                s.metadata,
                spec.template,
                spec.replicas,
                status,
                source,
            );
        }
        ("apps/v1", "ReplicaSet") => {
            let r: ReplicaSet = serde_json::from_value(object.clone()).context(parse(&kind))?;
            // ReplicaSets owned by a Deployment are audited through the Deployment.
            if r.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| !o.is_empty())
            {
                inventory.other_objects += 1;
                return Ok(());
            }
            let spec = r.spec.unwrap_or_default();
            let template = spec.template.unwrap_or_default();
            push(
                inventory,
                &kind,
                r.metadata,
                template,
                spec.replicas,
                None,
                source,
            );
        }
        ("apps/v1", "DaemonSet") => {
            let d: DaemonSet = serde_json::from_value(object.clone()).context(parse(&kind))?;
            let spec = d.spec.unwrap_or_default();
            push(
                inventory,
                &kind,
                d.metadata,
                spec.template,
                None,
                None,
                source,
            );
        }
        ("batch/v1", "Job") => {
            let j: Job = serde_json::from_value(object.clone()).context(parse(&kind))?;
            if j.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| !o.is_empty())
            {
                inventory.other_objects += 1;
                return Ok(());
            }
            let spec = j.spec.unwrap_or_default();
            push(
                inventory,
                &kind,
                j.metadata,
                spec.template,
                None,
                None,
                source,
            );
        }
        ("batch/v1", "CronJob") => {
            let c: CronJob = serde_json::from_value(object.clone()).context(parse(&kind))?;
            let template = c
                .spec
                .and_then(|s| s.job_template.spec)
                .map(|s| s.template)
                .unwrap_or_default();
            push(inventory, &kind, c.metadata, template, None, None, source);
        }
        ("v1", "Pod") => {
            let p: Pod = serde_json::from_value(object.clone()).context(parse(&kind))?;
            // Pods owned by a controller are audited through it; bare pods on their own.
            if p.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| !o.is_empty())
            {
                inventory.pods.push(p);
                return Ok(());
            }
            let template = PodTemplateSpec {
                metadata: Some(p.metadata.clone()),
                spec: p.spec.clone(),
            };
            push(
                inventory,
                &kind,
                p.metadata.clone(),
                template,
                None,
                None,
                source,
            );
            inventory.pods.push(p);
        }
        ("policy/v1", "PodDisruptionBudget") => {
            let pdb: PodDisruptionBudget =
                serde_json::from_value(object.clone()).context(parse(&kind))?;
            inventory.pdbs.push((pdb, source.map(String::from)));
        }
        ("v1", "Node") => {
            let node: Node = serde_json::from_value(object.clone()).context(parse(&kind))?;
            inventory.nodes.push(node);
        }
        _ => inventory.other_objects += 1,
    }
    Ok(())
}

fn push(
    inventory: &mut Inventory,
    kind: &str,
    metadata: ObjectMeta,
    template: PodTemplateSpec,
    replicas: Option<i32>,
    status: Option<WorkloadStatus>,
    source: Option<&str>,
) {
    inventory.workloads.push(Workload {
        kind: kind.to_owned(),
        namespace: metadata.namespace.unwrap_or_else(|| "default".into()),
        name: metadata.name.unwrap_or_default(),
        labels: metadata.labels.unwrap_or_default(),
        template,
        replicas,
        status,
        created: metadata.creation_timestamp.map(|t| t.0),
        source: source.map(String::from),
    });
}

/// Which namespaces a cluster audit covers.
#[derive(Debug, Clone)]
pub enum Namespaces {
    /// Every namespace except Kubernetes' own (kube-system, kube-public, kube-node-lease).
    AllButSystem,
    Only(Vec<String>),
}

impl Namespaces {
    fn includes(&self, namespace: &str) -> bool {
        match self {
            Namespaces::AllButSystem => {
                !matches!(namespace, "kube-system" | "kube-public" | "kube-node-lease")
            }
            Namespaces::Only(list) => list.iter().any(|n| n == namespace),
        }
    }
}

/// Reads workloads, PDBs, pods and nodes through the API (list calls only, read-only).
pub async fn cluster(client: Client, namespaces: &Namespaces) -> Result<Inventory> {
    let mut inventory = Inventory {
        now: Some(Timestamp::now()),
        ..Inventory::default()
    };
    let mut objects: Vec<Value> = Vec::new();
    objects.extend(list_all::<Deployment>(&client, "apps/v1", "Deployment").await?);
    objects.extend(list_all::<StatefulSet>(&client, "apps/v1", "StatefulSet").await?);
    objects.extend(list_all::<DaemonSet>(&client, "apps/v1", "DaemonSet").await?);
    objects.extend(list_all::<CronJob>(&client, "batch/v1", "CronJob").await?);
    objects.extend(list_all::<Job>(&client, "batch/v1", "Job").await?);
    objects.extend(
        list_all::<PodDisruptionBudget>(&client, "policy/v1", "PodDisruptionBudget").await?,
    );
    objects.extend(list_all::<Pod>(&client, "v1", "Pod").await?);
    for object in objects {
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        if namespaces.includes(namespace) {
            add_object(&mut inventory, object, None)?;
        }
    }
    // Nodes are cluster-scoped: always read (placement of observability pods).
    for node in list_all::<Node>(&client, "v1", "Node").await? {
        add_object(&mut inventory, node, None)?;
    }
    Ok(inventory)
}

/// Lists every object of one kind in all namespaces, page by page, as JSON with its type meta.
async fn list_all<K>(client: &Client, api_version: &str, kind: &str) -> Result<Vec<Value>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    let mut params = ListParams::default().limit(500);
    let mut out = Vec::new();
    loop {
        let page = api
            .list(&params)
            .await
            .with_context(|| format!("listing {kind} objects"))?;
        for item in &page.items {
            let mut value = serde_json::to_value(item)?;
            value["apiVersion"] = Value::from(api_version);
            value["kind"] = Value::from(kind);
            out.push(value);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    Ok(out)
}

/// Counts of what an inventory holds, for the summary line.
pub fn describe(inventory: &Inventory) -> String {
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for workload in &inventory.workloads {
        *kinds.entry(workload.kind.as_str()).or_default() += 1;
    }
    let workloads: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    format!(
        "{} workloads ({}), {} PDBs, {} pods, {} nodes, {} other objects",
        inventory.workloads.len(),
        if workloads.is_empty() {
            "none".into()
        } else {
            workloads.join(", ")
        },
        inventory.pdbs.len(),
        inventory.pods.len(),
        inventory.nodes.len(),
        inventory.other_objects
    )
}
