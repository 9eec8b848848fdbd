//! HTTP handlers: decode the request, call the domain, shape the answer with its `ETag`. Domain
//! errors become HTTP answers in one place, `From<AnalysisError> for ApiError` below.

use std::collections::HashSet;

use futures_util::{stream, StreamExt, TryStreamExt};
use service_kit::access_token::Authenticated;
use service_kit::actix_web::http::header;
use service_kit::actix_web::web::{self, Bytes};
use service_kit::actix_web::{HttpRequest, HttpResponse};
use service_kit::error::{ApiError, ErrorBody, FieldIssue};
use service_kit::http::client_has;
use service_kit::input::{hyphenated_uuid, AnyJson, Query};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::{
    DashboardView, IdsParams, TaskAnalysisList, TaskAnalysisView, TelemetryAccepted,
    TelemetryBatchBody, UsageDay, UsageParams, UsageView,
};
use crate::domain::model::TaskModel;
use crate::domain::telemetry::{self, Ingest, IngestError};
use crate::domain::{Analysis, AnalysisError, MAX_IDS, MAX_USAGE_DAYS};

impl From<AnalysisError> for ApiError {
    fn from(err: AnalysisError) -> Self {
        let message = err.to_string();
        match err {
            AnalysisError::NotFound(_) => ApiError::not_found(message),
            AnalysisError::Database(db) => db.into(),
            AnalysisError::Corrupt(_) => ApiError::internal(message),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        // A full queue empties within moments; an unacknowledged batch needs the broker back.
        let retry_after = match err {
            IngestError::QueueFull => 1,
            IngestError::NotAcknowledged | IngestError::Stopping => 2,
        };
        ApiError::unavailable(err.to_string()).retry_after(retry_after)
    }
}

/// A JSON answer with a strong `ETag` of its bytes; `304` when the client has them already.
fn json_answer(
    request: &HttpRequest,
    body: &impl serde::Serialize,
) -> Result<HttpResponse, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(ApiError::internal)?;
    let digest = Sha256::digest(&bytes);
    let tag = format!(
        "\"{}\"",
        digest[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let unchanged = client_has(request, &tag);
    let mut answer = if unchanged {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    answer
        .insert_header((header::ETAG, tag))
        .insert_header((header::CACHE_CONTROL, "private, no-cache"));
    Ok(if unchanged {
        answer.finish()
    } else {
        answer.content_type("application/json").body(bytes)
    })
}

/// One task's analysis.
#[utoipa::path(
    get, path = "/v1/analysis/tasks/{id}", tag = "analysis",
    security(("bearer" = [])),
    params(("id" = Uuid, Path), ("If-None-Match" = Option<String>, Header, nullable = false)),
    responses(
        (status = 200, description = "The analysis, as of the event in `as_of`.", body = TaskAnalysisView, headers(("etag" = String))),
        (status = 304, description = "Unchanged since the `ETag` sent."),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 404, description = "No analysis of that task for this user (not theirs, deleted, or not applied yet).", body = ErrorBody),
        (status = 503, description = "The database is unavailable; `Retry-After` says when to retry.", body = ErrorBody),
    )
)]
pub async fn task(
    caller: Authenticated,
    request: HttpRequest,
    id: web::Path<Uuid>,
    analysis: web::Data<Analysis>,
) -> Result<HttpResponse, ApiError> {
    let model = analysis.task(caller.user_id, *id).await?;
    json_answer(
        &request,
        &TaskAnalysisView::new(model, OffsetDateTime::now_utc()),
    )
}

fn parse_ids(text: &str) -> Result<Vec<Uuid>, ApiError> {
    let invalid = |message: String| {
        ApiError::invalid_input(vec![FieldIssue {
            field: "ids".into(),
            message,
        }])
    };
    // Exactly as the document's pattern says: hyphenated UUIDs, one comma between each.
    let parts: Vec<&str> = text.split(',').collect();
    if parts.len() > MAX_IDS {
        return Err(invalid(format!(
            "at most {MAX_IDS} task ids at once, not {}",
            parts.len()
        )));
    }
    let mut seen = HashSet::new();
    let mut ids = Vec::new();
    for part in parts {
        let id = hyphenated_uuid(part).ok_or_else(|| invalid(format!("{part:?} is not a UUID")))?;
        if seen.insert(id) {
            ids.push(id);
        }
    }
    if ids.len() > MAX_IDS {
        return Err(invalid(format!(
            "at most {MAX_IDS} task ids at once, not {}",
            ids.len()
        )));
    }
    Ok(ids)
}

