//! The spine under what a careless client, an attacker or an outage does to it, through the
//! probe service (examples/probe_service.rs) on the real stack: panics, silent connections,
//! made-up methods, a dead primary, a replica that stopped streaming, several replicas behind
//! one address, a saturated reader pool, and consistency tokens from the future.

use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{http1_client, ServiceProcess, TestStack};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::start_probe;

async fn metric(probe: &ServiceProcess, name: &str) -> f64 {
    test_support::metric_sum(&http1_client(), &probe.url("/metrics"), name).await
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Whether the probe's plain read was served by a replica.
async fn read_on_replica(probe: &ServiceProcess) -> bool {
    let (status, body) = get_json(&http1_client(), &probe.url("/probe/read")).await;
    assert_eq!(status, 200, "{body}");
    body["in_recovery"] == true
}

/// The `probe_rows` table on the stack's primary (the probe's routes write and read it).
fn create_probe_rows(stack: &TestStack) {
    let install = local_postgres::PgInstall::detect().expect("PostgreSQL binaries");
    local_postgres::query(
        &install,
        stack.primary_port,
        "postgres",
        "CREATE TABLE IF NOT EXISTS probe_rows (id uuid PRIMARY KEY)",
    )
    .expect("create probe_rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_logged_500_and_the_connection_lives_on() {
    let stack = TestStack::from_env();
    let probe = start_probe(&stack, stack.replica_port, "panic", &[]).await;
    // One client, so both requests share one keep-alive connection.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .http1_only()
        .build()
        .unwrap();
    let (status, body) = get_json(&client, &probe.url("/probe/panic")).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "internal", "{body}");
    let (status, _) = get_json(&client, &probe.url("/healthz")).await;
    assert_eq!(status, 200, "the server answers on after the panic");
    assert_eq!(metric(&probe, "http_panics_total").await, 1.0);
    assert!(
        probe.logs().contains("the probe was asked to panic"),
        "the panic is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_are_closed() {
    let stack = TestStack::from_env();
    let probe = start_probe(&stack, stack.replica_port, "silent", &[]).await;
    let fds_before = metric(&probe, "process_open_fds").await;
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(
            tokio::net::TcpStream::connect(("127.0.0.1", probe.port))
                .await
                .expect("connect"),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(metric(&probe, "process_open_fds").await >= fds_before + 150.0);
    // Each is closed by the server within the first-bytes timeout (5 s), with nothing sent.
    let opened = Instant::now();
    for mut socket in silent {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut byte))
            .await
            .expect("closed within 10 s");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(opened.elapsed() < Duration::from_secs(8));
    let fds_after = metric(&probe, "process_open_fds").await;
    assert!(
        fds_after < fds_before + 20.0,
        "descriptors: {fds_before} before, {fds_after} after"
    );
    assert!(metric(&probe, "http_silent_connections_closed_total").await >= 200.0);
    // A client that speaks is served as always.
    let (status, _) = get_json(&http1_client(), &probe.url("/healthz")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_add_no_metric_series() {
    let stack = TestStack::from_env();
    let probe = start_probe(&stack, stack.replica_port, "methods", &[]).await;
    let mut answers = Vec::new();
    for method in ["FOO1", "FOO2", "FOO3", "PROPFIND", "BREW"] {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", probe.port))
            .await
            .unwrap();
        let request =
            format!("{method} /probe/read HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer).await;
        answers.push((method, answer));
    }
    let metrics = test_support::metrics_text(&http1_client(), &probe.url("/metrics")).await;
    for method in ["FOO1", "FOO2", "FOO3", "PROPFIND", "BREW"] {
        assert!(!metrics.contains(method), "{method} became a label");
    }
    assert!(
        metrics.contains(r#"method="other""#),
        "made-up methods are counted together"
    );
    for (method, answer) in answers {
        assert!(answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
        assert!(answer.contains("allow: GET"), "{method}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_the_pod_stays_ready_and_writes_fail_alone_with_503() {
    let stack = TestStack::from_env();
    let mut primary = stack.scratch_primary("primary-down");
    primary.query(
        "postgres",
        "CREATE TABLE IF NOT EXISTS probe_rows (id uuid PRIMARY KEY)",
    );
    let writer = primary.url();
    let probe = start_probe(
        &stack,
        stack.replica_port,
        "primary-down",
        &[("DATABASE_WRITER_URL", writer.as_str())],
    )
    .await;
    let client = http1_client();
    let written = client.post(probe.url("/probe/rows")).send().await.unwrap();
    assert_eq!(written.status(), 201);

    primary.stop();
    // Readiness is about this process: it stays in rotation, ready to serve what it can.
    for _ in 0..5 {
        let (status, body) = get_json(&client, &probe.url("/readyz")).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let write = client.post(probe.url("/probe/rows")).send().await.unwrap();
    assert_eq!(write.status(), 503);
    assert_eq!(write.headers()["retry-after"], "1");
    let (status, health) = get_json(&client, &probe.url("/healthz/dependencies")).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["checks"]["writer"]["ok"], false, "{health}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = probe.url("/metrics");
    let primary_up = || {
        test_support::metric_sum_where(
            &client,
            &metrics,
            "dependency_up",
            r#"dependency="primary""#,
        )
    };
    while primary_up().await != 0.0 {
        assert!(Instant::now() < deadline, "dependency_up did not say so");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Reads from the replica go on.
    assert!(read_on_replica(&probe).await);
}

/// `primary_conninfo` of a replica, to stop its WAL receiver and start it again.
fn set_primary_conninfo(replica: &test_support::ScratchCluster, conninfo: &str) {
    replica.query(
        "postgres",
        &format!(
            "ALTER SYSTEM SET primary_conninfo = '{}'",
            conninfo.replace('\'', "''")
        ),
    );
    replica.query("postgres", "SELECT pg_reload_conf()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stopped_streaming_is_left_within_the_lag_bound_and_taken_back() {
    let stack = TestStack::from_env();
    create_probe_rows(&stack);
    let replica = stack.scratch_replica("stopped-streaming");
    let conninfo = replica.query("postgres", "SHOW primary_conninfo");
    let conninfo = conninfo.trim().to_owned();
    let probe = start_probe(
        &stack,
        replica.port,
        "stopped-streaming",
        &[("DATABASE_REPLICA_MAX_LAG_MS", "2000")],
    )
    .await;
    let client = http1_client();
    assert!(read_on_replica(&probe).await, "reads start on the replica");

    // A partition: the replica keeps answering, has replayed all it received, and receives
    // nothing more, while the primary moves on (writes every 100 ms).
    set_primary_conninfo(&replica, "");
    let writing = {
        let (client, url) = (client.clone(), probe.url("/probe/rows"));
        tokio::spawn(async move {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(40) {
                let _ = client.post(&url).send().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let stopped = Instant::now();
    while read_on_replica(&probe).await {
        assert!(
            stopped.elapsed() < Duration::from_secs(6),
            "plain reads still on a replica that stopped streaming"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left_after = stopped.elapsed();
    assert!(metric(&probe, "db_replica_lag_seconds").await >= 1.0);

    set_primary_conninfo(&replica, &conninfo);
    let resumed = Instant::now();
    while !read_on_replica(&probe).await {
        assert!(
            resumed.elapsed() < Duration::from_secs(20),
            "reads did not return once it streams again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "WAL receiver stopped: plain reads left the replica after {left_after:?} (bound 2 s + probes); back {:?} after it streamed again",
        resumed.elapsed()
    );
    writing.abort();
}

/// A TCP proxy on loopback that sends each new connection to the next of `upstreams` in turn,
/// as a Kubernetes Service in front of several replicas does.
async fn round_robin_proxy(upstreams: Vec<u16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut next = 0;
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstreams[next % upstreams.len()];
            next += 1;
            tokio::spawn(async move {
                if let Ok(mut server) =
                    tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_holds_with_two_replicas_behind_one_address_and_one_paused() {
    let stack = TestStack::from_env();
    create_probe_rows(&stack);
    let current = stack.scratch_replica("two-replicas-a");
    let paused = stack.scratch_replica("two-replicas-b");
    let address = round_robin_proxy(vec![current.port, paused.port]).await;
    let probe = start_probe(
        &stack,
        address,
        "two-replicas",
        &[
            // Many reader connections, so both replicas serve reads.
            ("DATABASE_MAX_CONNECTIONS", "8"),
            // Frequent probes, and a lag bound the paused replica stays within for the test:
            // whatever the monitor last saw (one replica or the other), each read must be right.
            ("DATABASE_REPLICA_CHECK_INTERVAL_MS", "20"),
            ("DATABASE_REPLICA_MAX_LAG_MS", "60000"),
        ],
    )
    .await;
    paused.query("postgres", "SELECT pg_wal_replay_pause()");

    let client = http1_client();
    // The pool opens connections only as reads overlap, and sequential reads would keep reusing
    // one (on either replica). Eight overlapping reads open several, spread over both replicas
    // by the proxy; later reads take them in turn.
    test_support::join_spawned((0..8).map(|_| {
        let (client, url) = (client.clone(), probe.url("/probe/slow-read?ms=300"));
        tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
    }))
    .await
    .into_iter()
    .for_each(|status| assert_eq!(status, 200));
    let (mut on_replica, mut on_primary) = (0, 0);
    for round in 0..200 {
        let written = client.post(probe.url("/probe/rows")).send().await.unwrap();
        assert_eq!(written.status(), 201);
        let token = written.headers()["x-consistency-token"]
            .to_str()
            .unwrap()
            .to_owned();
        let id = written.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        // The next request of that client: at once, or once the current replica has replayed
        // the write, so replica connections serve some of these reads. (The test stack commits
        // asynchronously: a write can take a few hundred milliseconds to reach a replica.)
        if round % 2 == 1 {
            let replayed = format!("SELECT pg_last_wal_replay_lsn() >= '{token}'::pg_lsn");
            let since = Instant::now();
            while current.query("postgres", &replayed).trim() != "t" {
                assert!(
                    since.elapsed() < Duration::from_secs(5),
                    "round {round}: the current replica did not replay {token}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let read = client
            .get(probe.url(&format!("/probe/rows/{id}")))
            .header("x-consistency-token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200);
        let read: Value = read.json().await.unwrap();
        assert_eq!(
            read["found"], true,
            "round {round}: a read after the token missed its own write: {read}"
        );
        if read["in_recovery"] == true {
            on_replica += 1;
        } else {
            on_primary += 1;
        }
    }
    println!(
        "two replicas, one paused: 200 writes each read back with its token, {on_replica} by a replica, {on_primary} by the primary"
    );
    assert!(
        on_replica > 0,
        "no read with a token was served by a replica"
    );
    paused.query("postgres", "SELECT pg_wal_replay_resume()");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_reader_pool_is_busy_not_an_outage() {
    let stack = TestStack::from_env();
    let probe = start_probe(
        &stack,
        stack.replica_port,
        "saturated",
        &[
            ("DATABASE_MAX_CONNECTIONS", "2"),
            ("DATABASE_ACQUIRE_TIMEOUT_MS", "200"),
        ],
    )
    .await;
    assert!(read_on_replica(&probe).await);
    // Twenty reads holding a connection for 600 ms each, against two connections.
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (http1_client(), probe.url("/probe/slow-read?ms=600"));
            tokio::spawn(async move {
                let response = client.get(url).send().await.unwrap();
                let retry_after = response.headers().get("retry-after").cloned();
                (response.status().as_u16(), retry_after)
            })
        })
        .collect();
    let mut busy = 0;
    for read in reads {
        let (status, retry_after) = read.await.unwrap();
        assert!(status == 200 || status == 503, "{status}");
        if status == 503 {
            busy += 1;
            assert!(retry_after.is_some(), "503 without Retry-After");
        }
    }
    assert!(busy > 0, "the pool was never saturated");
    assert_eq!(
        metric(&probe, "db_replica_fallback_total").await,
        0.0,
        "saturation sent reads to the primary"
    );
    assert_eq!(metric(&probe, "db_replica_in_use").await, 1.0);
    assert!(read_on_replica(&probe).await, "reads stay on the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistency_token_from_the_future_cannot_pin_reads_to_the_primary() {
    let stack = TestStack::from_env();
    create_probe_rows(&stack);
    let probe = start_probe(&stack, stack.replica_port, "future-token", &[]).await;
    let client = http1_client();
    let written = client.post(probe.url("/probe/rows")).send().await.unwrap();
    let id = written.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Let the replica catch up, then read with a token far beyond anything written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut on_replica = 0;
    for _ in 0..20 {
        let (status, read) = {
            let response = client
                .get(probe.url(&format!("/probe/rows/{id}")))
                .header("x-consistency-token", "FFFFFFFF/FFFFFFF0")
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        };
        assert_eq!(status, 200, "{read}");
        assert_eq!(read["found"], true);
        if read["in_recovery"] == true {
            on_replica += 1;
        }
    }
    assert!(
        on_replica >= 15,
        "only {on_replica} of 20 reads with a future token were served by the replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_pool_refuses_writes_whatever_its_address_points_at() {
    // A reader address that reaches a writable server (a `-ro` service pointed at the wrong
    // pods, a replica promoted after a failover): a write routed to the reader by mistake must
    // fail there, not land.
    let stack = TestStack::from_env();
    create_probe_rows(&stack);
    let primary = local_postgres::database_url(stack.primary_port, "postgres");
    let db = service_kit::db::Database::connect_lazy(&service_kit::config::DatabaseConfig {
        writer_url: primary.clone().into(),
        reader_url: Some(primary.into()),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(2),
        replica_max_lag: Duration::from_secs(5),
        replica_check_interval: Duration::from_millis(250),
    })
    .unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let written = db
        .replica_or_primary(|mut conn| {
            let id = id.clone();
            async move {
                service_kit::sqlx::query("INSERT INTO probe_rows (id) VALUES ($1::uuid)")
                    .bind(id)
                    .execute(&mut *conn)
                    .await
                    .map(drop)
            }
        })
        .await;
    let err = written.expect_err("a write on the reader pool was applied");
    assert!(err.to_string().contains("read-only"), "{err}");
    // Reads there work as ever.
    let read = db
        .replica_or_primary(|mut conn| async move {
            service_kit::sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&mut *conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(read, 1);
}
