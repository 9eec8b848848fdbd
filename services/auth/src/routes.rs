//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::http::{resource, ErrorBody};
use service_kit::openapi::{document_resource, BearerSecurity};
use utoipa::OpenApi;

use crate::api::{
    DeleteAccountRequest, LoginRequest, ProfilePatch, RefreshTokenRequest, SignupRequest,
    TokenResponse, UserProfile,
};
use crate::handlers;

pub fn configure(routes: &mut web::ServiceConfig) {
    routes
        .service(resource("/v1/auth/signup").route(web::post().to(handlers::signup)))
        .service(resource("/v1/auth/login").route(web::post().to(handlers::login)))
        .service(resource("/v1/auth/refresh").route(web::post().to(handlers::refresh)))
        .service(resource("/v1/auth/logout").route(web::post().to(handlers::logout)))
        .service(resource("/v1/auth/jwks").route(web::get().to(handlers::jwks)))
        .service(document_resource(
            "/v1/auth/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(
            resource("/v1/users/me")
                .route(web::get().to(handlers::me))
                .route(web::patch().to(handlers::update_me))
                .route(web::delete().to(handlers::delete_me)),
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
    modifiers(&BearerSecurity),
    tags(
        (name = "accounts", description = "Signup, the caller's profile, account deletion"),
        (name = "sessions", description = "Login, refresh-token rotation, logout"),
        (name = "keys", description = "Public keys for verifying access tokens"),
    )
)]
pub struct ApiDoc;