/// Several tasks' analyses in one answer.
#[utoipa::path(
    get, path = "/v1/analysis/tasks", tag = "analysis",
    security(("bearer" = [])),
    params(IdsParams, ("If-None-Match" = Option<String>, Header, nullable = false)),
    responses(
        (status = 200, description = "Those found, in the order asked; `missing` lists the others.", body = TaskAnalysisList, headers(("etag" = String))),
        (status = 304, description = "Unchanged since the `ETag` sent."),
        (status = 400, description = "`ids` is missing, empty, longer than 200 or holds a non-UUID.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable.", body = ErrorBody),
    )
)]
pub async fn tasks(
    caller: Authenticated,
    request: HttpRequest,
    params: Query<IdsParams>,
    analysis: web::Data<Analysis>,
) -> Result<HttpResponse, ApiError> {
    let ids = parse_ids(&params.ids)?;
    let found = analysis.tasks(caller.user_id, &ids).await?;
    let present: HashSet<Uuid> = found.iter().map(|model| model.task_id).collect();
    let now = OffsetDateTime::now_utc();
    let list = TaskAnalysisList {
        missing: ids.into_iter().filter(|id| !present.contains(id)).collect(),
        items: found
            .into_iter()
            .map(|model| TaskAnalysisView::new(model, now))
            .collect(),
    };
    json_answer(&request, &list)
}

/// The caller's dashboard.
#[utoipa::path(
    get, path = "/v1/analysis/me", tag = "analysis",
    security(("bearer" = [])),
    params(("If-None-Match" = Option<String>, Header, nullable = false)),
    responses(
        (status = 200, description = "Counts, work in progress, overdue, weekly throughput, cycle-time percentiles and daily created vs completed, as of the newest event applied for the caller (`as_of` is null before the first).", body = DashboardView, headers(("etag" = String))),
        (status = 304, description = "Unchanged since the `ETag` sent."),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable.", body = ErrorBody),
    )
)]
pub async fn me(
    caller: Authenticated,
    request: HttpRequest,
    analysis: web::Data<Analysis>,
) -> Result<HttpResponse, ApiError> {
    let board = analysis
        .dashboard(caller.user_id, OffsetDateTime::now_utc())
        .await?;
    json_answer(&request, &board)
}

/// A page of analyses as NDJSON lines.
fn ndjson(page: Vec<TaskModel>, now: OffsetDateTime) -> Result<Bytes, AnalysisError> {
    let mut lines = Vec::with_capacity(page.len() * 640);
    for model in page {
        serde_json::to_writer(&mut lines, &TaskAnalysisView::new(model, now))
            .map_err(|err| AnalysisError::Corrupt(err.to_string()))?;
        lines.push(b'\n');
    }
    Ok(Bytes::from(lines))
}

/// Every analysis of the caller, streamed.
#[utoipa::path(
    get, path = "/v1/analysis/export", tag = "analysis",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "NDJSON (`application/x-ndjson`): one task analysis per line, each with its own `as_of`, in task id order. Streamed from the first page on, in constant memory; a stream that breaks off before its end (no final newline, or a reset) is incomplete. A weak `ETag` names the newest event applied for the caller when the export began.", body = TaskAnalysisView, content_type = "application/x-ndjson", headers(("etag" = String))),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable.", body = ErrorBody),
    )
)]
pub async fn export(
    caller: Authenticated,
    analysis: web::Data<Analysis>,
) -> Result<HttpResponse, ApiError> {
    let now = OffsetDateTime::now_utc();
    // Weak: the lines are read while they are sent, so the tag names the newest event applied
    // when the export began; a client compares it to know whether an export is worth repeating.
    let tag = match analysis.as_of(caller.user_id).await? {
        Some(as_of) => format!(
            "W/\"{}-{}-{}-{}\"",
            as_of.event_at.unix_timestamp_nanos(),
            as_of.topic,
            as_of.partition,
            as_of.offset
        ),
        None => "W/\"empty\"".to_owned(),
    };
    let mut pages = Box::pin(analysis.export(caller.user_id));
    // The first page before the status line: a database that is away is a 503, not a cut stream.
    let first = pages.try_next().await?.unwrap_or_default();
    let body = stream::once(async move { Ok(first) })
        .chain(pages)
        .map(move |page| page.and_then(|page| ndjson(page, now)))
        .map_err(|err| {
            tracing::warn!(error = %err, "export broke off");
            std::io::Error::other(err.to_string())
        });
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::ETAG, tag))
        .streaming(body))
}

