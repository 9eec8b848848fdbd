//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::error::ErrorBody;
use service_kit::http::resource;
use service_kit::openapi::{document_resource, BearerSecurity, SpineResponses};
use utoipa::OpenApi;

use crate::api::{
    DeleteAccountRequest, LoginRequest, ProfilePatch, RefreshTokenRequest, SignupRequest,
    TokenResponse, UserProfile,
};
use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(resource("/v1/auth/signup").post(handlers::signup))
        .service(resource("/v1/auth/login").post(handlers::login))
        .service(resource("/v1/auth/refresh").post(handlers::refresh))
        .service(resource("/v1/auth/logout").post(handlers::logout))
        .service(resource("/v1/auth/jwks").get(handlers::jwks))
        .service(document_resource(
            "/v1/auth/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(
            resource("/v1/users/me")
                .get(handlers::me)
                .patch(handlers::update_me)
                .delete(handlers::delete_me),
        );
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstream auth",
        version = "1",
        description = "Accounts, sessions and the keys other services verify access tokens with. \
            Errors are always `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        handlers::signup,
        handlers::login,
        handlers::refresh,
        handlers::logout,
        handlers::me,
        handlers::update_me,
        handlers::delete_me,
        handlers::jwks,
    ),
    components(schemas(
        SignupRequest,
        LoginRequest,
        RefreshTokenRequest,
        ProfilePatch,
        DeleteAccountRequest,
        UserProfile,
        TokenResponse,
        ErrorBody
    )),
    modifiers(&BearerSecurity, &SpineResponses),
    tags(
        (name = "accounts", description = "Signup, the caller's profile, account deletion"),
        (name = "sessions", description = "Login, refresh-token rotation, logout"),
        (name = "keys", description = "Public keys for verifying access tokens"),
    )
)]
pub struct ApiDoc;
