//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::http::{resource, ErrorBody};
use service_kit::openapi::{document_resource, BearerSecurity};
use utoipa::OpenApi;

use crate::api::{TaskAnalysisList, TaskAnalysisView, TimeInStatusView};
use crate::domain::dashboard::{CycleTimes, Dashboard, DayCounts, WeekThroughput};
use crate::domain::model::{AsOf, DueAdherence, Priority, Status};
use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(document_resource(
            "/v1/analysis/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(resource("/v1/analysis/tasks").route(web::get().to(handlers::tasks)))
        .service(resource("/v1/analysis/tasks/{id}").route(web::get().to(handlers::task)))
        .service(resource("/v1/analysis/me").route(web::get().to(handlers::me)))
        .service(resource("/v1/analysis/export").route(web::get().to(handlers::export)));
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
    paths(handlers::task, handlers::tasks, handlers::me, handlers::export),
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
        ErrorBody
    )),
    modifiers(&BearerSecurity),
    tags((name = "analysis", description = "Per-task and per-user analysis"))
)]
pub struct ApiDoc;
