//! The tasks API through the edge, as clients use it, against the real primary and replica and a
//! real auth service: every endpoint and error, isolation between users, idempotent creation,
//! concurrent changes, keyset pagination, and read-your-writes while the replica is held back.

use std::collections::BTreeSet;
use std::sync::Arc;

use reqwest::Method;
use serde_json::{json, Value};
use test_support::{http1_client, join_spawned, metric_sum, openapi_operations, Answer, TestStack};

mod common;
use common::{send, task_id, token, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_goes_through_its_whole_life() {
    let system = System::start("tasks-crud").await;
    let ada = system.user("ada").await;

    let created = system
        .create(
            &ada,
            json!({ "title": "Write report", "description": "Q3 numbers", "due_at": "2030-01-15T09:00:00Z", "labels": ["Work", "q3", "work"] }),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = task_id(&created);
    assert_eq!(created.body["status"], "todo");
    assert_eq!(created.body["priority"], "medium");
    assert_eq!(created.body["labels"], json!(["work", "q3"]));
    assert_eq!(created.body["due_at"], "2030-01-15T09:00:00Z");
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.header("etag"), Some("\"1\""));
    assert_eq!(
        created.header("location"),
        Some(format!("/v1/tasks/{id}").as_str())
    );
    assert!(created.body.get("owner_id").is_none());

    let path = format!("/v1/tasks/{id}");
    let read = send(
        system
            .request(&ada, Method::GET, &path)
            .header("x-consistency-token", token(&created)),
    )
    .await;
    assert_eq!(read.status, 200, "{}", read.body);
    assert_eq!(read.body, created.body);
    assert_eq!(read.header("etag"), Some("\"1\""));
    let cached = send(
        system
            .request(&ada, Method::GET, &path)
            .header("if-none-match", "\"1\"")
            .header("x-consistency-token", token(&created)),
    )
    .await;
    assert_eq!(cached.status, 304);

    let changed = send(
        system
            .request(&ada, Method::PATCH, &path)
            .header("if-match", "\"1\"")
            .json(&json!({ "status": "done", "description": null, "title": "Write report" })),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(changed.body["version"], 2);
    assert_eq!(changed.body["status"], "done");
    assert_eq!(changed.body["description"], Value::Null);
    assert_eq!(changed.header("etag"), Some("\"2\""));

    // A change to nothing writes nothing.
    let same = send(
        system
            .request(&ada, Method::PATCH, &path)
            .header("if-match", "\"2\"")
            .json(&json!({ "status": "done" })),
    )
    .await;
    assert_eq!(same.status, 200);
    assert_eq!(same.body["version"], 2);

    let history = send(
        system
            .request(&ada, Method::GET, &format!("{path}/revisions"))
            .header("x-consistency-token", token(&changed)),
    )
    .await;
    assert_eq!(history.status, 200, "{}", history.body);
    let items = history.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", history.body);
    assert_eq!(items[0]["kind"], "created");
    assert_eq!(items[0]["version"], 1);
    assert_eq!(items[0]["actor_id"], ada.user_id.as_str());
    assert_eq!(
        items[0]["changes"]["title"],
        json!({ "from": null, "to": "Write report" })
    );
    assert_eq!(items[1]["kind"], "updated");
    assert_eq!(
        items[1]["changes"],
        json!({
            "status": { "from": "todo", "to": "done" },
            "description": { "from": "Q3 numbers", "to": null },
        }),
        "only the fields that changed"
    );

    let deleted = send(system.request(&ada, Method::DELETE, &path)).await;
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    let token = token(&deleted);
    for method in [Method::GET, Method::DELETE] {
        let gone = send(
            system
                .request(&ada, method.clone(), &path)
                .header("x-consistency-token", &token),
        )
        .await;
        assert_eq!(gone.status, 404, "{method} after delete: {}", gone.body);
        assert_eq!(gone.code(), "not_found");
    }
    let history = send(
        system
            .request(&ada, Method::GET, &format!("{path}/revisions"))
            .header("x-consistency-token", &token),
    )
    .await;
    let kinds: Vec<&str> = history.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["created", "updated", "deleted"],
        "history outlives the task"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_400_and_nothing_is_written() {
    let system = System::start("tasks-validation").await;
    let ada = system.user("valid").await;

    for (body, field) in [
        (json!({ "title": "" }), "title"),
        (json!({ "title": "   " }), "title"),
        (json!({ "title": "t".repeat(201) }), "title"),
        (
            json!({ "title": "ok", "description": "d".repeat(10 * 1024 + 1) }),
            "description",
        ),
        (
            json!({ "title": "ok", "labels": (0..21).map(|i| format!("l{i}")).collect::<Vec<_>>() }),
            "labels",
        ),
        (json!({ "title": "ok", "labels": ["two words"] }), "labels"),
    ] {
        let answer = system.create(&ada, body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_input");
        assert_eq!(
            answer.body["error"]["details"][0]["field"], field,
            "{}",
            answer.body
        );
    }
    for body in [
        json!({ "title": "ok", "status": "someday" }),
        json!({ "title": "ok", "priority": "critical" }),
        json!({ "title": "ok", "due_at": "next tuesday" }),
        json!({ "title": "ok", "owner_id": ada.user_id }),
        json!({ "description": "no title" }),
        json!("a string"),
    ] {
        let answer = system.create(&ada, body.clone()).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_body", "{body}");
    }

    let task = system.create(&ada, json!({ "title": "valid" })).await;
    let path = format!("/v1/tasks/{}", task_id(&task));
    let patch = |if_match: Option<&str>, body: Value| {
        let mut request = system.request(&ada, Method::PATCH, &path).json(&body);
        if let Some(tag) = if_match {
            request = request.header("if-match", tag);
        }
        send(request)
    };
    let missing = patch(None, json!({ "title": "x" })).await;
    assert_eq!(missing.status, 428, "{}", missing.body);
    assert_eq!(missing.code(), "precondition_required");
    let garbage = patch(Some("yesterday"), json!({ "title": "x" })).await;
    assert_eq!(garbage.status, 400);
    assert_eq!(garbage.code(), "invalid_if_match");
    let invalid = patch(Some("\"1\""), json!({ "title": "" })).await;
    assert_eq!(invalid.status, 400);
    let stale = patch(Some("\"7\""), json!({ "title": "x" })).await;
    assert_eq!(stale.status, 412, "{}", stale.body);
    assert_eq!(stale.header("etag"), Some("\"1\""), "the current version");

    for (query, code) in [
        ("limit=0", "invalid_input"),
        ("limit=201", "invalid_input"),
        ("status=someday", "invalid_query"),
        ("cursor=not-a-cursor", "invalid_cursor"),
        ("due_before=soon", "invalid_query"),
        ("lable=typo", "invalid_query"),
    ] {
        let answer = system.get(&ada, &format!("/v1/tasks?{query}")).await;
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert_eq!(answer.code(), code, "{query}");
    }
    let bad_id = system.get(&ada, "/v1/tasks/not-a-uuid").await;
    assert_eq!(bad_id.status, 400);
    assert_eq!(bad_id.code(), "invalid_path");
    let bad_key = send(
        system
            .request(&ada, Method::POST, "/v1/tasks")
            .header("idempotency-key", "k".repeat(201))
            .json(&json!({ "title": "x" })),
    )
    .await;
    assert_eq!(bad_key.status, 400);
    assert_eq!(bad_key.code(), "invalid_idempotency_key");

    let anonymous = send(system.client.get(system.edge.url("/v1/tasks"))).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"));

    // Of all that, only the one valid task exists.
    let list = system.get(&ada, "/v1/tasks").await;
    let token_free_ids: Vec<&str> = list.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|task| task["id"].as_str().unwrap())
        .collect();
    assert!(token_free_ids.len() <= 1, "{}", list.body);
    let read_back = send(
        system
            .request(&ada, Method::GET, "/v1/tasks")
            .header("x-consistency-token", token(&task)),
    )
    .await;
    assert_eq!(read_back.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(read_back.body["items"][0]["title"], "valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_only_ever_see_their_own_tasks() {
    let system = System::start("tasks-isolation").await;
    let (ada, bob) = (system.user("owner").await, system.user("other").await);
    let task = system.create(&ada, json!({ "title": "private" })).await;
    let path = format!("/v1/tasks/{}", task_id(&task));
    let token = token(&task);

    for (method, suffix) in [
        (Method::GET, ""),
        (Method::PATCH, ""),
        (Method::DELETE, ""),
        (Method::GET, "/revisions"),
        // A cursor (here: after version 1) must not turn "not yours" into an empty page.
        (Method::GET, "/revisions?cursor=AAAAAAAAAAE"),
        (Method::GET, "/revisions?cursor=AAAAAAAAAAA"),
    ] {
        let answer = send(
            system
                .request(&bob, method.clone(), &format!("{path}{suffix}"))
                .header("if-match", "*")
                .header("x-consistency-token", &token)
                .json(&json!({ "title": "mine now" })),
        )
        .await;
        assert_eq!(answer.status, 404, "{method} {suffix}: {}", answer.body);
    }
    let bobs_list = send(
        system
            .request(&bob, Method::GET, "/v1/tasks")
            .header("x-consistency-token", &token),
    )
    .await;
    assert_eq!(bobs_list.body["items"], json!([]));
    let adas = send(
        system
            .request(&ada, Method::GET, &path)
            .header("x-consistency-token", &token),
    )
    .await;
    assert_eq!(adas.body["title"], "private", "untouched by bob's attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_post_with_the_same_key_creates_one_task() {
    let system = Arc::new(System::start("tasks-idempotency").await);
    let ada = system.user("idem").await;
    let post = |key: &str, body: Value| {
        let request = system
            .request(&ada, Method::POST, "/v1/tasks")
            .header("idempotency-key", key)
            .json(&body);
        send(request)
    };

    let first = post("create-1", json!({ "title": "once" })).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("idempotent-replayed"), None);
    let retry = post("create-1", json!({ "title": "once" })).await;
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body, "the first result, again");
    let other_body = post("create-1", json!({ "title": "something else" })).await;
    assert_eq!(other_body.status, 422, "{}", other_body.body);
    assert_eq!(other_body.code(), "idempotency_key_reused");

    // Many retries at once (a client timing out and retrying hard) still create one task.
    let attempts = (0..6).map(|_| {
        let (system, ada) = (system.clone(), ada.clone());
        tokio::spawn(async move {
            send(
                system
                    .request(&ada, Method::POST, "/v1/tasks")
                    .header("idempotency-key", "burst")
                    .json(&json!({ "title": "burst" })),
            )
            .await
        })
    });
    let answers: Vec<Answer> = join_spawned(attempts).await;
    assert!(answers.iter().all(|answer| answer.status == 201));
    let ids: BTreeSet<String> = answers.iter().map(task_id).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");

    // Keys belong to a user: another user's same key is a different request.
    let bob = system.user("idem2").await;
    let bobs = send(
        system
            .request(&bob, Method::POST, "/v1/tasks")
            .header("idempotency-key", "create-1")
            .json(&json!({ "title": "once" })),
    )
    .await;
    assert_eq!(bobs.status, 201);
    assert_ne!(task_id(&bobs), task_id(&first));

    let all = send(
        system
            .request(&ada, Method::GET, "/v1/tasks")
            .header("x-consistency-token", token(&answers[0])),
    )
    .await;
    assert_eq!(
        all.body["items"].as_array().unwrap().len(),
        2,
        "{}",
        all.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_from_one_version_have_exactly_one_winner() {
    let system = Arc::new(System::start("tasks-concurrency").await);
    let ada = system.user("race").await;
    let task = system.create(&ada, json!({ "title": "contested" })).await;
    let path = format!("/v1/tasks/{}", task_id(&task));

    let attempts = (0..8).map(|n| {
        let (system, ada, path) = (system.clone(), ada.clone(), path.clone());
        tokio::spawn(async move {
            send(
                system
                    .request(&ada, Method::PATCH, &path)
                    .header("if-match", "\"1\"")
                    .json(&json!({ "title": format!("writer {n}") })),
            )
            .await
        })
    });
    let answers: Vec<Answer> = join_spawned(attempts).await;
    let winners: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    assert_eq!(
        winners.len(),
        1,
        "{:?}",
        answers.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert!(answers
        .iter()
        .filter(|a| a.status != 200)
        .all(|a| a.status == 412 && a.header("etag") == Some("\"2\"")));

    let history = send(
        system
            .request(&ada, Method::GET, &format!("{path}/revisions"))
            .header("x-consistency-token", token(winners[0])),
    )
    .await;
    let items = history.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "one creation, one change: {}", history.body);
    assert_eq!(items[1]["changes"]["title"]["to"], winners[0].body["title"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_filter_and_page_newest_first() {
    let system = System::start("tasks-list").await;
    let ada = system.user("lister").await;
    let mut created = Vec::new();
    for n in 0..25 {
        let body = json!({
            "title": format!("task {n}"),
            "status": if n % 3 == 0 { "done" } else { "todo" },
            "labels": if n % 2 == 0 { json!(["Even"]) } else { json!(["odd"]) },
            "due_at": if n < 10 { json!(format!("2030-01-{:02}T00:00:00Z", n + 1)) } else { Value::Null },
        });
        let answer = system.create(&ada, body).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        created.push((task_id(&answer), token(&answer)));
    }
    let token = created.last().unwrap().1.clone();
    let newest_first: Vec<String> = created.iter().rev().map(|(id, _)| id.clone()).collect();
    let list = |query: String| {
        let request = system
            .request(&ada, Method::GET, &format!("/v1/tasks?{query}"))
            .header("x-consistency-token", &token);
        send(request)
    };
    let ids = |answer: &Answer| -> Vec<String> {
        answer.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|task| task["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // Pages of 10, 10 and 5, newest first, no task twice, then no cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let query = match &cursor {
            Some(cursor) => format!("limit=10&cursor={cursor}"),
            None => "limit=10".to_owned(),
        };
        let page = list(query).await;
        assert_eq!(page.status, 200, "{}", page.body);
        pages.push(ids(&page).len());
        seen.extend(ids(&page));
        match page.body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages.len() <= 4, "paging does not end");
    }
    assert_eq!(pages, [10, 10, 5]);
    assert_eq!(seen, newest_first);

    let expect = |filter: &dyn Fn(usize) -> bool| -> Vec<String> {
        (0..25)
            .rev()
            .filter(|n| filter(*n))
            .map(|n| created[n].0.clone())
            .collect()
    };
    assert_eq!(
        ids(&list("status=done&limit=200".into()).await),
        expect(&|n| n % 3 == 0)
    );
    assert_eq!(
        ids(&list("label=EVEN&limit=200".into()).await),
        expect(&|n| n % 2 == 0)
    );
    assert_eq!(
        ids(&list("due_before=2030-01-05T00:00:00Z&limit=200".into()).await),
        expect(&|n| n < 4)
    );
    assert_eq!(
        ids(&list("label=odd&status=todo&due_before=2030-02-01T00:00:00Z".into()).await),
        expect(&|n| n % 2 == 1 && n % 3 != 0 && n < 10)
    );
    // A filtered list pages too.
    let first = list("label=even&limit=5".into()).await;
    let next = first.body["next_cursor"].as_str().unwrap().to_owned();
    let second = list(format!("label=even&limit=5&cursor={next}")).await;
    let mut both = ids(&first);
    both.extend(ids(&second));
    assert_eq!(both, expect(&|n| n % 2 == 0)[..10].to_vec());
    assert_eq!(
        ids(&list("label=nothing-has-this".into()).await),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_see_the_callers_writes_while_the_replica_is_held_back() {
    let stack = TestStack::from_env();
    let replica = stack.scratch_replica("tasks-ryw");
    // Replay will be paused on purpose: keep the replica in use however far behind it falls.
    let system = System::start_with(
        "tasks-ryw",
        Some(replica.port),
        &[("DATABASE_REPLICA_MAX_LAG_MS", "600000")],
    )
    .await;
    let ada = system.user("ryw").await;
    let created = system.create(&ada, json!({ "title": "first draft" })).await;
    let id = task_id(&created);
    let path = format!("/v1/tasks/{id}");

    // Let the replica catch up with the creation, then hold replay back.
    let replayed = || {
        replica.query(
            "tasks",
            &format!("SELECT count(*) FROM tasks WHERE id = '{id}'"),
        )
    };
    for _ in 0..100 {
        if replayed() == "1" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(replayed(), "1", "the replica never saw the task");
    replica.query("postgres", "SELECT pg_wal_replay_pause()");

    let changed = send(
        system
            .request(&ada, Method::PATCH, &path)
            .header("if-match", "\"1\"")
            .json(&json!({ "title": "final" })),
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    let fresh_task = system
        .create(&ada, json!({ "title": "made while paused" }))
        .await;

    // With the token of its write, the caller reads it (the primary answers)...
    let mine = send(
        system
            .request(&ada, Method::GET, &path)
            .header("x-consistency-token", token(&changed)),
    )
    .await;
    assert_eq!(mine.body["title"], "final");
    assert_eq!(mine.body["version"], 2);
    let listed = send(
        system
            .request(&ada, Method::GET, "/v1/tasks")
            .header("x-consistency-token", token(&fresh_task)),
    )
    .await;
    assert_eq!(listed.body["items"].as_array().unwrap().len(), 2);

    // ...while plain reads keep going to the replica, which still has the old state.
    for _ in 0..5 {
        let plain = system.get(&ada, &path).await;
        assert_eq!(
            plain.body["title"], "first draft",
            "served by the held-back replica"
        );
        let plain_list = system.get(&ada, "/v1/tasks").await;
        assert_eq!(plain_list.body["items"].as_array().unwrap().len(), 1);
    }
    // A task the replica has never seen is not reported missing once the replica is known to
    // be behind (its probe, every 250 ms, finds it a check interval or more behind): the
    // primary confirms the miss.
    let unseen_path = format!("/v1/tasks/{}", task_id(&fresh_task));
    let unseen = test_support::poll_until(
        std::time::Duration::from_secs(3),
        || system.get(&ada, &unseen_path),
        |answer| answer.status == 200,
    )
    .await;
    assert_eq!(unseen.status, 200, "{}", unseen.body);

    let metrics = metric_sum(
        &http1_client(),
        &system.tasks.url("/metrics"),
        "db_replica_fallback_total",
    )
    .await;
    assert!(
        metrics >= 3.0,
        "read-your-writes and confirmed misses are counted: {metrics}"
    );

    // Once replay resumes, plain reads catch up.
    replica.query("postgres", "SELECT pg_wal_replay_resume()");
    let mut caught_up = false;
    for _ in 0..100 {
        if system.get(&ada, &path).await.body["title"] == "final" {
            caught_up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(caught_up, "the replica did not catch up after resuming");
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let system = System::start("tasks-openapi").await;
    let document = send(system.client.get(system.edge.url("/v1/tasks/openapi.json"))).await;
    assert_eq!(document.status, 200);
    assert!(document.body["openapi"]
        .as_str()
        .unwrap()
        .starts_with("3.1"));
    let operations = openapi_operations(&document.body);
    let expected: BTreeSet<String> = [
        "POST /v1/tasks",
        "GET /v1/tasks",
        "GET /v1/tasks/{id}",
        "PATCH /v1/tasks/{id}",
        "DELETE /v1/tasks/{id}",
        "GET /v1/tasks/{id}/revisions",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(operations, expected);
}