/// Accepts a batch of client events: 202 once the broker has it.
#[utoipa::path(
    post, path = "/v1/telemetry", tag = "telemetry",
    security(("bearer" = [])),
    request_body(content = TelemetryBatchBody, description = "1–500 events, at most 256 KiB."),
    responses(
        (status = 202, description = "The batch is on the broker (acknowledged by all in-sync replicas): durable.", body = TelemetryAccepted),
        (status = 400, description = "The body breaks a rule; `details` names every broken field (`events[3].props.plan`).", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 413, description = "The body is larger than 256 KiB.", body = ErrorBody),
        (status = 503, description = "The queue is full, or the broker did not acknowledge in time: nothing was kept (or a copy may have been: retrying is safe, each batch is counted once). `Retry-After` says when to retry.", body = ErrorBody),
    )
)]
pub async fn post_telemetry(
    caller: Authenticated,
    ingest: web::Data<Ingest>,
    body: AnyJson<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let events = telemetry::parse_batch(&body.0, OffsetDateTime::now_utc()).map_err(|broken| {
        ApiError::invalid_input(
            broken
                .into_iter()
                .map(|b| FieldIssue {
                    field: b.field,
                    message: b.message,
                })
                .collect(),
        )
    })?;
    let count = events.len();
    let batch_id = ingest.submit(caller.user_id, events).await?;
    Ok(HttpResponse::Accepted().json(TelemetryAccepted {
        batch_id,
        events: count,
    }))
}

fn parse_day(field: &'static str, text: Option<&str>) -> Result<Option<time::Date>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    // `YYYY-MM-DD` only, as the document says (ISO 8601 has week and ordinal dates too).
    let day = |from: usize, to: usize| {
        text.get(from..to).and_then(|part| {
            part.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| part.parse::<i32>().ok())
                .flatten()
        })
    };
    let date = match (text.len(), text.as_bytes().get(4), text.as_bytes().get(7)) {
        (10, Some(b'-'), Some(b'-')) => match (day(0, 4), day(5, 7), day(8, 10)) {
            (Some(year), Some(month), Some(day)) => time::Month::try_from(month as u8)
                .ok()
                .and_then(|month| time::Date::from_calendar_date(year, month, day as u8).ok()),
            _ => None,
        },
        _ => None,
    };
    date.map(Some).ok_or(()).map_err(|_| {
        ApiError::invalid_input(vec![FieldIssue {
            field: field.into(),
            message: format!("{text:?} is not a day (YYYY-MM-DD)"),
        }])
    })
}

/// The caller's telemetry counts per day and event name.
#[utoipa::path(
    get, path = "/v1/analysis/usage", tag = "telemetry",
    security(("bearer" = [])),
    params(UsageParams),
    responses(
        (status = 200, description = "Counts per UTC day (of the events' own time) and name.", body = UsageView),
        (status = 400, description = "`from` or `to` is not a day, `from` is after `to`, or the range is longer than 92 days.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable.", body = ErrorBody),
    )
)]
pub async fn usage(
    caller: Authenticated,
    params: Query<UsageParams>,
    analysis: web::Data<Analysis>,
) -> Result<HttpResponse, ApiError> {
    let to =
        parse_day("to", params.to.as_deref())?.unwrap_or_else(|| OffsetDateTime::now_utc().date());
    let from = parse_day("from", params.from.as_deref())?.unwrap_or(to - time::Duration::days(6));
    let days = (to - from).whole_days();
    if !(0..MAX_USAGE_DAYS).contains(&days) {
        return Err(ApiError::invalid_input(vec![FieldIssue {
            field: "from".into(),
            message: format!("must be on or before `to`, at most {MAX_USAGE_DAYS} days apart"),
        }]));
    }
    let items = analysis
        .usage(caller.user_id, from, to)
        .await?
        .into_iter()
        .map(|(day, name, events)| UsageDay {
            day: day.to_string(),
            name,
            events,
        })
        .collect();
    Ok(HttpResponse::Ok().json(UsageView {
        from: from.to_string(),
        to: to.to_string(),
        items,
    }))
}
