//! HTTP handlers: decode and check the request (including its preconditions), call the domain,
//! shape the answer with its `ETag` and consistency token. Domain errors become HTTP answers in
//! one place, `From<TaskError> for ApiError` below.

use service_kit::access_token::Authenticated;
use service_kit::actix_web::http::header::{self, HeaderName};
use service_kit::actix_web::http::StatusCode;
use service_kit::actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use service_kit::error::{ApiError, ErrorBody};
use service_kit::http::{client_has, ReadAfter, Written};
use service_kit::input::{idempotency_key, Json, Query, Timestamp};
use sha2::{Digest, Sha256};
use uuid::Uuid;
use validator::Validate;

use crate::api::{
    decode_revision_cursor, decode_task_cursor, encode_revision_cursor, CreateTask, ListParams,
    PatchTask, RevisionPage, RevisionParams, RevisionView, TaskPage, TaskView,
};
use crate::domain::rules::{normalize_labels, PAGE_DEFAULT};
use crate::domain::tasks::IdempotencyKey;
use crate::domain::{
    ListQuery, NewTask, Precondition, Priority, Status, Task, TaskChange, TaskError, Tasks,
};

/// Set on the answer to a POST that repeated an earlier one's Idempotency-Key.
const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

impl From<TaskError> for ApiError {
    fn from(err: TaskError) -> Self {
        let message = err.to_string();
        match err {
            TaskError::NotFound(_) => ApiError::not_found(message),
            TaskError::VersionMismatch { current } => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "version_mismatch", message)
                    .with_header(header::ETAG, etag(current))
            }
            TaskError::IdempotencyKeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            TaskError::Contended => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "contended", message).retry_after(1)
            }
            TaskError::Database(db) => db.into(),
            TaskError::Corrupt(_) => ApiError::internal(message),
        }
    }
}

/// A task's entity tag: its version, quoted (a strong validator).
fn etag(version: i64) -> String {
    format!("\"{version}\"")
}

/// The `If-Match` precondition, if the request has one: `*` or one strong entity tag.
fn if_match(request: &HttpRequest) -> Result<Option<Precondition>, ApiError> {
    let Some(value) = request.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::bad_request(
            "invalid_if_match",
            "If-Match must be `*` or the task's ETag, such as \"3\"",
        )
    };
    let value = value.to_str().map_err(|_| invalid())?.trim();
    if value == "*" {
        return Ok(Some(Precondition::Any));
    }
    let version = value
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or(value);
    version
        .parse::<i64>()
        .ok()
        .filter(|version| *version > 0)
        .map(|version| Some(Precondition::Version(version)))
        .ok_or_else(invalid)
}

/// The answer for one task: its body and `ETag`.
fn task_answer(mut builder: HttpResponseBuilder, task: Task) -> HttpResponse {
    builder.insert_header((header::ETAG, etag(task.version)));
    builder.json(TaskView::from(task))
}

/// Create a task. With an `Idempotency-Key`, a retry of the same request creates nothing and
/// gets the first answer again (marked `Idempotent-Replayed: true`).
#[utoipa::path(
    post, path = "/v1/tasks", tag = "tasks",
    security(("bearer" = [])),
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = r"^[\x21-\x7e]([\t\x20-\x7e]{0,198}[\x21-\x7e])?$", description = "1–200 visible ASCII characters; the same key with the same body returns the first result for 24 hours.")),
    request_body = CreateTask,
    responses(
        (status = 201, description = "Created (or replayed).", body = TaskView, headers(
            ("etag" = String, description = "The version, quoted."),
            ("location" = String),
            ("x-consistency-token" = String, description = "Send it back on reads to see this write."))),
        (status = 400, description = "A field breaks a rule; `details` names each.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 422, description = "The Idempotency-Key was used with a different body.", body = ErrorBody),
    )
)]
pub async fn create(
    caller: Authenticated,
    request: HttpRequest,
    tasks: web::Data<Tasks>,
    body: Json<CreateTask>,
) -> Result<Written<HttpResponse>, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    let idempotency = match idempotency_key(&request)? {
        None => None,
        Some(key) => {
            let canonical = serde_json::to_vec(&body).map_err(ApiError::internal)?;
            Some(IdempotencyKey {
                key: key.to_owned(),
                request_hash: Sha256::digest(&canonical).into(),
            })
        }
    };
    let new = NewTask {
        title: body.title.into(),
        description: body.description.map(String::from),
        status: body.status.unwrap_or(Status::Todo),
        priority: body.priority.unwrap_or(Priority::Medium),
        due_at: body.due_at.map(Timestamp::get),
        labels: normalize_labels(body.labels.unwrap_or_default()),
    };
    let created = tasks.create(caller.user_id, new, idempotency).await?;
    let mut answer = HttpResponse::Created();
    answer.insert_header((header::LOCATION, format!("/v1/tasks/{}", created.task.id)));
    if created.replayed {
        answer.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    Ok(Written::new(
        task_answer(answer, created.task),
        created.written_at,
    ))
}

