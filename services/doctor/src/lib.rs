//! The doctor: audits Kubernetes workloads for the deployment mistakes that hurt at scale.
//!
//! Both modes build the same [`Inventory`] — from rendered YAML ([`load::manifests`]) or from a
//! live cluster ([`load::cluster`]) — and [`audit`] turns it into [`Finding`]s. Each finding names
//! the object (and container) and says how to fix it.

pub mod load;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, Node, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// What kind of mistake a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FindingKind {
    /// A container without CPU/memory requests or limits.
    MissingResources,
    /// A CPU limit that CFS will throttle: below one core, or below the threads it runs.
    CpuThrottling,
    /// An observability workload that can be scheduled onto (or runs on) a burstable node.
    ObservabilityOnBurstable,
    /// A long-running container without a liveness or readiness probe.
    MissingProbe,
    /// A Deployment/StatefulSet without a PodDisruptionBudget, or with one that blocks drains.
    MissingPdb,
    /// An image with the `latest` tag or no tag at all.
    MutableImage,
    /// A workload that wants replicas but has had none ready for long.
    StaleWorkload,
}

impl FindingKind {
    pub const ALL: [FindingKind; 7] = [
        FindingKind::MissingResources,
        FindingKind::CpuThrottling,
        FindingKind::ObservabilityOnBurstable,
        FindingKind::MissingProbe,
        FindingKind::MissingPdb,
        FindingKind::MutableImage,
        FindingKind::StaleWorkload,
    ];

    /// Short stable name, printed in brackets.
    pub fn code(self) -> &'static str {
        match self {
            FindingKind::MissingResources => "resources",
            FindingKind::CpuThrottling => "cpu-throttling",
            FindingKind::ObservabilityOnBurstable => "observability-placement",
            FindingKind::MissingProbe => "probes",
            FindingKind::MissingPdb => "pdb",
            FindingKind::MutableImage => "image-tag",
            FindingKind::StaleWorkload => "stale-workload",
        }
    }
}

/// One problem with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// `Kind namespace/name`.
    pub object: String,
    pub container: Option<String>,
    /// Where the object came from (a file in manifests mode).
    pub source: Option<String>,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.kind.code(), self.object)?;
        if let Some(container) = &self.container {
            write!(f, " container {container}")?;
        }
        write!(f, ": {}. Fix: {}.", self.problem, self.fix)?;
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        Ok(())
    }
}

