//! Request input as types, parsed once where it enters: text PostgreSQL can store, instants the
//! database and its driver can hold, bodies that are the JSON type the document says, and
//! extractors whose 400 names the field a client got wrong.
//!
//! PostgreSQL refuses `\0` in text and `time` cannot convert an instant past year 9999 to UTC
//! (sqlx's encoding panics on one), so a value that reaches a query must never hold either:
//! [`Text`] and [`Timestamp`] cannot. serde's derived structs also accept a JSON array in place
//! of an object (field by field, in order), so [`Json`] and [`object`] take objects only.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};

use actix_web::dev::Payload;
use actix_web::http::{header, StatusCode};
use actix_web::{web, FromRequest, HttpRequest};
use regex::Regex;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use time::{OffsetDateTime, UtcOffset};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};

use crate::error::{ApiError, FieldIssue};

/// What a [`Text`] refuses, in the words a client reads.
pub const NUL_MESSAGE: &str = "must not contain NUL characters (\\u0000)";

/// A string PostgreSQL can store: any UTF-8 but `\0`. Every text field and text query
/// parameter of the services is one (length and alphabet rules stay with each field).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Text(String);

impl Text {
    /// `text` if it holds no `\0`.
    pub fn parse(text: impl Into<String>) -> Result<Self, &'static str> {
        let text = text.into();
        if text.contains('\0') {
            Err(NUL_MESSAGE)
        } else {
            Ok(Self(text))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Text> for String {
    fn from(text: Text) -> Self {
        text.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Text::parse(String::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

impl utoipa::PartialSchema for Text {
    fn schema() -> RefOr<Schema> {
        // JSON Schema cannot say "no U+0000" short of a pattern; the generators that read the
        // documents (and PostgreSQL) agree that it is no text anyway.
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(NO_NUL_PATTERN))
            .into()
    }
}

impl utoipa::ToSchema for Text {}

/// A JSON Schema pattern for text without control characters (Unicode `Cc`: U+0000–U+001F and
/// U+007F–U+009F) and with at least one character that is not whitespace.
const PRINTABLE_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$";
/// A JSON Schema pattern for text without U+0000.
const NO_NUL_PATTERN: &str = "^[^\\u0000]*$";

/// The rules of one text field, in one place for both its check ([`TextRule::check`], with
/// `validator`, so every broken field of a body is named at once) and its OpenAPI schema
/// ([`TextRule::schema`], with utoipa's `schema_with`), so the two cannot drift apart: a
/// pattern is shown to clients and matched here (with the `regex` crate, whose syntax agrees
/// with JSON Schema's for the classes used). Lengths count characters (Unicode scalar values),
/// as JSON Schema's `minLength` does.
#[derive(Debug, Clone, Copy)]
pub struct TextRule {
    pub min_chars: usize,
    pub max_chars: usize,
    /// No control characters, and not blank.
    pub printable: bool,
    /// A further rule as a regular expression, and what a client reads when it is broken.
    pub pattern: Option<(&'static str, &'static str)>,
}

impl TextRule {
    /// `min_chars` to `max_chars` characters of any text PostgreSQL can store.
    pub const fn any(min_chars: usize, max_chars: usize) -> Self {
        Self {
            min_chars,
            max_chars,
            printable: false,
            pattern: None,
        }
    }

    /// `min_chars` to `max_chars` characters, no control characters, not blank.
    pub const fn printable(min_chars: usize, max_chars: usize) -> Self {
        Self {
            printable: true,
            ..Self::any(min_chars, max_chars)
        }
    }

    /// Adds `pattern` (a regular expression the whole text must match); `message` is the answer
    /// to a text that does not.
    pub const fn matching(self, pattern: &'static str, message: &'static str) -> Self {
        Self {
            pattern: Some((pattern, message)),
            ..self
        }
    }

    /// Whether `text` follows the rule; the error says which part it breaks.
    pub fn check(&self, text: &str) -> Result<(), validator::ValidationError> {
        let invalid = |code: &'static str, message: String| {
            Err(validator::ValidationError::new(code).with_message(message.into()))
        };
        let chars = text.chars().count();
        if chars < self.min_chars || chars > self.max_chars {
            return invalid(
                "length",
                format!(
                    "must be {} to {} characters long",
                    self.min_chars, self.max_chars
                ),
            );
        }
        if text.contains('\0') {
            return invalid("nul", NUL_MESSAGE.to_owned());
        }
        if self.printable && text.chars().any(char::is_control) {
            return invalid(
                "control_characters",
                "must not contain control characters".to_owned(),
            );
        }
        if self.printable && text.trim().is_empty() && self.min_chars > 0 {
            return invalid("blank", "must not be blank".to_owned());
        }
        if let Some((pattern, message)) = self.pattern {
            if !compiled(pattern).is_match(text) {
                return invalid("format", message.to_owned());
            }
        }
        Ok(())
    }

    /// The field's OpenAPI schema: a string with these bounds and pattern, described.
    pub fn schema(&self, description: &str) -> utoipa::openapi::Object {
        self.schema_builder(description).build()
    }

    /// [`Self::schema`] for a field that also takes `null` (to clear it).
    pub fn nullable_schema(&self, description: &str) -> utoipa::openapi::Object {
        self.schema_builder(description)
            .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
                Type::String,
                Type::Null,
            ]))
            .build()
    }