/// One of the caller's tasks. `If-None-Match` with its current ETag answers 304.
#[utoipa::path(
    get, path = "/v1/tasks/{id}", tag = "tasks",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path),
        ("x-consistency-token" = Option<String>, Header, nullable = false, pattern = "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", description = "From an earlier write: the answer reflects it."),
    ),
    responses(
        (status = 200, description = "The task.", body = TaskView, headers(("etag" = String))),
        (status = 304, description = "Unchanged since the ETag in If-None-Match."),
        (status = 404, description = "No such task for this user.", body = ErrorBody),
    )
)]
pub async fn get(
    caller: Authenticated,
    request: HttpRequest,
    id: web::Path<Uuid>,
    read_after: ReadAfter,
    tasks: web::Data<Tasks>,
) -> Result<HttpResponse, ApiError> {
    let task = tasks.get(caller.user_id, *id, read_after.0).await?;
    let current = etag(task.version);
    if client_has(&request, &current) {
        return Ok(HttpResponse::NotModified()
            .insert_header((header::ETAG, current))
            .finish());
    }
    Ok(task_answer(HttpResponse::Ok(), task))
}

/// Change a task. `If-Match` with the version the change was based on is required: if the task
/// changed since, nothing is written and the answer is 412 with the current ETag.
#[utoipa::path(
    patch, path = "/v1/tasks/{id}", tag = "tasks",
    security(("bearer" = [])),
    params(
        ("id" = Uuid, Path),
        ("If-Match" = String, Header, pattern = r#"^(\*|"0*[1-9][0-9]{0,17}"|0*[1-9][0-9]{0,17})$"#, description = "The ETag the change is based on, or `*`."),
    ),
    request_body = PatchTask,
    responses(
        (status = 200, description = "The task as changed (unchanged fields keep the version).", body = TaskView, headers(
            ("etag" = String), ("x-consistency-token" = String))),
        (status = 400, description = "A field breaks a rule.", body = ErrorBody),
        (status = 404, description = "No such task for this user.", body = ErrorBody),
        (status = 412, description = "The task changed since that version; `ETag` has the current one.", body = ErrorBody),
        (status = 428, description = "If-Match is missing.", body = ErrorBody),
        (status = 503, description = "With `If-Match: *`, other changes to the task kept getting in first (`contended`), or the database is unavailable; retry after `Retry-After`.", body = ErrorBody),
    )
)]
pub async fn update(
    caller: Authenticated,
    request: HttpRequest,
    id: web::Path<Uuid>,
    tasks: web::Data<Tasks>,
    body: Json<PatchTask>,
) -> Result<Written<HttpResponse>, ApiError> {
    let expected = if_match(&request)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition_required",
            "send If-Match with the task's ETag, so a change based on an old version is refused",
        )
    })?;
    let body = body.into_inner();
    body.validate()?;
    let change = TaskChange {
        title: body.title.map(String::from),
        description: body
            .description
            .map(|description| description.map(String::from)),
        status: body.status,
        priority: body.priority,
        due_at: body.due_at.map(|due| due.map(Timestamp::get)),
        labels: body.labels.map(normalize_labels),
    };
    let (task, written_at) = tasks.update(caller.user_id, *id, expected, change).await?;
    Ok(Written::new(
        task_answer(HttpResponse::Ok(), task),
        written_at,
    ))
}