/// What the rules consider normal; the CLI can change each.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Node label that names the node pool class.
    pub node_class_label: String,
    /// Its value on burstable nodes.
    pub burstable_value: String,
    /// Namespaces whose workloads are observability (besides `app.kubernetes.io/part-of:
    /// observability` on the object).
    pub observability_namespaces: Vec<String>,
    /// How long zero ready replicas is tolerated (rollouts and restarts take a while).
    pub stale_after: SignedDuration,
    /// Environment variables that set how many threads run in parallel.
    pub thread_variables: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            node_class_label: "node.taskstream.io/class".into(),
            burstable_value: "burstable".into(),
            observability_namespaces: vec!["observability".into(), "monitoring".into()],
            stale_after: SignedDuration::from_mins(15),
            thread_variables: [
                "HTTP_WORKERS",
                "AUTH_PASSWORD_WORKERS",
                "AUTH_SIGNUP_PASSWORD_WORKERS",
                "TOKIO_WORKER_THREADS",
                "GOMAXPROCS",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// A pod-owning object, reduced to what the rules look at.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Deployment, StatefulSet, DaemonSet, Job, CronJob, ReplicaSet or Pod.
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub template: PodTemplateSpec,
    /// Desired replicas, where the kind has them (None: unset, i.e. 1, or HPA-managed).
    pub replicas: Option<i32>,
    /// From `status`, when the object has one (cluster mode, or dumped manifests).
    pub status: Option<WorkloadStatus>,
    pub created: Option<Timestamp>,
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct WorkloadStatus {
    pub desired: i32,
    pub ready: i32,
    /// When the `Available` condition last became False (Deployments).
    pub unavailable_since: Option<Timestamp>,
}

impl Workload {
    pub fn object(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    fn spec(&self) -> Option<&PodSpec> {
        self.template.spec.as_ref()
    }

    fn template_labels(&self) -> BTreeMap<String, String> {
        self.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default()
    }

    /// Runs until stopped (so it needs probes), as opposed to run-to-completion Jobs.
    fn long_running(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Pod"
        )
    }

    /// Scaled by replicas and drained node by node (so it needs a PDB).
    fn replicated(&self) -> bool {
        matches!(self.kind.as_str(), "Deployment" | "StatefulSet")
    }
}

/// Everything the rules need.
#[derive(Debug, Default)]
pub struct Inventory {
    pub workloads: Vec<Workload>,
    pub pdbs: Vec<(PodDisruptionBudget, Option<String>)>,
    /// Running pods and nodes (cluster mode): where observability pods actually landed.
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    /// Objects of kinds the doctor does not audit (Services, ConfigMaps, custom resources...).
    pub other_objects: usize,
    /// The time "for long" is measured against.
    pub now: Option<Timestamp>,
}

/// Runs every rule over the inventory. Findings come out grouped by object, in input order.
pub fn audit(inventory: &Inventory, policy: &Policy) -> Vec<Finding> {
    let mut findings = Vec::new();
    for workload in &inventory.workloads {
        let Some(spec) = workload.spec() else {
            continue;
        };
        let containers = spec.containers.iter().map(|c| (c, false));
        let init = spec.init_containers.iter().flatten().map(|c| (c, true));
        for (container, is_init) in containers.chain(init) {
            check_resources(workload, container, policy, &mut findings);
            check_image(workload, container, &mut findings);
            if workload.long_running() && !is_init {
                check_probes(workload, container, &mut findings);
            }
        }
        check_observability_placement(workload, spec, policy, &mut findings);
        if workload.replicated() {
            check_pdb(workload, &inventory.pdbs, &mut findings);
        }
        if let (Some(status), Some(now)) = (&workload.status, inventory.now) {
            check_stale(workload, status, now, policy, &mut findings);
        }
    }
    check_observability_pods_on_burstable(inventory, policy, &mut findings);
    findings
}

fn finding(
    workload: &Workload,
    container: Option<&Container>,
    kind: FindingKind,
    problem: String,
    fix: String,
) -> Finding {
    Finding {
        kind,
        object: workload.object(),
        container: container.map(|c| c.name.clone()),
        source: workload.source.clone(),
        problem,
        fix,
    }
}

fn check_resources(
    workload: &Workload,
    container: &Container,
    policy: &Policy,
    findings: &mut Vec<Finding>,
) {
    let resources = container.resources.clone().unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    let mut missing = Vec::new();
    for (map, which) in [(&requests, "requests"), (&limits, "limits")] {
        for resource in ["cpu", "memory"] {
            if !map.contains_key(resource) {
                missing.push(format!("{which}.{resource}"));
            }
        }
    }
    if !missing.is_empty() {
        findings.push(finding(
            workload,
            Some(container),
            FindingKind::MissingResources,
            format!("no {}", missing.join(", ")),
            "set CPU and memory requests (what it needs at usual load; the scheduler reserves them) \
             and limits (memory limit = request; CPU limit at least one core and 2-4x the request)"
                .into(),
        ));
    }
    let Some(limit) = limits.get("cpu").and_then(|q| cpu_millis(&q.0)) else {
        return;
    };
    if limit < 1000.0 {
        findings.push(finding(
            workload,
            Some(container),
            FindingKind::CpuThrottling,
            format!(
                "CPU limit {} is below one core: CFS grants it {:.0} ms per 100 ms period, so any \
                 burst on several threads is stopped for the rest of the period",
                limits["cpu"].0,
                limit / 10.0
            ),
            "raise the CPU limit to at least 1 core (keep the request as it is)".into(),
        ));
        return;
    }
    let threads: f64 = container
        .env
        .iter()
        .flatten()
        .filter(|var| policy.thread_variables.contains(&var.name))
        .filter_map(|var| var.value.as_deref()?.trim().parse::<f64>().ok())
        .sum();
    if threads * 1000.0 > limit {
        findings.push(finding(
            workload,
            Some(container),
            FindingKind::CpuThrottling,
            format!(
                "runs {threads} busy threads ({}) under a CPU limit of {} cores: together they use \
                 up the quota early in every period and then all stall",
                policy.thread_variables.join("/"),
                limit / 1000.0
            ),
            format!("raise the CPU limit to at least {threads} cores, or run fewer threads"),
        ));
    }
}

/// CPU quantity in millicores (`500m`, `2`, `1.5`); None if unparsable.
pub fn cpu_millis(quantity: &str) -> Option<f64> {
    let quantity = quantity.trim();
    match quantity.strip_suffix('m') {
        Some(millis) => millis.parse().ok(),
        None => quantity.parse::<f64>().ok().map(|cores| cores * 1000.0),
    }
}

fn check_image(workload: &Workload, container: &Container, findings: &mut Vec<Finding>) {
    let image = container.image.clone().unwrap_or_default();
    let problem = match image_tag(&image) {
        ImageTag::Digest => return,
        ImageTag::Tag(tag) if tag != "latest" => return,
        ImageTag::Tag(_) => format!("image {image} uses the `latest` tag"),
        ImageTag::None if image.is_empty() => "no image".to_string(),
        ImageTag::None => format!("image {image} has no tag (means `latest`)"),
    };
    findings.push(finding(
        workload,
        Some(container),
        FindingKind::MutableImage,
        format!("{problem}: every node may run a different build and a rollback restores nothing"),
        "pin an immutable release tag (or a digest) and change it to deploy".into(),
    ));
}

enum ImageTag<'a> {
    Digest,
    Tag(&'a str),
    None,
}

fn image_tag(image: &str) -> ImageTag<'_> {
    if image.contains('@') {
        return ImageTag::Digest;
    }
    // A colon after the last slash separates the tag (one before it is a registry port).
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, tag)) if !tag.is_empty() => ImageTag::Tag(tag),
        _ => ImageTag::None,
    }
}

