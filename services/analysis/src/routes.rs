//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::error::ErrorBody;
use service_kit::http::resource;
use service_kit::openapi::{document_resource, BearerSecurity, SpineResponses};
use utoipa::OpenApi;

use crate::api::{
    TaskAnalysisList, TaskAnalysisView, TelemetryAccepted, TelemetryEventBody, TimeInStatusView,
    UsageDay, UsageView,
};
use crate::domain::dashboard::{CycleTimes, Dashboard, DayCounts, WeekThroughput};
use crate::domain::model::{AsOf, DueAdherence, Priority, Status};
use crate::domain::telemetry::MAX_BATCH_BYTES;
use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(document_resource(
            "/v1/analysis/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(resource("/v1/analysis/tasks").get(handlers::tasks))
        .service(resource("/v1/analysis/tasks/{id}").get(handlers::task))
        .service(resource("/v1/analysis/me").get(handlers::me))
        .service(resource("/v1/analysis/export").get(handlers::export))
        .service(resource("/v1/analysis/usage").get(handlers::usage))
        .service(
            resource("/v1/telemetry")
                .app_data(web::PayloadConfig::new(MAX_BATCH_BYTES))
                .post(handlers::post_telemetry),
        );
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstream analysis",
        version = "1",
        description = "Analyses of a user's tasks, from read models that analysis builds from \
            task events (so they trail the tasks API by the event delay; `as_of` says which event \
            an answer reflects). Every route needs `Authorization: Bearer <access token>` from \
            auth; a user only ever sees their own tasks. Times come from the events, in UTC; days \
            and ISO weeks are UTC days. Errors are always `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        handlers::task,
        handlers::tasks,
        handlers::me,
        handlers::export,
        handlers::post_telemetry,
        handlers::usage
    ),
    components(schemas(
        TaskAnalysisView,
        TaskAnalysisList,
        TimeInStatusView,
        Dashboard,
        WeekThroughput,
        CycleTimes,
        DayCounts,
        AsOf,
        Status,
        Priority,
        DueAdherence,
        TelemetryEventBody,
        TelemetryAccepted,
        UsageDay,
        UsageView,
        ErrorBody
    )),
    modifiers(&BearerSecurity, &SpineResponses),
    tags(
        (name = "analysis", description = "Per-task and per-user analysis"),
        (name = "telemetry", description = "Client telemetry: ingest and per-day counts")
    )
)]
pub struct ApiDoc;
