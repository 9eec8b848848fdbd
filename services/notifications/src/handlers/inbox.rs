//! The inbox and the preferences over HTTP. Domain errors become answers in one place each,
//! the `From` impls below.

use service_kit::access_token::Authenticated;
use service_kit::actix_web::{web, HttpResponse};
use service_kit::error::{ApiError, ErrorBody, FieldIssue};
use service_kit::input::{hyphenated_uuid, Json, Query, Text};
use uuid::Uuid;

use crate::api::{
    DeliveryName, InboxParams, NotificationPage, NotificationView, PreferencesBody, QuietHoursBody,
    UnreadCount, PAGE_DEFAULT, PAGE_MAX,
};
use crate::domain::inbox::{Inbox, InboxError};
use crate::domain::preferences::{
    format_time, Delivery, Preferences, PreferencesStore, QuietHours, SaveError, LEAD_MINUTES_MAX,
    LEAD_MINUTES_MIN,
};

impl From<InboxError> for ApiError {
    fn from(err: InboxError) -> Self {
        match err {
            InboxError::NotFound(_) => ApiError::not_found(err.to_string()),
            InboxError::AccountErased(erased) => erased.into(),
            InboxError::Database(db) => db.into(),
        }
    }
}

/// The user's notifications, newest first.
#[utoipa::path(
    get, path = "/v1/notifications", tag = "inbox",
    security(("bearer" = [])),
    params(InboxParams),
    responses(
        (status = 200, description = "A page, with the unread count.", body = NotificationPage),
        (status = 400, description = "A bad cursor or limit.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn list(
    caller: Authenticated,
    inbox: web::Data<Inbox>,
    params: Query<InboxParams>,
) -> Result<HttpResponse, ApiError> {
    let limit = params.limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid_input(vec![FieldIssue {
            field: "limit".into(),
            message: format!("must be between 1 and {PAGE_MAX}"),
        }]));
    }
    let before = match &params.cursor {
        None => None,
        Some(cursor) => Some(hyphenated_uuid(cursor).ok_or_else(|| {
            ApiError::bad_request("invalid_cursor", "cursor must be a next_cursor of this API")
        })?),
    };
    let page = inbox
        .page(
            caller.user_id,
            before,
            params.unread.unwrap_or(false),
            limit,
        )
        .await?;
    Ok(HttpResponse::Ok().json(NotificationPage {
        items: page
            .items
            .into_iter()
            .map(|row| NotificationView {
                id: row.id,
                kind: row.kind,
                task_id: row.task_id,
                title: row.title,
                body: row.body,
                created_at: row.created_at,
                read: row.read,
            })
            .collect(),
        next_cursor: page.next.map(|id| id.to_string()),
        unread_count: page.unread,
    }))
}

#[utoipa::path(
    get, path = "/v1/notifications/unread-count", tag = "inbox",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "How many notifications are unread.", body = UnreadCount),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn unread_count(
    caller: Authenticated,
    inbox: web::Data<Inbox>,
) -> Result<HttpResponse, ApiError> {
    let unread_count = inbox.unread(caller.user_id).await?;
    Ok(HttpResponse::Ok().json(UnreadCount { unread_count }))
}

#[utoipa::path(
    post, path = "/v1/notifications/{id}/read", tag = "inbox",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The notification.")),
    responses(
        (status = 200, description = "Marked read; the unread count after it.", body = UnreadCount),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 404, description = "No such notification in your inbox.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn mark_read(
    caller: Authenticated,
    inbox: web::Data<Inbox>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    let unread_count = inbox.mark_read(caller.user_id, id.into_inner()).await?;
    Ok(HttpResponse::Ok().json(UnreadCount { unread_count }))
}

