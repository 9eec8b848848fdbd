//! Serving a service's OpenAPI document, the bearer-token security scheme every service's
//! document declares, and the error answers the spine gives on any route ([`SpineResponses`]).

use actix_web::{web, HttpResponse};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::PartialSchema;

use crate::error::ErrorBody;

use crate::http::{resource, Routes};

/// Adds the `bearer` scheme (auth's JWT access tokens); use as `modifiers(&BearerSecurity)` and
/// `security(("bearer" = []))` on the operations that need a token.
pub struct BearerSecurity;

impl utoipa::Modify for BearerSecurity {
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

/// Adds to every operation the answers the spine itself may give, where the operation does
/// not describe them already, so a client (and a schema-driven fuzzer) finds every status it can
/// get documented: 400 for a malformed parameter or body, 401 when the operation needs a token,
/// 413 and 415 for a body too large or not JSON, 503 with `Retry-After` when a dependency is
/// away or the service is busy (and for a handler past its time limit). Use it as
/// `modifiers(&BearerSecurity, &SpineResponses)`.
pub struct SpineResponses;

impl utoipa::Modify for SpineResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components
            .schemas
            .entry("ErrorBody".to_owned())
            .or_insert_with(ErrorBody::schema);
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                add_spine_answers(operation);
            }
        }
    }
}

fn add_spine_answers(operation: &mut Operation) {
    let needs_token = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    let has_body = operation.request_body.is_some();
    let has_parameters = operation
        .parameters
        .as_ref()
        .is_some_and(|parameters| !parameters.is_empty());
    let mut answers = vec![(
        "503",
        "The service is busy, a dependency it needs is away, or the request took too long: nothing was done; retry after `Retry-After`.",
    )];
    if has_parameters || has_body {
        answers.push((
            "400",
            "A parameter or the body breaks a rule; `details` names the field.",
        ));
    }
    if needs_token {
        answers.push(("401", "Missing, invalid or expired access token."));
    }
    if has_body {
        answers.push(("413", "The body is larger than this operation takes."));
        answers.push(("415", "The body is not sent as `application/json`."));
    }
    for (status, description) in answers {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| {
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build(),
                )
            });
    }
}

/// `GET <path>` answering `document` as JSON, serialized once when the route is registered.
pub fn document_resource(path: &str, document: utoipa::openapi::OpenApi) -> Routes {
    let json = web::Bytes::from(document.to_json().unwrap_or_else(|err| {
        tracing::error!(error = %err, "cannot serialize the OpenAPI document");
        "{}".to_owned()
    }));
    resource(path).get(move || {
        let json = json.clone();
        async move {
            HttpResponse::Ok()
                .content_type("application/json")
                .body(json)
        }
    })
}