    fn schema_builder(&self, description: &str) -> ObjectBuilder {
        let pattern = match self.pattern {
            Some((pattern, _)) => pattern,
            None if self.printable && self.min_chars > 0 => PRINTABLE_PATTERN,
            None => NO_NUL_PATTERN,
        };
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(self.min_chars))
            .max_length(Some(self.max_chars))
            .pattern(Some(pattern))
            .description(Some(description))
    }
}

/// `pattern` compiled, once per process: patterns are the code's constants, so there are few.
fn compiled(pattern: &str) -> Arc<Regex> {
    static CACHE: OnceLock<RwLock<HashMap<String, Arc<Regex>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(regex) = cache
        .read()
        .ok()
        .and_then(|cache| cache.get(pattern).cloned())
    {
        return regex;
    }
    // A rule's pattern is a constant of the code: one that does not compile is a bug that the
    // rule's own unit test shows.
    let regex = Arc::new(
        Regex::new(pattern)
            .unwrap_or_else(|err| panic!("text rule pattern {pattern:?} does not compile: {err}")),
    );
    if let Ok(mut cache) = cache.write() {
        cache.insert(pattern.to_owned(), regex.clone());
    }
    regex
}

/// A UUID as the documents write it: hyphenated, 36 characters (JSON Schema's `uuid` format).
const UUID_PATTERN: &str =
    "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";

/// `text` as a UUID if it is written as [`uuid_schema`] says (the `uuid` crate also takes the
/// 32-digit, braced and URN forms, which the documents do not offer).
pub fn hyphenated_uuid(text: &str) -> Option<uuid::Uuid> {
    if compiled(UUID_PATTERN).is_match(text) {
        uuid::Uuid::parse_str(text).ok()
    } else {
        None
    }
}

/// The schema of a hyphenated UUID in a parameter (a cursor, say), as [`hyphenated_uuid`]
/// reads it.
pub fn uuid_schema(description: &str) -> utoipa::openapi::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(UUID_PATTERN))
        .description(Some(description))
        .build()
}

/// The earliest instant [`Timestamp`] takes: 0001-01-01T00:00:00Z.
const EARLIEST_YEAR: i32 = 1;
/// The latest year [`Timestamp`] takes, in UTC: what `time` (and so the driver) can represent.
const LATEST_YEAR: i32 = 9999;

/// What a [`Timestamp`] asks for, in the words a client reads.
pub const TIMESTAMP_MESSAGE: &str =
    "must be an RFC 3339 date-time from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z";