#[utoipa::path(
    post, path = "/v1/notifications/read-all", tag = "inbox",
    security(("bearer" = [])),
    description = "Marks everything in the inbox read with one write, whatever its size.",
    responses(
        (status = 200, description = "The unread count after it (0 unless one just arrived).", body = UnreadCount),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn mark_all_read(
    caller: Authenticated,
    inbox: web::Data<Inbox>,
) -> Result<HttpResponse, ApiError> {
    let unread_count = inbox.mark_all_read(caller.user_id).await?;
    Ok(HttpResponse::Ok().json(UnreadCount { unread_count }))
}

#[utoipa::path(
    delete, path = "/v1/notifications/{id}", tag = "inbox",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The notification.")),
    responses(
        (status = 204, description = "Deleted (with any push of it not yet sent)."),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 404, description = "No such notification in your inbox.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn delete(
    caller: Authenticated,
    inbox: web::Data<Inbox>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    inbox.delete(caller.user_id, id.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}

fn to_name(delivery: Delivery) -> DeliveryName {
    match delivery {
        Delivery::Push => DeliveryName::Push,
        Delivery::Inbox => DeliveryName::Inbox,
        Delivery::Off => DeliveryName::Off,
    }
}

fn from_name(name: DeliveryName) -> Delivery {
    match name {
        DeliveryName::Push => Delivery::Push,
        DeliveryName::Inbox => Delivery::Inbox,
        DeliveryName::Off => Delivery::Off,
    }
}

fn preferences_body(preferences: &Preferences) -> PreferencesBody {
    PreferencesBody {
        due_soon: to_name(preferences.due_soon),
        overdue: to_name(preferences.overdue),
        reminder_lead_minutes: preferences.lead_minutes().unsigned_abs(),
        quiet_hours: preferences
            .quiet_hours
            .as_ref()
            .map(|quiet| QuietHoursBody {
                // Written by this service, from values it parsed: never a NUL.
                start: Text::parse(format_time(quiet.start)).unwrap_or_default(),
                end: Text::parse(format_time(quiet.end)).unwrap_or_default(),
                time_zone: Text::parse(quiet.time_zone.clone()).unwrap_or_default(),
            }),
    }
}

#[utoipa::path(
    get, path = "/v1/notifications/preferences", tag = "preferences",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The user's preferences (the defaults until changed).", body = PreferencesBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn get_preferences(
    caller: Authenticated,
    store: web::Data<PreferencesStore>,
) -> Result<HttpResponse, ApiError> {
    let preferences = store.get(caller.user_id).await?;
    Ok(HttpResponse::Ok().json(preferences_body(&preferences)))
}

#[utoipa::path(
    put, path = "/v1/notifications/preferences", tag = "preferences",
    security(("bearer" = [])),
    request_body = PreferencesBody,
    description = "Replaces the preferences. A new lead time moves the pending \"due soon\" \
        reminders at once; quiet hours hold pushes made during them until they end.",
    responses(
        (status = 200, description = "Saved.", body = PreferencesBody),
        (status = 400, description = "A field breaks a rule; `details` names each.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn put_preferences(
    caller: Authenticated,
    store: web::Data<PreferencesStore>,
    body: Json<PreferencesBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let mut issues = Vec::new();
    if !(LEAD_MINUTES_MIN..=LEAD_MINUTES_MAX).contains(&body.reminder_lead_minutes) {
        issues.push(FieldIssue {
            field: "reminder_lead_minutes".into(),
            message: format!("must be between {LEAD_MINUTES_MIN} and {LEAD_MINUTES_MAX}"),
        });
    }
    let quiet_hours = match &body.quiet_hours {
        None => None,
        Some(quiet) => match QuietHours::new(&quiet.start, &quiet.end, &quiet.time_zone) {
            Ok(quiet) => Some(quiet),
            Err(message) => {
                issues.push(FieldIssue {
                    field: "quiet_hours".into(),
                    message: message.into(),
                });
                None
            }
        },
    };
    if !issues.is_empty() {
        return Err(ApiError::invalid_input(issues));
    }
    let preferences = Preferences {
        due_soon: from_name(body.due_soon),
        overdue: from_name(body.overdue),
        reminder_lead: std::time::Duration::from_secs(u64::from(body.reminder_lead_minutes) * 60),
        quiet_hours,
    };
    store
        .save(caller.user_id, &preferences)
        .await
        .map_err(|err| match err {
            SaveError::AccountErased(erased) => ApiError::from(erased),
            SaveError::Database(db) => ApiError::from(db),
        })?;
    Ok(HttpResponse::Ok().json(preferences_body(&preferences)))
}