fn check_probes(workload: &Workload, container: &Container, findings: &mut Vec<Finding>) {
    let mut missing = Vec::new();
    if container.readiness_probe.is_none() {
        missing.push("readinessProbe");
    }
    if container.liveness_probe.is_none() {
        missing.push("livenessProbe");
    }
    if missing.is_empty() {
        return;
    }
    findings.push(finding(
        workload,
        Some(container),
        FindingKind::MissingProbe,
        format!(
            "no {}: traffic reaches it before it can serve and a hung process is never restarted",
            missing.join(" and ")
        ),
        "add a readinessProbe (ready to serve: e.g. /readyz) and a livenessProbe that checks only \
         the process itself (e.g. /healthz)"
            .into(),
    ));
}

fn is_observability(workload: &Workload, policy: &Policy) -> bool {
    let part_of = |labels: &BTreeMap<String, String>| {
        labels
            .get("app.kubernetes.io/part-of")
            .is_some_and(|v| v == "observability" || v == "monitoring")
    };
    policy
        .observability_namespaces
        .contains(&workload.namespace)
        || part_of(&workload.labels)
        || part_of(&workload.template_labels())
}

fn check_observability_placement(
    workload: &Workload,
    spec: &PodSpec,
    policy: &Policy,
    findings: &mut Vec<Finding>,
) {
    // Node agents (DaemonSets) must run on every node by design; they are exempt.
    if workload.kind == "DaemonSet" || !is_observability(workload, policy) {
        return;
    }
    if excludes_burstable(spec, policy) {
        return;
    }
    findings.push(finding(
        workload,
        None,
        FindingKind::ObservabilityOnBurstable,
        format!(
            "observability workload can be scheduled on burstable nodes ({}={}): when the app \
             exhausts their CPU credits, monitoring goes blind exactly when it is needed",
            policy.node_class_label, policy.burstable_value
        ),
        format!(
            "add required node affinity (requiredDuringSchedulingIgnoredDuringExecution) with {} \
             In [<non-burstable class>] or NotIn [{}] in every nodeSelectorTerm",
            policy.node_class_label, policy.burstable_value
        ),
    ));
}