/// An RFC 3339 instant within what PostgreSQL and its driver can hold (years 1 to 9999 in UTC),
/// kept in UTC. `9999-12-31T23:59:59-23:59` is valid RFC 3339 but lies in the year 10000 in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// `text` as an instant, if it is RFC 3339 and in range.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let parsed = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map_err(|_| TIMESTAMP_MESSAGE)?;
        Self::new(parsed).ok_or(TIMESTAMP_MESSAGE)
    }

    /// `instant` in UTC, if its UTC year is 1 to 9999.
    pub fn new(instant: OffsetDateTime) -> Option<Self> {
        instant
            .checked_to_offset(UtcOffset::UTC)
            .filter(|utc| (EARLIEST_YEAR..=LATEST_YEAR).contains(&utc.year()))
            .map(Self)
    }

    pub fn get(self) -> OffsetDateTime {
        self.0
    }
}

impl From<Timestamp> for OffsetDateTime {
    fn from(timestamp: Timestamp) -> Self {
        timestamp.0
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        time::serde::rfc3339::serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Timestamp::parse(&text).map_err(de::Error::custom)
    }
}

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

/// For PATCH bodies, with `#[serde(default, deserialize_with = "service_kit::input::nullable")]`
/// on an `Option<Option<T>>` field: absent is `None` (leave it), `null` is `Some(None)` (clear
/// it), a value is `Some(Some(value))`.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

/// For an optional field that cannot be cleared, with `#[serde(default, deserialize_with =
/// "service_kit::input::non_null")]` on an `Option<T>`: absent is `None`, `null` is refused
/// (serde would read it as absent), a value is `Some(value)`.
pub fn non_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// For a whole-number field of a JSON body (`#[serde(deserialize_with =
/// "service_kit::input::whole")]`): takes an integer or a number with no fraction (JSON Schema's
/// `integer` includes `58.0`), within `T`'s range; not a string.
pub fn whole<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    let value = deserializer.deserialize_any(WholeVisitor { from_text: false })?;
    T::try_from(value).map_err(|_| de::Error::custom(format!("{value} is out of range")))
}

/// [`whole`] for a query parameter (whose values are all text): `58` or `58.0`.
pub fn query_whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<i64>,
{
    let value = deserializer.deserialize_any(WholeVisitor { from_text: true })?;
    T::try_from(value)
        .map(Some)
        .map_err(|_| de::Error::custom(format!("{value} is out of range")))
}

struct WholeVisitor {
    from_text: bool,
}

impl Visitor<'_> for WholeVisitor {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a whole number")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<i64, E> {
        Ok(value)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<i64, E> {
        i64::try_from(value).map_err(|_| E::custom(format!("{value} is out of range")))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<i64, E> {
        // Exactly representable and whole: 58.0 is 58; 58.5, NaN or 1e300 are not numbers here.
        if value.fract() == 0.0 && value.abs() < 9_007_199_254_740_992.0 {
            Ok(value as i64)
        } else {
            Err(E::custom(format!("{value} is not a whole number")))
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<i64, E> {
        if !self.from_text {
            return Err(E::invalid_type(de::Unexpected::Str(text), &self));
        }
        match text.parse::<i64>() {
            Ok(value) => Ok(value),
            Err(_) => match text.parse::<f64>() {
                Ok(value) if value.is_finite() => self.visit_f64(value),
                _ => Err(E::custom(format!("{text:?} is not a whole number"))),
            },
        }
    }
}

/// For a field holding a struct: `#[serde(deserialize_with = "service_kit::input::object")]`
/// takes a JSON object only, where serde's derive would also take an array.
pub fn object<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_map(ObjectVisitor(PhantomData))
}

/// [`object`] for an optional field (`null` is `None`); pair it with `#[serde(default)]`.
pub fn optional_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<Object<T>>::deserialize(deserializer).map(|found| found.map(|object| object.0))
}

/// A `T` read from a JSON object only.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        object(deserializer).map(Object)
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map))
    }
}

/// A JSON request body of type `T`, which must be a JSON object: `Content-Type: application/json`
/// (or `+json`), at most the route's `web::PayloadConfig` limit (413 beyond). Anything else is
/// a 400 `invalid_body` whose `details` name the field at fault (`labels[2]`, say).
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<T> Json<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Json<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        body_of::<Object<T>, _>(request, payload, |object| Json(object.0))
    }
}

