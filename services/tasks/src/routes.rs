//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::error::ErrorBody;
use service_kit::http::resource;
use service_kit::openapi::{document_resource, BearerSecurity, SpineResponses};
use utoipa::OpenApi;

use crate::api::{CreateTask, PatchTask, RevisionPage, RevisionView, TaskPage, TaskView};
use crate::domain::{Priority, RevisionKind, Status};
use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(
            resource("/v1/tasks")
                .post(handlers::create)
                .get(handlers::list),
        )
        .service(document_resource(
            "/v1/tasks/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(
            resource("/v1/tasks/{id}")
                .get(handlers::get)
                .patch(handlers::update)
                .delete(handlers::delete),
        )
        .service(resource("/v1/tasks/{id}/revisions").get(handlers::revisions));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstream tasks",
        version = "1",
        description = "A user's tasks with their full history. Every route needs \
            `Authorization: Bearer <access token>` from auth; a user only ever sees their own \
            tasks (another user's task is a 404). Changes need `If-Match` (optimistic \
            concurrency). Answers to writes carry `X-Consistency-Token`: send it back on reads to \
            see your write even while replicas lag. Errors are always \
            `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        handlers::create,
        handlers::list,
        handlers::get,
        handlers::update,
        handlers::delete,
        handlers::revisions,
    ),
    components(schemas(
        CreateTask,
        PatchTask,
        TaskView,
        TaskPage,
        RevisionView,
        RevisionPage,
        Status,
        Priority,
        RevisionKind,
        ErrorBody
    )),
    modifiers(&BearerSecurity, &SpineResponses),
    tags((name = "tasks", description = "Tasks and their revisions"))
)]
pub struct ApiDoc;
