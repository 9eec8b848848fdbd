//! HTTP handlers: decode and check the request, call the domain, shape the answer. Domain
//! errors become HTTP answers in one place, `From<AuthError> for ApiError` below.

use service_kit::access_token::Authenticated;
use service_kit::actix_web::http::{header, StatusCode};
use service_kit::actix_web::{web, HttpRequest, HttpResponse};
use service_kit::error::{ApiError, ErrorBody};
use service_kit::http::{client_ip, ReadAfter, Written};
use service_kit::input::{Json, Text};
use validator::Validate;

use crate::api::{
    DeleteAccountRequest, LoginRequest, ProfilePatch, RefreshTokenRequest, SignupRequest,
    TokenResponse, UserProfile,
};
use crate::domain::{Accounts, AuthError, NewAccount, ProfileChange};

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        let message = err.to_string();
        match err {
            AuthError::UsernameTaken(_) => ApiError::conflict("username_taken", message),
            AuthError::InvalidCredentials => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", message)
            }
            AuthError::RateLimited(wait) => {
                ApiError::too_many_requests(message, wait.as_secs_f64().ceil() as u64)
            }
            AuthError::RefreshTokenInvalid => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_refresh_token", message)
            }
            AuthError::RefreshTokenReused => {
                ApiError::new(StatusCode::UNAUTHORIZED, "refresh_token_reused", message)
            }
            AuthError::AccountGone => ApiError::not_found(message),
            AuthError::Busy(busy) => busy.into(),
            AuthError::Database(db) => db.into(),
            AuthError::Signing(_) | AuthError::Hashing(_) => ApiError::internal(message),
        }
    }
}

/// Create an account.
#[utoipa::path(
    post, path = "/v1/auth/signup", tag = "accounts",
    request_body = SignupRequest,
    responses(
        (status = 201, description = "Account created.", body = UserProfile, headers(
            ("x-consistency-token" = String, description = "Send it back on reads to see this write."),
            ("location" = String, description = "/v1/users/me"))),
        (status = 400, description = "A field breaks a rule; `details` names each.", body = ErrorBody),
        (status = 409, description = "The username is taken.", body = ErrorBody),
        (status = 503, description = "Busy hashing passwords; retry after `Retry-After`.", body = ErrorBody),
    )
)]
pub async fn signup(
    request: HttpRequest,
    accounts: web::Data<Accounts>,
    body: Json<SignupRequest>,
) -> Result<Written<HttpResponse>, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    let (user, written_at) = accounts
        .signup(
            NewAccount {
                username: body.username.into(),
                password: body.password.into(),
                nickname: body.nickname.map(String::from),
            },
            client_ip(&request),
        )
        .await?;
    let answer = HttpResponse::Created()
        .insert_header((header::LOCATION, "/v1/users/me"))
        .json(UserProfile::from(user));
    Ok(Written::new(answer, written_at))
}

/// Exchange a username and password for a token pair.
#[utoipa::path(
    post, path = "/v1/auth/login", tag = "sessions",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in.", body = TokenResponse),
        (status = 400, description = "Malformed input.", body = ErrorBody),
        (status = 401, description = "Wrong username or password (the same answer for both).", body = ErrorBody),
        (status = 429, description = "Too many attempts for this username or client; see `Retry-After`.", body = ErrorBody),
        (status = 503, description = "Busy hashing passwords; retry after `Retry-After`.", body = ErrorBody),
    )
)]
pub async fn login(
    request: HttpRequest,
    accounts: web::Data<Accounts>,
    body: Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    let pair = accounts
        .login(&body.username, body.password.into(), client_ip(&request))
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(TokenResponse::from(pair)))
}

/// Exchange a refresh token for a new pair; the presented token stops working. Presenting a
/// token that was already exchanged revokes the whole session.
#[utoipa::path(
    post, path = "/v1/auth/refresh", tag = "sessions",
    request_body = RefreshTokenRequest,
    responses(
        (status = 200, description = "A new pair.", body = TokenResponse),
        (status = 400, description = "Malformed input.", body = ErrorBody),
        (status = 401, description = "`invalid_refresh_token` (unknown, expired or revoked) or `refresh_token_reused` (session now revoked).", body = ErrorBody),
    )
)]
pub async fn refresh(
    accounts: web::Data<Accounts>,
    body: Json<RefreshTokenRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    let pair = accounts.refresh(&body.refresh_token).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(TokenResponse::from(pair)))
}