/// True when the pod cannot land on a burstable node: its nodeSelector pins another class, or
/// every required node-affinity term excludes the burstable class.
fn excludes_burstable(spec: &PodSpec, policy: &Policy) -> bool {
    let key = &policy.node_class_label;
    let burstable = &policy.burstable_value;
    if let Some(value) = spec.node_selector.as_ref().and_then(|s| s.get(key)) {
        if value != burstable {
            return true;
        }
    }
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .unwrap_or_default();
    !terms.is_empty()
        && terms.iter().all(|term| {
            term.match_expressions.iter().flatten().any(|expr| {
                let values = expr.values.clone().unwrap_or_default();
                expr.key == *key
                    && match expr.operator.as_str() {
                        "In" => !values.contains(burstable),
                        "NotIn" => values.contains(burstable),
                        "DoesNotExist" => true,
                        _ => false,
                    }
            })
        })
}

fn check_observability_pods_on_burstable(
    inventory: &Inventory,
    policy: &Policy,
    findings: &mut Vec<Finding>,
) {
    let burstable_nodes: Vec<&str> = inventory
        .nodes
        .iter()
        .filter(|node| {
            node.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(&policy.node_class_label))
                .is_some_and(|v| *v == policy.burstable_value)
        })
        .filter_map(|node| node.metadata.name.as_deref())
        .collect();
    for pod in &inventory.pods {
        let meta = &pod.metadata;
        let namespace = meta.namespace.clone().unwrap_or_default();
        let owned_by_daemonset = meta
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "DaemonSet");
        let labels = meta.labels.clone().unwrap_or_default();
        let observability = policy.observability_namespaces.contains(&namespace)
            || labels
                .get("app.kubernetes.io/part-of")
                .is_some_and(|v| v == "observability" || v == "monitoring");
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if observability && !owned_by_daemonset {
            if let Some(node) = node.filter(|n| burstable_nodes.contains(n)) {
                findings.push(Finding {
                    kind: FindingKind::ObservabilityOnBurstable,
                    object: format!("Pod {namespace}/{}", meta.name.clone().unwrap_or_default()),
                    container: None,
                    source: None,
                    problem: format!("observability pod runs on burstable node {node}"),
                    fix: format!(
                        "give its workload required node affinity away from {}={}, then delete \
                         the pod so it is rescheduled",
                        policy.node_class_label, policy.burstable_value
                    ),
                });
            }
        }
    }
}

