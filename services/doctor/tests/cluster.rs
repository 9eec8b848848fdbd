//! `doctor cluster` against a stand-in Kubernetes API server: a real HTTP server on loopback that
//! answers the list calls with recorded API JSON (tests/fixtures/cluster/<api path>.json), and a
//! kubeconfig whose current context points at it. No cluster, no database stack.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cluster")
}

/// The stand-in API server: serves `GET <path>` from `<root><path>.json`, 404 (as a Kubernetes
/// Status) otherwise, over HTTP/1.1 keep-alive. Records every request line it answers.
struct StandIn {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl StandIn {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, seen.clone()));
            }
        });
        Self { port, requests }
    }

    /// A kubeconfig in a fresh folder whose current context is this server.
    fn kubeconfig(&self, name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("doctor-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    \
                 server: http://127.0.0.1:{}\ncontexts:\n- name: stand-in\n  context:\n    \
                 cluster: stand-in\n    user: auditor\nusers:\n- name: auditor\n  user:\n    \
                 token: read-only-token\ncurrent-context: stand-in\n",
                self.port
            ),
        )
        .unwrap();
        path
    }
}

async fn serve(stream: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut content_length = 0usize;
        let mut authorized = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                content_length = value.trim().parse().unwrap_or(0);
            }
            if lower == "authorization: bearer read-only-token" {
                authorized = true;
            }
        }
        let mut body = vec![0; content_length];
        if content_length > 0 && reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let request_line = request_line.trim_end().to_owned();
        seen.lock().unwrap().push(request_line.clone());
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default();
        let path = parts
            .next()
            .unwrap_or_default()
            .split('?')
            .next()
            .unwrap_or_default();
        let file = fixture_root().join(format!("{}.json", path.trim_start_matches('/')));
        let (status, body) = match std::fs::read_to_string(&file) {
            Ok(json) if method == "GET" && authorized && !path.contains("..") => ("200 OK", json),
            _ if !authorized => (
                "401 Unauthorized",
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#.to_owned(),
            ),
            _ => (
                "404 Not Found",
                format!(
                    r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"the server could not find the requested resource ({path})","reason":"NotFound","code":404}}"#
                ),
            ),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn run_doctor(kubeconfig: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_doctor"))
        .arg("cluster")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn codes_and_objects(stdout: &str) -> BTreeSet<(String, String)> {
    stdout
        .lines()
        .filter_map(|line| {
            let (code, rest) = line.strip_prefix('[')?.split_once("] ")?;
            let object = rest.split(':').next()?.split(" container ").next()?;
            Some((code.to_owned(), object.to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn audits_a_cluster_through_the_current_kubeconfig_context() {
    let server = StandIn::start().await;
    let kubeconfig = server.kubeconfig("cluster");
    let (code, stdout, stderr) = run_doctor(&kubeconfig, &[]).await;
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");

    let expected: BTreeSet<(String, String)> = [
        // Crash-looping since January: no ready replica, and no PDB either.
        ("stale-workload", "Deployment taskstream/analysis"),
        ("pdb", "Deployment taskstream/analysis"),
        // Grafana: may land on burstable nodes, did land on one, and runs `latest`.
        (
            "observability-placement",
            "Deployment observability/grafana",
        ),
        (
            "observability-placement",
            "Pod observability/grafana-6c9d7f5b8-x2k4q",
        ),
        ("image-tag", "Deployment observability/grafana"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(codes_and_objects(&stdout), expected, "stdout:\n{stdout}");
    // kube-system (coredns has no PDB, no probes and a tiny CPU limit) is skipped by default;
    // the log agent (a DaemonSet) may run on burstable nodes.
    assert!(
        !stdout.contains("coredns") && !stdout.contains("log-agent-7xkq2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("5 finding(s) in 3 object(s)")
            && stdout.contains("5 workloads (1 DaemonSet, 3 Deployment, 1 StatefulSet)")
            && stdout.contains("2 nodes"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{}/", server.port)),
        "{stdout}"
    );

    // Read-only list calls, one per kind, across all namespaces.
    let requests = server.requests.lock().unwrap().clone();
    let paths: BTreeSet<String> = requests
        .iter()
        .map(|line| {
            assert!(line.starts_with("GET "), "{line}");
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .split('?')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    let wanted: BTreeSet<String> = [
        "/apis/apps/v1/deployments",
        "/apis/apps/v1/statefulsets",
        "/apis/apps/v1/daemonsets",
        "/apis/batch/v1/jobs",
        "/apis/batch/v1/cronjobs",
        "/apis/policy/v1/poddisruptionbudgets",
        "/api/v1/pods",
        "/api/v1/nodes",
    ]
    .map(String::from)
    .into();
    assert_eq!(paths, wanted);
}

#[tokio::test]
async fn namespace_filter_and_system_namespaces() {
    let server = StandIn::start().await;
    let kubeconfig = server.kubeconfig("namespaces");

    // Only taskstream: the two findings about analysis, nothing from observability.
    let (code, stdout, _) = run_doctor(&kubeconfig, &["--namespace", "taskstream"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    let objects: BTreeSet<String> = codes_and_objects(&stdout)
        .into_iter()
        .map(|(_, object)| object)
        .collect();
    assert_eq!(
        objects,
        BTreeSet::from(["Deployment taskstream/analysis".to_owned()])
    );

    // Asking for kube-system explicitly audits it.
    let (code, stdout, _) = run_doctor(&kubeconfig, &["--namespace", "kube-system"]).await;
    assert_eq!(code, Some(1), "{stdout}");
    let found = codes_and_objects(&stdout);
    for code in ["pdb", "probes", "cpu-throttling"] {
        assert!(
            found.contains(&(code.to_owned(), "Deployment kube-system/coredns".to_owned())),
            "{code} missing in {stdout}"
        );
    }
}

#[tokio::test]
async fn an_unreachable_or_refusing_api_is_an_error_not_a_clean_bill() {
    let server = StandIn::start().await;
    // Wrong credentials: the server answers 401.
    let kubeconfig = server.kubeconfig("unauthorized");
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .replace("read-only-token", "wrong");
    std::fs::write(&kubeconfig, text).unwrap();
    let (code, stdout, stderr) = run_doctor(&kubeconfig, &[]).await;
    assert_eq!(code, Some(2), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("listing Deployment objects"), "{stderr}");

    // Nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let text = std::fs::read_to_string(&kubeconfig)
        .unwrap()
        .replace(&format!(":{}", server.port), &format!(":{closed}"));
    std::fs::write(&kubeconfig, text).unwrap();
    let (code, _, stderr) = run_doctor(&kubeconfig, &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
}
