//! The error answer every service gives: a status and `{"error": {"code", "message",
//! "details"}}`. It depends on nothing else in the spine; each module whose errors reach clients
//! (the database, worker pools, access tokens) says here, once, how they read.

use std::fmt;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// An error as clients see it: a status and `{"error": {"code": "...", "message": "..."}}`, with
/// `details` naming each invalid field when the input broke several rules.
///
/// Each service maps its domain errors into this type, so the wire format lives here only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldIssue>,
    headers: Vec<(header::HeaderName, String)>,
}

/// One invalid input field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldIssue {
    pub field: String,
    pub message: String,
}

/// The body of every error answer, as the OpenAPI documents describe it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_input`, `unauthorized`, `rate_limited`, ...
    pub code: String,
    /// For people: what is wrong and, where it helps, what to do.
    pub message: String,
    /// Present on `invalid_input`: every field that broke a rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldIssue>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Adds `Retry-After`, for 429 and 503 answers.
    pub fn retry_after(self, secs: u64) -> Self {
        self.with_header(header::RETRY_AFTER, secs.max(1).to_string())
    }

    /// Sets a header on the answer (replacing an earlier value of the same header).
    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.retain(|(existing, _)| *existing != name);
        self.headers.push((name, value.into()));
        self
    }

    pub fn header(&self, name: &header::HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_input` naming every field in `details`.
    pub fn invalid_input(details: Vec<FieldIssue>) -> Self {
        let message = details
            .iter()
            .map(|issue| format!("{}: {}", issue.field, issue.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            details,
            ..Self::bad_request("invalid_input", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 401 with `WWW-Authenticate: Bearer`, as RFC 6750 asks.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    pub fn too_many_requests(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            .retry_after(retry_after_secs)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }

    /// A fault on our side; the message is logged, never sent: it may name internals.
    pub fn internal(message: impl fmt::Display) -> Self {
        tracing::error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on our side; it has been logged",
        )
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        for (name, value) in &self.headers {
            response.insert_header((name.clone(), value.as_str()));
        }
        let mut error = json!({ "code": self.code, "message": self.message });
        if !self.details.is_empty() {
            error["details"] = json!(self.details);
        }
        response.json(json!({ "error": error }))
    }
}

impl From<validator::ValidationErrors> for ApiError {
    fn from(errors: validator::ValidationErrors) -> Self {
        let mut details: Vec<FieldIssue> = errors
            .field_errors()
            .into_iter()
            .flat_map(|(field, issues)| {
                issues.iter().map(move |issue| FieldIssue {
                    field: field.to_string(),
                    message: issue
                        .message
                        .as_ref()
                        .map_or_else(|| describe(issue), |m| m.to_string()),
                })
            })
            .collect();
        // HashMap order is arbitrary; answers should not be.
        details.sort_by(|a, b| a.field.cmp(&b.field));
        Self::invalid_input(details)
    }
}

/// Words for a rule without its own message; `length` names its bounds.
fn describe(issue: &validator::ValidationError) -> String {
    let bound = |name: &str| issue.params.get(name).map(|value| value.to_string());
    match (&*issue.code, bound("min"), bound("max")) {
        ("length", Some(min), Some(max)) => format!("must be {min} to {max} characters long"),
        ("length", Some(min), None) => format!("must be at least {min} characters long"),
        ("length", None, Some(max)) => format!("must be at most {max} characters long"),
        (code, _, _) => format!("breaks the rule `{code}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::to_bytes;

    #[actix_web::test]
    async fn api_error_has_the_documented_body_and_retry_after() {
        let response = ApiError::unavailable("try later").error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let body = to_bytes(response.into_body()).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({ "error": { "code": "unavailable", "message": "try later" } })
        );
    }
}