/// Delete a task; its history stays readable. `If-Match` is optional here.
#[utoipa::path(
    delete, path = "/v1/tasks/{id}", tag = "tasks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), ("If-Match" = Option<String>, Header, nullable = false, pattern = r#"^(\*|"0*[1-9][0-9]{0,17}"|0*[1-9][0-9]{0,17})$"#, description = "The ETag the deletion is based on, or `*`.")),
    responses(
        (status = 204, description = "Deleted.", headers(("x-consistency-token" = String))),
        (status = 404, description = "No such task for this user.", body = ErrorBody),
        (status = 412, description = "The task changed since the If-Match version.", body = ErrorBody),
        (status = 503, description = "Without a version, other changes to the task kept getting in first (`contended`), or the database is unavailable; retry after `Retry-After`.", body = ErrorBody),
    )
)]
pub async fn delete(
    caller: Authenticated,
    request: HttpRequest,
    id: web::Path<Uuid>,
    tasks: web::Data<Tasks>,
) -> Result<Written<HttpResponse>, ApiError> {
    let expected = if_match(&request)?.unwrap_or(Precondition::Any);
    let written_at = tasks.delete(caller.user_id, *id, expected).await?;
    Ok(Written::new(HttpResponse::NoContent().finish(), written_at))
}

/// The caller's tasks, newest first, a page at a time (keyset pagination).
#[utoipa::path(
    get, path = "/v1/tasks", tag = "tasks",
    security(("bearer" = [])),
    params(ListParams, ("x-consistency-token" = Option<String>, Header, nullable = false, pattern = "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", description = "From an earlier write: the answer reflects it.")),
    responses(
        (status = 200, description = "A page.", body = TaskPage),
        (status = 400, description = "A filter or the cursor is invalid.", body = ErrorBody),
    )
)]
pub async fn list(
    caller: Authenticated,
    params: Query<ListParams>,
    read_after: ReadAfter,
    tasks: web::Data<Tasks>,
) -> Result<HttpResponse, ApiError> {
    let params = params.into_inner();
    params.validate()?;
    let after = params
        .cursor
        .as_deref()
        .map(parse_cursor(decode_task_cursor))
        .transpose()?;
    let query = ListQuery {
        status: params.status,
        label: params.label.map(|label| label.to_lowercase()),
        due_before: params.due_before.map(Timestamp::get),
        limit: params.limit.unwrap_or(PAGE_DEFAULT),
        after,
    };
    let page = tasks.list(caller.user_id, query, read_after.0).await?;
    Ok(HttpResponse::Ok().json(TaskPage::from(page)))
}

/// Every change to a task, oldest first: who, when, and each field's old and new value.
#[utoipa::path(
    get, path = "/v1/tasks/{id}/revisions", tag = "tasks",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), RevisionParams, ("x-consistency-token" = Option<String>, Header, nullable = false, pattern = "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", description = "From an earlier write: the answer reflects it.")),
    responses(
        (status = 200, description = "A page of revisions (a deleted task's history included).", body = RevisionPage),
        (status = 404, description = "No such task for this user.", body = ErrorBody),
    )
)]
pub async fn revisions(
    caller: Authenticated,
    id: web::Path<Uuid>,
    params: Query<RevisionParams>,
    read_after: ReadAfter,
    tasks: web::Data<Tasks>,
) -> Result<HttpResponse, ApiError> {
    let params = params.into_inner();
    params.validate()?;
    let after = params
        .cursor
        .as_deref()
        .map(parse_cursor(decode_revision_cursor))
        .transpose()?
        .unwrap_or(0);
    let page = tasks
        .revisions(
            caller.user_id,
            *id,
            after,
            params.limit.unwrap_or(100),
            read_after.0,
        )
        .await?;
    Ok(HttpResponse::Ok().json(RevisionPage {
        items: page.items.into_iter().map(RevisionView::from).collect(),
        next_cursor: page.next_after.map(encode_revision_cursor),
    }))
}

fn parse_cursor<T>(decode: fn(&str) -> Option<T>) -> impl Fn(&str) -> Result<T, ApiError> {
    move |cursor| {
        decode(cursor).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_cursor",
                "cursor must be a next_cursor this API returned",
            )
        })
    }
}
