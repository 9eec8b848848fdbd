//! HTTP handlers: decode the request, call the domain, shape the answer with its `ETag`. Domain
//! errors become HTTP answers in one place, `From<AnalysisError> for ApiError` below.

use std::collections::HashSet;

use futures_util::{stream, StreamExt, TryStreamExt};
use service_kit::access_token::Authenticated;
use service_kit::actix_web::http::header;
use service_kit::actix_web::web::{self, Bytes};
use service_kit::actix_web::{FromRequest, HttpRequest, HttpResponse};
use service_kit::error::{ApiError, ErrorBody, FieldIssue};
use service_kit::http::client_has;
use service_kit::input::{hyphenated_uuid, idempotency_key, AnyJson, Query};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::{
    DashboardView, IdsParams, TaskAnalysisList, TaskAnalysisView, TelemetryAccepted,
    TelemetryBatchBody, UsageDay, UsageParams, UsageView,
};
use crate::domain::model::TaskModel;
use crate::domain::telemetry::{self, BrokenBatch, Ingest, IngestError, MAX_LISTED_BROKEN_FIELDS};
use crate::domain::{Analysis, AnalysisError, UsageCursor, MAX_IDS, MAX_USAGE_DAYS};

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
            IngestError::Expired | IngestError::NotAcknowledged | IngestError::Stopping => 2,
            IngestError::Encoding(_) => return ApiError::internal(err),
        };
        ApiError::unavailable(err.to_string()).retry_after(retry_after)
    }
}

/// The 400 for a broken batch: the first broken fields, and in the message how many more.
fn broken_batch(broken: BrokenBatch) -> ApiError {
    let unlisted = broken.unlisted();
    let mut error = ApiError::invalid_input(
        broken
            .listed
            .into_iter()
            .map(|b| FieldIssue {
                field: b.field,
                message: b.message,
            })
            .collect(),
    );
    if unlisted > 0 {
        error.message = format!(
            "{}; and {unlisted} more broken fields (only the first {MAX_LISTED_BROKEN_FIELDS} are listed)",
            error.message
        );
    }
    error
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
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = r"^[\x21-\x7e]([\t\x20-\x7e]{0,198}[\x21-\x7e])?$", description = "1–200 visible ASCII characters. The same key with the same events (from the same user) is the same batch: the same `batch_id`, counted once however often it is sent (for 8 days). Send one with every batch and keep it for the batch's retries: a 503 after a timeout may have been kept.")),
    request_body(content = TelemetryBatchBody, description = "1–500 events, at most 256 KiB."),
    responses(
        (status = 202, description = "The batch is on the broker (acknowledged by all in-sync replicas): durable. A retry with the same `Idempotency-Key` and events answers the same `batch_id`.", body = TelemetryAccepted),
        (status = 400, description = "The body breaks a rule: `details` names the first 50 broken fields (`events[3].props.plan`), and the message says how many more there are; or the Idempotency-Key is not 1–200 visible ASCII characters (`invalid_idempotency_key`).", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 413, description = "The body is larger than 256 KiB.", body = ErrorBody),
        (status = 503, description = "Not accepted; `Retry-After` says when to retry. `Retry-After: 1`: the ingest holds all the batches or bytes it may (the body is not read): nothing was kept. `Retry-After: 2`: the broker did not take or acknowledge the batch within the bound; it may have been kept, so retry with the same `Idempotency-Key` to have it counted once (without a key, a retry may count it twice).", body = ErrorBody),
    )
)]
pub async fn post_telemetry(
    caller: Authenticated,
    request: HttpRequest,
    body: web::Payload,
    ingest: web::Data<Ingest>,
) -> Result<HttpResponse, ApiError> {
    let key = idempotency_key(&request)?;
    // Room for the body before a byte of it is read: memory is bounded by the bytes held,
    // bodies being read included, whatever the number of requests.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let held = ingest.reserve(declared)?;
    let mut payload = body.into_inner();
    let AnyJson(body) = AnyJson::<serde_json::Value>::from_request(&request, &mut payload).await?;
    let events = telemetry::parse_batch(body, OffsetDateTime::now_utc()).map_err(broken_batch)?;
    let count = events.len();
    let batch_id = ingest.submit(caller.user_id, key, events, held).await?;
    Ok(HttpResponse::Accepted().json(TelemetryAccepted {
        batch_id,
        events: count,
    }))
}

