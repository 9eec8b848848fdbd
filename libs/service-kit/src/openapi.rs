//! Serving a service's OpenAPI document, and the bearer-token security scheme every service's
//! document declares.

use actix_web::{web, HttpResponse};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

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
