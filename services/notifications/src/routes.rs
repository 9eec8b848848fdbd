//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::http::{resource, ErrorBody};
use service_kit::openapi::document_resource;
use utoipa::OpenApi;

use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(document_resource(
            "/v1/notifications/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(resource("/v1/live").route(web::get().to(handlers::live)));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstream notifications",
        version = "1",
        description = "Live updates: one WebSocket per device carries a small frame for every \
            change to the user's tasks, in order, with a per-user sequence number; a device that \
            reconnects with its last `seq` gets exactly what it missed, from any instance. \
            Errors before the upgrade are `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(handlers::live),
    components(schemas(ErrorBody)),
    tags((name = "live", description = "Live updates over WebSocket"))
)]
pub struct ApiDoc;
