//! The tasks API through the edge against input that used to crash or fail it: text PostgreSQL
//! cannot store, instants past what the driver can hold, null where a field cannot be cleared,
//! and methods a path does not serve. Each answers 400 (or 405) naming what is wrong, and
//! nothing is written.

mod common;

use common::{send, task_id, token, System};
use reqwest::Method;
use serde_json::json;
use service_kit::sqlx::Connection;

#[tokio::test]
async fn nul_bytes_are_refused_naming_the_field_and_nothing_is_written() {
    let system = System::start("tasks-nul").await;
    let ada = system.user("nul").await;
    for (body, field) in [
        (
            json!({ "title": "x", "description": "a\u{0}b" }),
            "description",
        ),
        (json!({ "title": "a\u{0}" }), "title"),
        (
            json!({ "title": "x", "labels": ["ok", "b\u{0}d"] }),
            "labels[1]",
        ),
    ] {
        let answer = system.create(&ada, body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.invalid_fields(), [field.to_owned()].into(), "{body}");
        assert!(
            answer.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("NUL"),
            "{}",
            answer.body
        );
    }
    let filtered = system.get(&ada, "/v1/tasks?label=%00").await;
    assert_eq!(filtered.status, 400, "{}", filtered.body);
    assert_eq!(filtered.code(), "invalid_query");
    assert_eq!(filtered.invalid_fields(), ["label".to_owned()].into());

    let task = system.create(&ada, json!({ "title": "kept" })).await;
    let patched = send(
        system
            .request(
                &ada,
                Method::PATCH,
                &format!("/v1/tasks/{}", task_id(&task)),
            )
            .header("if-match", "\"1\"")
            .json(&json!({ "description": "\u{0}" })),
    )
    .await;
    assert_eq!(patched.status, 400, "{}", patched.body);
    // Read after the valid write (its consistency token), so the replica's lag cannot hide it.
    let list = send(
        system
            .request(&ada, Method::GET, "/v1/tasks")
            .header("x-consistency-token", token(&task)),
    )
    .await;
    assert_eq!(
        list.body["items"].as_array().unwrap().len(),
        1,
        "only the valid task"
    );
    assert_eq!(
        list.body["items"][0]["version"], 1,
        "the PATCH wrote nothing"
    );
}

#[tokio::test]
async fn instants_beyond_what_the_database_holds_are_a_400_not_a_crash() {
    let system = System::start("tasks-dates").await;
    let ada = system.user("dates").await;
    // Valid RFC 3339, but in the year 10000 (or 0) once in UTC.
    for due in ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+00:01"] {
        let created = system
            .create(&ada, json!({ "title": "far", "due_at": due }))
            .await;
        assert_eq!(created.status, 400, "{due}: {}", created.body);
        assert_eq!(created.invalid_fields(), ["due_at".to_owned()].into());
    }
    let task = system.create(&ada, json!({ "title": "near" })).await;
    let path = format!("/v1/tasks/{}", task_id(&task));
    let patched = send(
        system
            .request(&ada, Method::PATCH, &path)
            .header("if-match", "\"1\"")
            .json(&json!({ "due_at": "9999-12-31T23:59:59-23:59" })),
    )
    .await;
    assert_eq!(patched.status, 400, "{}", patched.body);
    assert_eq!(patched.invalid_fields(), ["due_at".to_owned()].into());
    let listed = system
        .get(&ada, "/v1/tasks?due_before=9999-12-31T23:59:59-23:59")
        .await;
    assert_eq!(listed.status, 400, "{}", listed.body);
    assert_eq!(listed.invalid_fields(), ["due_before".to_owned()].into());
    // The edges of the range itself are fine.
    let edge = system
        .create(
            &ada,
            json!({ "title": "last", "due_at": "9999-12-31T23:59:59Z" }),
        )
        .await;
    assert_eq!(edge.status, 201, "{}", edge.body);
    // No worker died: the service still answers on.
    let list = system.get(&ada, "/v1/tasks").await;
    assert_eq!(list.status, 200);
    assert!(
        !system.tasks.logs().contains("panicked"),
        "a request panicked:\n{}",
        system.tasks.logs()
    );
}

#[tokio::test]
async fn a_field_that_cannot_be_cleared_refuses_null_and_unknown_methods_say_what_is_allowed() {
    let system = System::start("tasks-shapes").await;
    let ada = system.user("shapes").await;
    let task = system.create(&ada, json!({ "title": "shape" })).await;
    let path = format!("/v1/tasks/{}", task_id(&task));
    for field in ["title", "status", "priority", "labels"] {
        let patched = send(
            system
                .request(&ada, Method::PATCH, &path)
                .header("if-match", "\"1\"")
                .json(&json!({ field: null })),
        )
        .await;
        assert_eq!(patched.status, 400, "{field}: {}", patched.body);
        assert_eq!(patched.invalid_fields(), [field.to_owned()].into());
    }
    let array = system.create(&ada, json!(["title", "x"])).await;
    assert_eq!(array.status, 400, "{}", array.body);

    for (method, path, allow) in [
        (Method::PUT, "/v1/tasks".to_owned(), "POST, GET, HEAD"),
        (Method::POST, path.clone(), "GET, HEAD, PATCH, DELETE"),
    ] {
        let answer = send(system.request(&ada, method.clone(), &path)).await;
        assert_eq!(answer.status, 405, "{method} {path}: {}", answer.body);
        assert_eq!(answer.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(answer.code(), "method_not_allowed");
    }

    // HEAD is GET without the body: the same status and headers, nothing after them.
    for path in [path.as_str(), "/v1/tasks", "/v1/tasks/openapi.json"] {
        let got = send(
            system
                .request(&ada, Method::GET, path)
                .header("x-consistency-token", token(&task)),
        )
        .await;
        let head = system
            .client
            .head(system.edge.url(path))
            .header("authorization", &ada.access_token)
            .header("x-consistency-token", token(&task))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), got.status, "HEAD {path}");
        assert_eq!(
            head.headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap()),
            got.header("content-type"),
            "HEAD {path}"
        );
        assert_eq!(
            head.bytes().await.unwrap().len(),
            0,
            "HEAD {path} has no body"
        );
    }
}

