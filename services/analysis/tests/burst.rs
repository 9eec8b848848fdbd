//! What the seed's frontend did to its analysis endpoint, through the edge over h2c: 500 per-task
//! analyses at once on one connection (h2load `-m 500`), then 5,000 on one connection (the seed's
//! ingress cut connections at 1,000 requests); and the export of 20,000 analyses streamed in
//! constant memory. Figures are printed (`--nocapture`); goals live in the closing notes, the
//! test asserts only that every answer is right.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{future, StreamExt};
use test_support::poll_until;

mod common;
use common::{ScriptedTask, System};

const TASKS: usize = 20_000;

/// Runs h2load against the edge with the given requests and returns its summary, asserting every
/// request got a 2xx.
fn h2load(
    system: &System,
    token: &str,
    uris: &[String],
    requests: usize,
    streams: usize,
) -> String {
    let dir = system.stack.scratch_dir("h2load");
    let list = dir.join("uris.txt");
    let mut file = std::fs::File::create(&list).unwrap();
    for uri in uris {
        writeln!(file, "{}", system.edge.url(uri)).unwrap();
    }
    drop(file);
    let output = Command::new("h2load")
        .args(["-c", "1", "-t", "1"])
        .args(["-n", &requests.to_string(), "-m", &streams.to_string()])
        .args(["-H", &format!("authorization: {token}")])
        .arg("-i")
        .arg(&list)
        .output()
        .expect("h2load (Debian nghttp2-client; `cargo xtask test` installs it)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "h2load failed: {report}");
    let expected = format!("requests: {requests} total, {requests} started, {requests} done, {requests} succeeded, 0 failed, 0 errored");
    assert!(
        report.contains(&expected),
        "not every request succeeded:\n{report}"
    );
    assert!(
        report.contains(&format!("status codes: {requests} 2xx")),
        "not every answer was a 2xx:\n{report}"
    );
    report
}

fn summary_line<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.trim_start().starts_with(prefix))
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_over_one_h2c_connection_and_a_streamed_export() {
    let system = System::start("analysis-burst").await;
    let carol = system.user("carol").await;
    let now = time::OffsetDateTime::now_utc();
    let tasks: Vec<ScriptedTask> = (0..TASKS)
        .map(|n| {
            let status = ["todo", "in_progress", "blocked", "done"][n % 4];
            ScriptedTask::new(
                &carol.user_id,
                now - time::Duration::minutes(n as i64),
                status,
            )
        })
        .collect();
    let started = Instant::now();
    let created: Vec<_> = tasks.iter().map(ScriptedTask::created).collect();
    for chunk in created.chunks(1_000) {
        future::join_all(
            chunk
                .iter()
                .map(|event| system.publish(event, event.task.created_at)),
        )
        .await;
    }
    let applied = poll_until(
        Duration::from_secs(180),
        || async { system.get(&carol, "/v1/analysis/me").await },
        |answer| {
            answer.body["by_status"]
                .as_object()
                .map(|counts| counts.values().filter_map(|n| n.as_i64()).sum::<i64>())
                == Some(TASKS as i64)
        },
    )
    .await;
    assert_eq!(applied.body["by_status"]["done"], (TASKS / 4) as i64);
    println!(
        "{TASKS} task.created published and applied in {:?}",
        started.elapsed()
    );

    // 500 different per-task analyses, all at once on one connection.
    let uris: Vec<String> = tasks[..500]
        .iter()
        .map(|task| format!("/v1/analysis/tasks/{}", task.id()))
        .collect();
    let burst = h2load(&system, &carol.access_token, &uris, 500, 500);
    println!(
        "500 at once on one h2c connection: {}; {}",
        summary_line(&burst, "finished in"),
        summary_line(&burst, "time for request")
    );
    // 5,000 on one connection, 100 streams at a time.
    let long = h2load(&system, &carol.access_token, &uris, 5_000, 100);
    println!(
        "5,000 on one h2c connection: {}",
        summary_line(&long, "finished in")
    );

    // The export: every analysis, streamed.
    let rss_before = system.analysis.rss_kib();
    let started = Instant::now();
    let response = system
        .client
        .get(system.edge.url("/v1/analysis/export"))
        .header("authorization", &carol.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    assert!(response.headers()["etag"]
        .to_str()
        .unwrap()
        .starts_with("W/\""));
    let mut body = response.bytes_stream();
    let (mut first_byte, mut lines, mut bytes, mut rss_max) = (None, 0usize, 0usize, rss_before);
    let mut last_line = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("export chunk");
        first_byte.get_or_insert_with(|| started.elapsed());
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
        last_line.extend_from_slice(&chunk);
        if let Some(end) = last_line[..last_line.len().saturating_sub(1)]
            .iter()
            .rposition(|b| *b == b'\n')
        {
            last_line.drain(..=end);
        }
        rss_max = rss_max.max(system.analysis.rss_kib());
    }
    let total = started.elapsed();
    assert_eq!(lines, TASKS, "one line per task");
    let last: serde_json::Value = serde_json::from_slice(&last_line).expect("a JSON line");
    assert!(
        last["task_id"].is_string() && last["as_of"]["offset"].is_i64(),
        "{last}"
    );
    println!(
        "export of {TASKS}: first byte after {:?}, all {} bytes after {total:?}; analysis RSS {} KiB before, at most {} KiB while streaming",
        first_byte.unwrap(),
        bytes,
        rss_before,
        rss_max
    );
    // Buffering the answer would take at least its size on top; streaming stays below. Not
    // half of it: mimalloc (the services' allocator) takes memory from the system in segments
    // of 4 MiB and keeps freed pages a while, so RSS grew by 4–6 MiB here for 11 MB streamed.
    let grown_kib = rss_max.saturating_sub(rss_before) as usize;
    assert!(
        grown_kib * 1024 < bytes,
        "RSS grew by {grown_kib} KiB while streaming {bytes} bytes"
    );
}
