//! An HTTP answer read whole (status, protocol, headers, JSON body), the way the API tests check
//! answers, and the operations an OpenAPI document describes.

use std::collections::BTreeSet;

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, Response, Version};
use serde_json::Value;

pub struct Answer {
    pub status: u16,
    pub version: Version,
    pub headers: HeaderMap,
    /// The JSON body; `null` when there is none. A body that is not JSON fails the test.
    pub body: Value,
}

impl Answer {
    /// Sends `request` and reads the answer.
    pub async fn send(request: RequestBuilder) -> Self {
        Self::read(request.send().await.expect("request")).await
    }

    pub async fn read(response: Response) -> Self {
        let status = response.status().as_u16();
        let version = response.version();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}"))
        };
        Self {
            status,
            version,
            headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// `error.code` of an error answer; empty otherwise.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// The field names in `error.details`.
    pub fn invalid_fields(&self) -> BTreeSet<String> {
        self.body["error"]["details"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|issue| issue["field"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// `"METHOD /path"` for every operation in an OpenAPI document.
pub fn openapi_operations(document: &Value) -> BTreeSet<String> {
    document["paths"]
        .as_object()
        .expect("an OpenAPI document has paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|operations| operations.keys())
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect()
}
