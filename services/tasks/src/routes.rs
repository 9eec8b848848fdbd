//! Which path and method reach which handler, and the OpenAPI document that describes them.

use std::sync::OnceLock;

use service_kit::actix_web::{web, HttpResponse};
use service_kit::http::{resource, ErrorBody};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::api::{CreateTask, PatchTask, RevisionPage, RevisionView, TaskPage, TaskView};
use crate::domain::{Priority, RevisionKind, Status};
use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(
            resource("/v1/tasks")
                .route(web::post().to(handlers::create))
                .route(web::get().to(handlers::list)),
        )
        .service(resource("/v1/tasks/openapi.json").route(web::get().to(openapi)))
        .service(
            resource("/v1/tasks/{id}")
                .route(web::get().to(handlers::get))
                .route(web::patch().to(handlers::update))
                .route(web::delete().to(handlers::delete)),
        )
        .service(resource("/v1/tasks/{id}/revisions").route(web::get().to(handlers::revisions)));
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
    modifiers(&BearerAuth),
    tags((name = "tasks", description = "Tasks and their revisions"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// `GET /v1/tasks/openapi.json`, built once.
async fn openapi() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let document = DOCUMENT.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|err| format!("{{\"error\": \"{err}\"}}"))
    });
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document.as_str())
}