/// The first day `GET /v1/analysis/usage` takes: year 1, as instants are from year 1 to 9999
/// everywhere in the API (years are written with 4 digits, so 9999 is the last).
const FIRST_DAY: time::Date = match time::Date::from_ordinal_date(1, 1) {
    Ok(day) => day,
    Err(_) => panic!("1 January of year 1 is a day"),
};

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
    // Year 0 parses (as 1 BC), but no answer may hold a day before year 1.
    date.filter(|date| *date >= FIRST_DAY)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid_input(vec![FieldIssue {
                field: field.into(),
                message: format!(
                    "{text:?} is not a day (YYYY-MM-DD) from 0001-01-01 to 9999-12-31"
                ),
            }])
        })
}

/// A usage cursor as clients see it: the last row's day and name, hex-encoded (opaque to them).
fn usage_cursor_text(cursor: &UsageCursor) -> String {
    format!("{}/{}", cursor.day, cursor.name)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A cursor this endpoint gave, read back.
fn parse_usage_cursor(text: &str) -> Result<UsageCursor, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_cursor",
            "cursor is not one this endpoint gave: pass `next_cursor` as it came",
        )
    };
    // A day, `/` and a name of at most 64 characters.
    if !text.len().is_multiple_of(2) || text.len() > 2 * (10 + 1 + telemetry::MAX_NAME_CHARS) {
        return Err(invalid());
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|at| {
            text.get(at..at + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(invalid)?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let (day, name) = text.split_once('/').ok_or_else(invalid)?;
    let day = parse_day("cursor", Some(day))
        .ok()
        .flatten()
        .ok_or_else(invalid)?;
    if !telemetry::valid_name(name) {
        return Err(invalid());
    }
    Ok(UsageCursor {
        day,
        name: name.to_owned(),
    })
}

/// The caller's telemetry counts per day and event name.
#[utoipa::path(
    get, path = "/v1/analysis/usage", tag = "telemetry",
    security(("bearer" = [])),
    params(UsageParams),
    responses(
        (status = 200, description = "Counts per UTC day (of the events' own time) and name, by day then name: at most 1,000 rows per answer; `next_cursor` asks for the next ones.", body = UsageView),
        (status = 400, description = "`from` or `to` is not a day from 0001-01-01 to 9999-12-31, `from` is after `to`, the range is longer than 92 days, the cursor is not one this endpoint gave (`invalid_cursor`), or a parameter is unknown (`invalid_query`).", body = ErrorBody),
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
    // The default range is the week up to `to`, or as much of it as there is after year 1.
    let from = parse_day("from", params.from.as_deref())?
        .unwrap_or_else(|| (to - time::Duration::days(6)).max(FIRST_DAY));
    let days = (to - from).whole_days();
    if !(0..MAX_USAGE_DAYS).contains(&days) {
        return Err(ApiError::invalid_input(vec![FieldIssue {
            field: "from".into(),
            message: format!("must be on or before `to`, at most {MAX_USAGE_DAYS} days apart"),
        }]));
    }
    let after = params
        .cursor
        .as_deref()
        .map(parse_usage_cursor)
        .transpose()?;
    let page = analysis
        .usage(caller.user_id, from, to, after.as_ref())
        .await?;
    Ok(HttpResponse::Ok().json(UsageView {
        from: from.to_string(),
        to: to.to_string(),
        items: page
            .rows
            .into_iter()
            .map(|(day, name, events)| UsageDay {
                day: day.to_string(),
                name,
                events,
            })
            .collect(),
        next_cursor: page.next.as_ref().map(usage_cursor_text),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usage_cursor_reads_back_as_it_was_given() {
        let cursor = UsageCursor {
            day: time::Date::from_calendar_date(2026, time::Month::December, 8).unwrap(),
            name: "app.open-2_x".into(),
        };
        let text = usage_cursor_text(&cursor);
        assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
        assert_eq!(parse_usage_cursor(&text).unwrap(), cursor);
        let longest = UsageCursor {
            name: format!("a{}", "b".repeat(63)),
            ..cursor
        };
        assert_eq!(
            parse_usage_cursor(&usage_cursor_text(&longest)).unwrap(),
            longest
        );
        for bad in ["", "zz", "0", "2f", &usage_cursor_text(&longest)[2..]] {
            assert_eq!(
                parse_usage_cursor(bad).unwrap_err().code,
                "invalid_cursor",
                "{bad}"
            );
        }
    }

    #[test]
    fn days_are_from_year_1_to_9999() {
        assert_eq!(
            parse_day("to", Some("0001-01-01")).unwrap(),
            Some(FIRST_DAY)
        );
        assert!(parse_day("to", Some("9999-12-31")).unwrap().is_some());
        for bad in [
            "0000-12-31",
            "0000-01-01",
            "+10000-01-01",
            "2026-02-30",
            "2026-W01-1",
        ] {
            let refused = parse_day("to", Some(bad)).unwrap_err();
            assert_eq!(refused.details[0].field, "to", "{bad}");
        }
    }
}
