//! The JSON bodies of auth's HTTP API, with their validation rules and OpenAPI schemas.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use service_kit::input::Text;
use utoipa::openapi::Object;

use crate::domain::rules::{
    self, AVATAR_URL, LOGIN_USERNAME, NEW_PASSWORD, NICKNAME, PASSWORD, REFRESH_TOKEN, USERNAME,
};
use crate::domain::{TokenPair, User};

#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    #[validate(custom(function = rules::username))]
    #[schema(schema_with = username_schema)]
    pub username: Text,
    #[validate(custom(function = rules::new_password))]
    #[schema(schema_with = new_password_schema)]
    pub password: Text,
    #[validate(custom(function = rules::nickname))]
    #[schema(schema_with = nullable_nickname_schema)]
    pub nickname: Option<Text>,
}

#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[validate(custom(function = rules::login_username))]
    #[schema(schema_with = login_username_schema)]
    pub username: Text,
    #[validate(custom(function = rules::password))]
    #[schema(schema_with = password_schema)]
    pub password: Text,
}

/// The body of account deletion: the current password, so a stolen access token is not enough.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteAccountRequest {
    #[validate(custom(function = rules::password))]
    #[schema(schema_with = password_schema)]
    pub password: Text,
}

/// The body of refresh and logout.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshTokenRequest {
    #[validate(custom(function = rules::refresh_token))]
    #[schema(schema_with = refresh_token_schema)]
    pub refresh_token: Text,
}

/// Fields to change; a field left out stays as it is, `null` clears it.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfilePatch {
    #[serde(default, deserialize_with = "service_kit::input::nullable")]
    #[validate(custom(function = rules::nickname))]
    #[schema(schema_with = nullable_nickname_schema)]
    pub nickname: Option<Option<Text>>,
    #[serde(default, deserialize_with = "service_kit::input::nullable")]
    #[validate(custom(function = rules::avatar_url))]
    #[schema(schema_with = nullable_avatar_url_schema)]
    pub avatar_url: Option<Option<Text>>,
}

fn username_schema() -> Object {
    USERNAME.schema(
        "3–30 letters, digits, `_`, `.` or `-`, starting with a letter or digit; case-insensitive \
         (stored lower-cased).",
    )
}

fn login_username_schema() -> Object {
    LOGIN_USERNAME.schema("The username, in any case.")
}

fn new_password_schema() -> Object {
    NEW_PASSWORD.schema("8–128 characters.")
}

fn password_schema() -> Object {
    PASSWORD.schema("The account's password.")
}

fn nullable_nickname_schema() -> Object {
    NICKNAME.nullable_schema("1–30 characters, printable, not blank; `null` for none.")
}

fn nullable_avatar_url_schema() -> Object {
    AVATAR_URL.nullable_schema(
        "An absolute http(s) URL with a host name and a path, at most 200 characters, such as \
         `https://cdn.example.com/ada.png`; stored in normal form; `null` for none.",
    )
}

fn refresh_token_schema() -> Object {
    REFRESH_TOKEN.schema("The refresh token of a login or an earlier refresh.")
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