/// A JSON request body of any JSON type (a top-level array, say), with [`Json`]'s rules
/// otherwise; for bodies a handler checks element by element.
#[derive(Debug)]
pub struct AnyJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for AnyJson<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        body_of::<T, _>(request, payload, AnyJson)
    }
}

fn body_of<B, R>(
    request: &HttpRequest,
    payload: &mut Payload,
    wrap: fn(B) -> R,
) -> Pin<Box<dyn Future<Output = Result<R, ApiError>>>>
where
    B: DeserializeOwned + 'static,
    R: 'static,
{
    if let Err(err) = json_content_type(request) {
        return Box::pin(std::future::ready(Err(err)));
    }
    let bytes = web::Bytes::from_request(request, payload);
    Box::pin(async move {
        let bytes = bytes.await.map_err(|err| {
            let status = err.as_response_error().status_code();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    status,
                    "payload_too_large",
                    "the body is larger than this route takes",
                )
            } else {
                ApiError::new(status, "invalid_body", err.to_string())
            }
        })?;
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize::<_, B>(&mut deserializer).map_err(|err| {
            rejected("invalid_body", "body", &err.path().to_string(), err.inner())
        })?;
        // Whatever follows the value must be whitespace.
        deserializer
            .end()
            .map_err(|err| rejected("invalid_body", "body", ".", &err))?;
        Ok(wrap(value))
    })
}

/// `application/json` or a `+json` type; anything else is a 415.
fn json_content_type(request: &HttpRequest) -> Result<(), ApiError> {
    let mime = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|mime| mime.trim().to_ascii_lowercase());
    match mime.as_deref() {
        Some("application/json") => Ok(()),
        Some(mime) if mime.starts_with("application/") && mime.ends_with("+json") => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        )),
    }
}

/// Query parameters of type `T`; an unknown parameter or a value of the wrong type is a 400
/// `invalid_query` whose `details` name the parameter.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T> Query<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Query<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned> FromRequest for Query<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let query = request.query_string();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        std::future::ready(
            serde_path_to_error::deserialize(deserializer)
                .map(Query)
                .map_err(|err| {
                    rejected(
                        "invalid_query",
                        "query",
                        &err.path().to_string(),
                        err.inner(),
                    )
                }),
        )
    }
}

/// The 400 for input that did not parse: the field from `path` where serde knows it.
fn rejected(code: &'static str, whole: &str, path: &str, err: &dyn fmt::Display) -> ApiError {
    let message = err.to_string();
    let field = if path == "." {
        // serde reports a missing or unknown field at its parent, naming it in backticks.
        named_in(&message)
            .filter(|_| {
                message.starts_with("missing field") || message.starts_with("unknown field")
            })
            .unwrap_or(whole)
    } else {
        path
    }
    .to_owned();
    let mut error = ApiError::bad_request(code, format!("{field}: {message}"));
    error.details = vec![FieldIssue { field, message }];
    error
}

/// The first name in backticks in `message`.
fn named_in(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once('`')?;
    rest.split_once('`').map(|(name, _)| name)
}

/// The longest `Idempotency-Key` a write takes.
pub const IDEMPOTENCY_KEY_MAX: usize = 200;