/// End the session of a refresh token (every token of it stops working). Access tokens already
/// issued stay valid until they expire.
#[utoipa::path(
    post, path = "/v1/auth/logout", tag = "sessions",
    request_body = RefreshTokenRequest,
    responses(
        (status = 204, description = "The session is over (also when it already was)."),
        (status = 400, description = "Malformed input.", body = ErrorBody),
    )
)]
pub async fn logout(
    accounts: web::Data<Accounts>,
    body: Json<RefreshTokenRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    accounts.logout(&body.refresh_token).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The caller's account.
#[utoipa::path(
    get, path = "/v1/users/me", tag = "accounts",
    security(("bearer" = [])),
    params(("x-consistency-token" = Option<String>, Header, nullable = false, pattern = "^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$", description = "From an earlier write: the answer reflects it.")),
    responses(
        (status = 200, description = "The account.", body = UserProfile),
        (status = 400, description = "Malformed consistency token.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 404, description = "The account no longer exists.", body = ErrorBody),
    )
)]
pub async fn me(
    caller: Authenticated,
    read_after: ReadAfter,
    accounts: web::Data<Accounts>,
) -> Result<HttpResponse, ApiError> {
    let user = accounts.profile(caller.user_id, read_after.0).await?;
    Ok(HttpResponse::Ok().json(UserProfile::from(user)))
}

/// Change the caller's nickname or avatar URL.
#[utoipa::path(
    patch, path = "/v1/users/me", tag = "accounts",
    security(("bearer" = [])),
    request_body = ProfilePatch,
    responses(
        (status = 200, description = "The account as changed.", body = UserProfile, headers(
            ("x-consistency-token" = String, description = "Send it back on reads to see this write."))),
        (status = 400, description = "A field breaks a rule; `details` names each.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 404, description = "The account no longer exists.", body = ErrorBody),
    )
)]
pub async fn update_me(
    caller: Authenticated,
    accounts: web::Data<Accounts>,
    body: Json<ProfilePatch>,
) -> Result<Written<HttpResponse>, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    let change = ProfileChange {
        nickname: body.nickname.map(|nickname| nickname.map(String::from)),
        // Stored as parsed (normal form), not as sent; checked above, so it parses.
        avatar_url: body
            .avatar_url
            .map(|url| url.map(|url| normal_url(&url)).transpose())
            .transpose()?,
    };
    let (user, written_at) = accounts.update_profile(caller.user_id, change).await?;
    Ok(Written::new(
        HttpResponse::Ok().json(UserProfile::from(user)),
        written_at,
    ))
}

/// Delete the caller's account. The current password is required: a stolen access token alone
/// is not enough. Every session ends, the account's access tokens are refused by every service
/// within seconds, and every service erases what it holds of the user (through `user.deleted`
/// on `auth.user.v1`). The username is free again afterwards.
#[utoipa::path(
    delete, path = "/v1/users/me", tag = "accounts",
    security(("bearer" = [])),
    request_body = DeleteAccountRequest,
    responses(
        (status = 204, description = "The account is deleted."),
        (status = 400, description = "A field breaks a rule; `details` names each.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token (`invalid_token`), or a wrong password (`invalid_credentials`): nothing was deleted.", body = ErrorBody),
        (status = 404, description = "The account no longer exists.", body = ErrorBody),
        (status = 429, description = "Too many wrong passwords for this account or client; see `Retry-After`.", body = ErrorBody),
        (status = 503, description = "Busy hashing passwords; retry after `Retry-After`.", body = ErrorBody),
    )
)]
pub async fn delete_me(
    request: HttpRequest,
    caller: Authenticated,
    accounts: web::Data<Accounts>,
    body: Json<DeleteAccountRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    body.validate()?;
    accounts
        .delete_account(caller.user_id, body.password.into(), client_ip(&request))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// `url` in the normal form the `url` crate gives it.
fn normal_url(url: &Text) -> Result<String, ApiError> {
    crate::domain::rules::web_url(url)
        .map(String::from)
        .map_err(|_| ApiError::bad_request("invalid_input", "avatar_url: not a URL"))
}

/// The public keys access tokens are signed with (JWKS, RFC 7517), for verifying them locally.
#[utoipa::path(
    get, path = "/v1/auth/jwks", tag = "keys",
    responses((status = 200, description = "Every published key (Ed25519, `kid` as in the token header).", content_type = "application/json"))
)]
pub async fn jwks(accounts: web::Data<Accounts>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .json(accounts.jwks())
}