fn check_pdb(
    workload: &Workload,
    pdbs: &[(PodDisruptionBudget, Option<String>)],
    findings: &mut Vec<Finding>,
) {
    let labels = workload.template_labels();
    let matching: Vec<&PodDisruptionBudget> = pdbs
        .iter()
        .map(|(pdb, _)| pdb)
        .filter(|pdb| pdb.metadata.namespace.clone().unwrap_or_default() == workload.namespace)
        .filter(|pdb| {
            pdb.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|selector| selector_matches(selector, &labels))
        })
        .collect();
    if matching.is_empty() {
        findings.push(finding(
            workload,
            None,
            FindingKind::MissingPdb,
            "no PodDisruptionBudget selects its pods: a node drain or cluster upgrade may evict \
             all of them at once"
                .into(),
            "add a PodDisruptionBudget with maxUnavailable: 1 selecting the pod template's labels"
                .into(),
        ));
        return;
    }
    for pdb in matching {
        let Some(spec) = &pdb.spec else { continue };
        let zero = |v: &IntOrString| match v {
            IntOrString::Int(n) => *n == 0,
            IntOrString::String(s) => s.trim() == "0" || s.trim() == "0%",
        };
        let blocks_all = spec.max_unavailable.as_ref().is_some_and(zero)
            || spec.min_available.as_ref().is_some_and(|v| match v {
                IntOrString::String(s) => s.trim() == "100%",
                IntOrString::Int(n) => workload.replicas.is_some_and(|r| *n >= r),
            });
        if blocks_all {
            findings.push(finding(
                workload,
                None,
                FindingKind::MissingPdb,
                format!(
                    "PodDisruptionBudget {} allows no voluntary disruption: node drains and \
                     upgrades hang on these pods",
                    pdb.metadata.name.clone().unwrap_or_default()
                ),
                "use maxUnavailable: 1 (or a minAvailable below the replica count)".into(),
            ));
        }
    }
}

/// Kubernetes label selector semantics (matchLabels AND every matchExpression).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let match_labels = selector.match_labels.clone().unwrap_or_default();
    let expressions = selector.match_expressions.clone().unwrap_or_default();
    if match_labels.is_empty() && expressions.is_empty() {
        return true;
    }
    match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && expressions.iter().all(|expr| {
            let values = expr.values.clone().unwrap_or_default();
            let value = labels.get(&expr.key);
            match expr.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

fn check_stale(
    workload: &Workload,
    status: &WorkloadStatus,
    now: Timestamp,
    policy: &Policy,
    findings: &mut Vec<Finding>,
) {
    if status.desired == 0 || status.ready > 0 {
        return;
    }
    let since = status.unavailable_since.or(workload.created);
    let Some(since) = since else { return };
    let down_for = now.duration_since(since);
    if down_for < policy.stale_after {
        return;
    }
    findings.push(finding(
        workload,
        None,
        FindingKind::StaleWorkload,
        format!(
            "0 of {} replicas ready for {} (since {since})",
            status.desired,
            human_duration(down_for)
        ),
        "look at its pods' events and logs (image pull, crash loop, failing readiness, \
         unschedulable); fix or scale it to 0 if it is retired"
            .into(),
    ));
}

fn human_duration(duration: SignedDuration) -> String {
    let minutes = duration.as_secs() / 60;
    match minutes {
        m if m >= 2 * 24 * 60 => format!("{} days", m / (24 * 60)),
        m if m >= 120 => format!("{} hours", m / 60),
        m => format!("{m} min"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_quantities() {
        assert_eq!(cpu_millis("500m"), Some(500.0));
        assert_eq!(cpu_millis("2"), Some(2000.0));
        assert_eq!(cpu_millis("1.5"), Some(1500.0));
        assert_eq!(cpu_millis("lots"), None);
    }

    #[test]
    fn reads_image_tags() {
        assert!(matches!(image_tag("nginx"), ImageTag::None));
        assert!(matches!(
            image_tag("registry:5000/team/app"),
            ImageTag::None
        ));
        assert!(matches!(image_tag("app:latest"), ImageTag::Tag("latest")));
        assert!(matches!(
            image_tag("registry:5000/app:1.2.3"),
            ImageTag::Tag("1.2.3")
        ));
        assert!(matches!(image_tag("app@sha256:abcd"), ImageTag::Digest));
    }

    #[test]
    fn selector_semantics() {
        let labels: BTreeMap<String, String> =
            [("app".to_string(), "a".to_string())].into_iter().collect();
        let selector: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "a"},
            "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]
        }))
        .unwrap();
        assert!(selector_matches(&selector, &labels));
        let other: LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"app": "b"}})).unwrap();
        assert!(!selector_matches(&other, &labels));
    }
}