/// A URI of `length` bytes on tasks' list route (a long query string).
fn uri_of(length: usize) -> String {
    let base = "/v1/tasks?label=";
    format!("{base}{}", "a".repeat(length - base.len()))
}

/// A GET of `target` on `base` (`http://127.0.0.1:port`) written on a socket of its own: HTTP
/// clients refuse URIs over 64 KiB, attackers do not. Returns the status and the body, or what
/// went wrong reading them.
async fn raw_get(base: &str, target: &str, token: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|err| err.to_string())?;
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {address}\r\nAuthorization: {token}\r\n\
         Connection: close\r\n\r\n"
    );
    // The server may answer and close before it has read everything: write what it takes.
    let _ = socket.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_end(&mut answer),
    )
    .await;
    match read {
        Err(_) => return Err("no answer within 10 s".to_owned()),
        Ok(Err(err)) if answer.is_empty() => return Err(err.to_string()),
        Ok(_) => {}
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, body.to_owned()));
    }
    // Chunked (the edge streams bodies): size in hex, CRLF, data, CRLF; a 0 size ends it.
    let (mut rest, mut whole) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).map_err(|err| err.to_string())?;
        if size == 0 || after.len() < size {
            break;
        }
        whole.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    Ok((status, whole))
}

#[tokio::test]
async fn a_uri_too_long_gets_a_json_error_however_long_it_is() {
    let system = System::start("tasks-long-uri").await;
    let ada = system.user("uri").await;
    // Straight at tasks and through the edge (the gateway's stand-in).
    for base in [system.tasks.url(""), system.edge.url("")] {
        for kib in [9, 16, 60, 74, 79, 185, 300] {
            let answer = raw_get(&base, &uri_of(kib * 1024), &ada.access_token).await;
            let (status, body) = answer.unwrap_or_else(|err| panic!("{base}, {kib} KiB: {err}"));
            let body: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{base}, {kib} KiB: {status} with {body:?}"));
            assert!(
                [414, 431].contains(&status),
                "{base}, {kib} KiB: {status} {body}"
            );
            assert!(
                ["uri_too_long", "request_head_too_large"]
                    .contains(&body["error"]["code"].as_str().unwrap_or_default()),
                "{base}, {kib} KiB: {status} {body}"
            );
        }
    }
    // The limit leaves room for every URI the API makes (cursors, labels, ids).
    let fine = test_support::Answer::send(
        test_support::http1_client()
            .get(system.tasks.url(&uri_of(4 * 1024)))
            .header("authorization", &ada.access_token),
    )
    .await;
    assert_eq!(
        fine.status, 400,
        "a label too long, not a URI: {}",
        fine.body
    );
    assert_eq!(fine.code(), "invalid_input");
}

#[tokio::test]
async fn a_write_that_reached_the_database_is_never_answered_retry() {
    let stack = test_support::TestStack::from_env();
    let system = System::start_with(
        "tasks-late-commit",
        None,
        &[("HTTP_REQUEST_TIMEOUT_MS", "1000")],
    )
    .await;
    let ada = system.user("late").await;
    let task = system.create(&ada, json!({ "title": "contended" })).await;
    let id = task_id(&task);

    // Another session holds the task's row, so tasks' UPDATE waits on it past the request
    // timeout; it lets go half a second later, and the UPDATE commits then.
    let url = local_postgres::database_url(stack.primary_port, "tasks");
    let mut holder = service_kit::sqlx::PgConnection::connect(&url)
        .await
        .unwrap();
    service_kit::sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .unwrap();
    service_kit::sqlx::query("SELECT 1 FROM tasks WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut holder)
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        service_kit::sqlx::query("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        holder
    });
    let patched = send(
        system
            .request(&ada, Method::PATCH, &format!("/v1/tasks/{id}"))
            .header("if-match", "\"1\"")
            .json(&json!({ "title": "renamed" })),
    )
    .await;
    let mut holder = release.await.unwrap();
    // What the primary holds once the UPDATE, if it went on, has finished.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let version: i64 =
        service_kit::sqlx::query_scalar("SELECT version FROM tasks WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut holder)
            .await
            .unwrap();
    let applied = version == 2;
    println!(
        "PATCH held past the 1 s request timeout: answered {} {}; applied: {applied}",
        patched.status, patched.body
    );
    // Whatever the answer, it must not say "nothing happened, retry" about a write that
    // happened: either the write's own answer, or one that says the outcome is unknown.
    if applied {
        assert_eq!(
            patched.status, 200,
            "the write was applied: {}",
            patched.body
        );
        assert_eq!(patched.body["version"], 2);
    } else {
        assert_ne!(patched.code(), "timeout", "{}", patched.body);
    }
}