/// The request's `Idempotency-Key`, if it sent one: 1–[`IDEMPOTENCY_KEY_MAX`] visible ASCII
/// characters, else 400 `invalid_idempotency_key`. What the key covers (which body, for how long)
/// is the route's.
pub fn idempotency_key(request: &HttpRequest) -> Result<Option<&str>, ApiError> {
    let Some(value) = request.headers().get("idempotency-key") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|key| (1..=IDEMPOTENCY_KEY_MAX).contains(&key.len()))
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 200 visible ASCII characters",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Profile {
        nickname: Option<Text>,
        #[serde(default, deserialize_with = "optional_object")]
        window: Option<Window>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Window {
        start: Text,
        end: Text,
    }

    #[test]
    fn whole_numbers_may_be_written_as_numbers_without_a_fraction() {
        #[derive(Deserialize)]
        struct Lead {
            #[serde(deserialize_with = "whole")]
            minutes: u32,
        }
        let lead = |json: &str| serde_json::from_str::<Lead>(json).map(|l| l.minutes);
        assert_eq!(lead(r#"{"minutes": 58}"#).unwrap(), 58);
        assert_eq!(lead(r#"{"minutes": 58.0}"#).unwrap(), 58);
        for bad in [
            r#"{"minutes": 58.5}"#,
            r#"{"minutes": -1}"#,
            r#"{"minutes": "58"}"#,
            r#"{"minutes": 1e300}"#,
        ] {
            assert!(lead(bad).is_err(), "{bad}");
        }
        #[derive(Deserialize)]
        struct Limit {
            #[serde(default, deserialize_with = "query_whole")]
            limit: Option<u32>,
        }
        let query = |text: &str| serde_urlencoded::from_str::<Limit>(text).map(|l| l.limit);
        assert_eq!(query("").unwrap(), None);
        assert_eq!(query("limit=58").unwrap(), Some(58));
        assert_eq!(query("limit=58.0").unwrap(), Some(58));
        assert!(query("limit=ten").is_err());
    }

    #[test]
    fn uuids_are_hyphenated() {
        let id = uuid::Uuid::now_v7();
        assert_eq!(hyphenated_uuid(&id.to_string()), Some(id));
        assert_eq!(hyphenated_uuid(&id.to_string().to_uppercase()), Some(id));
        for other in [
            id.simple().to_string(),
            id.braced().to_string(),
            id.urn().to_string(),
        ] {
            assert_eq!(hyphenated_uuid(&other), None, "{other}");
        }
        assert!(Regex::new(UUID_PATTERN).unwrap().is_match(&id.to_string()));
    }

    #[test]
    fn text_holds_anything_but_nul() {
        assert_eq!(Text::parse("Ada ✨").unwrap().as_str(), "Ada ✨");
        assert_eq!(Text::parse("a\0b"), Err(NUL_MESSAGE));
        let err = serde_json::from_str::<Text>(r#""a\u0000b""#).unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
    }

    #[test]
    fn timestamps_stay_within_what_the_database_holds() {
        let ok = Timestamp::parse("2026-12-06T10:00:00+01:00").unwrap();
        assert_eq!(ok.get().offset(), UtcOffset::UTC);
        assert_eq!(ok.get().hour(), 9);
        assert!(Timestamp::parse("9999-12-31T23:59:59Z").is_ok());
        assert!(Timestamp::parse("0001-01-01T00:00:00Z").is_ok());
        for bad in [
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+00:01",
            "next tuesday",
            "2026-13-01T00:00:00Z",
        ] {
            assert_eq!(Timestamp::parse(bad), Err(TIMESTAMP_MESSAGE), "{bad}");
        }
    }

    #[test]
    fn structs_are_read_from_objects_only() {
        let parse = |json: &str| {
            let mut deserializer = serde_json::Deserializer::from_str(json);
            serde_path_to_error::deserialize::<_, Object<Profile>>(&mut deserializer)
                .map(|object| object.0)
                .map_err(|err| (err.path().to_string(), err.inner().to_string()))
        };
        assert_eq!(
            parse(r#"{"nickname":"Ada","window":{"start":"a","end":"b"}}"#).unwrap(),
            Profile {
                nickname: Some(Text::parse("Ada").unwrap()),
                window: Some(Window {
                    start: Text::parse("a").unwrap(),
                    end: Text::parse("b").unwrap()
                }),
            }
        );
        let (path, message) = parse("[null, null]").unwrap_err();
        assert_eq!(path, ".");
        assert!(message.contains("a JSON object"), "{message}");
        let (path, _) = parse(r#"{"window":["a","b"]}"#).unwrap_err();
        assert_eq!(path, "window");
        let (path, message) = parse(r#"{"window":{"start":"a\u0000","end":"b"}}"#).unwrap_err();
        assert_eq!(
            (path.as_str(), message.contains("NUL")),
            ("window.start", true)
        );
    }
}
