//! The JSON bodies of auth's HTTP API, with their validation rules and OpenAPI schemas.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use crate::domain::rules::{
    self, AVATAR_URL_MAX, NICKNAME_MAX, PASSWORD_MAX, PASSWORD_MIN, USERNAME_MAX, USERNAME_MIN,
};
use crate::domain::{TokenPair, User};

#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    /// 3–30 letters, digits, `_`, `.` or `-`, starting with a letter or digit; case-insensitive
    /// (stored lower-cased).
    #[validate(
        length(min = USERNAME_MIN, max = USERNAME_MAX),
        custom(function = rules::username_alphabet)
    )]
    #[schema(
        min_length = 3,
        max_length = 30,
        pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        example = "ada"
    )]
    pub username: String,
    #[validate(length(min = PASSWORD_MIN, max = PASSWORD_MAX))]
    #[schema(min_length = 8, max_length = 128, format = Password)]
    pub password: String,
    #[validate(length(min = 1, max = NICKNAME_MAX), custom(function = rules::display_text))]
    #[schema(min_length = 1, max_length = 30, example = "Ada")]
    pub nickname: Option<String>,
}

#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[validate(length(min = 1, max = USERNAME_MAX))]
    #[schema(example = "ada")]
    pub username: String,
    #[validate(length(min = 1, max = PASSWORD_MAX))]
    #[schema(format = Password)]
    pub password: String,
}

/// The body of account deletion: the current password, so a stolen access token is not enough.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccountRequest {
    #[validate(length(min = 1, max = PASSWORD_MAX))]
    #[schema(format = Password)]
    pub password: String,
}

/// The body of refresh and logout.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshTokenRequest {
    #[validate(length(min = 1, max = 256))]
    pub refresh_token: String,
}

/// Fields to change; a field left out stays as it is, `null` clears it.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    #[serde(default, deserialize_with = "service_kit::http::nullable")]
    #[validate(length(min = 1, max = NICKNAME_MAX), custom(function = rules::display_text))]
    #[schema(value_type = Option<String>, nullable, min_length = 1, max_length = 30)]
    pub nickname: Option<Option<String>>,
    #[serde(default, deserialize_with = "service_kit::http::nullable")]
    #[validate(length(max = AVATAR_URL_MAX), custom(function = rules::web_url))]
    #[schema(value_type = Option<String>, nullable, max_length = 200, example = "https://cdn.example.com/ada.png")]
    pub avatar_url: Option<Option<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct UserProfile {
    pub id: Uuid,
    pub username: String,
    pub nickname: Option<String>,
    pub avatar_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<User> for UserProfile {
    fn from(user: User) -> Self {
        Self {
            id: user.id,
            username: user.username,
            nickname: user.nickname,
            avatar_url: user.avatar_url,
            created_at: user.created_at,
            updated_at: user.updated_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    /// A JWT (EdDSA) to send as `Authorization: Bearer …`.
    pub access_token: String,
    /// Opaque; exchange it at `/v1/auth/refresh`. Each one works once.
    pub refresh_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    #[schema(example = 900)]
    pub expires_in: u64,
}

impl From<TokenPair> for TokenResponse {
    fn from(pair: TokenPair) -> Self {
        Self {
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
            token_type: "Bearer",
            expires_in: pair.expires_in,
        }
    }
}
