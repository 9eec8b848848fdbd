//! Devices (Web Push subscriptions) and the application server key over HTTP.

use service_kit::access_token::Authenticated;
use service_kit::actix_web::http::StatusCode;
use service_kit::actix_web::{web, HttpResponse};
use service_kit::error::{ApiError, ErrorBody, FieldIssue};
use service_kit::input::Json;
use uuid::Uuid;

use crate::api::{DeviceBody, DeviceList, DeviceView, PushKey};
use crate::domain::devices::{DeviceError, Devices, EndpointPolicy, Subscription};
use crate::domain::push::ServerKey;
use crate::domain::settings::PushSettings;

impl From<DeviceError> for ApiError {
    fn from(err: DeviceError) -> Self {
        let message = err.to_string();
        match err {
            DeviceError::LimitReached(_) => ApiError::conflict("too_many_devices", message),
            DeviceError::NotFound(_) => ApiError::not_found(message),
            DeviceError::PushDisabled => {
                ApiError::new(StatusCode::NOT_IMPLEMENTED, "push_not_configured", message)
            }
            DeviceError::EndpointInUse => ApiError::conflict("endpoint_in_use", message),
            DeviceError::Contended => ApiError::unavailable(message),
            DeviceError::AccountErased(erased) => erased.into(),
            DeviceError::Database(db) => db.into(),
        }
    }
}

/// The devices' settings the handlers check against.
pub struct DeviceRules {
    pub policy: EndpointPolicy,
}

impl DeviceRules {
    pub fn new(settings: &PushSettings) -> Self {
        Self {
            policy: settings.endpoint_policy(),
        }
    }
}

#[utoipa::path(
    post, path = "/v1/notifications/devices", tag = "devices",
    security(("bearer" = [])),
    request_body = DeviceBody,
    description = "Registers the browser's push subscription (`PushSubscription.toJSON()`, as is). \
        The endpoint must be an https URL of a browser's push service (FCM, Mozilla, Apple, \
        Windows) on the default port; addresses and names inside the network are refused. It is \
        kept as parsed (spaces around it dropped, host in lower case), so one URL is one device. \
        Registering an endpoint again updates its keys; an endpoint another account registered \
        moves to this one only with the same keys (the same browser hands out the same \
        subscription), otherwise 409 `endpoint_in_use`.",
    responses(
        (status = 201, description = "A new device.", body = DeviceView),
        (status = 200, description = "Already registered; keys updated.", body = DeviceView),
        (status = 400, description = "A field breaks a rule; `details` names each.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 409, description = "The account has the most devices allowed (`too_many_devices`), \
            or another account has this endpoint with other keys (`endpoint_in_use`).", body = ErrorBody),
        (status = 501, description = "Push is not configured on this server.", body = ErrorBody),
        (status = 503, description = "The database is unavailable, or registrations of this \
            endpoint raced; retry.", body = ErrorBody),
    )
)]
pub async fn register(
    caller: Authenticated,
    devices: web::Data<Devices>,
    rules: web::Data<DeviceRules>,
    body: Json<DeviceBody>,
) -> Result<HttpResponse, ApiError> {
    let subscription = Subscription::parse(
        &body.endpoint,
        &body.keys.p256dh,
        &body.keys.auth,
        &rules.policy,
    )
    .map_err(|problems| {
        ApiError::invalid_input(
            problems
                .into_iter()
                .map(|problem| FieldIssue {
                    field: problem.field.into(),
                    message: problem.message.into(),
                })
                .collect(),
        )
    })?;
    let (device, created) = devices.register(caller.user_id, &subscription).await?;
    let view = DeviceView {
        id: device.id,
        endpoint: device.endpoint,
        created_at: device.created_at,
    };
    let mut answer = if created {
        HttpResponse::Created()
    } else {
        HttpResponse::Ok()
    };
    Ok(answer.json(view))
}

#[utoipa::path(
    get, path = "/v1/notifications/devices", tag = "devices",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The account's devices, oldest first.", body = DeviceList),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn list(
    caller: Authenticated,
    devices: web::Data<Devices>,
) -> Result<HttpResponse, ApiError> {
    let items = devices
        .list(caller.user_id)
        .await?
        .into_iter()
        .map(|device| DeviceView {
            id: device.id,
            endpoint: device.endpoint,
            created_at: device.created_at,
        })
        .collect();
    Ok(HttpResponse::Ok().json(DeviceList { items }))
}

#[utoipa::path(
    delete, path = "/v1/notifications/devices/{id}", tag = "devices",
    security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The device.")),
    responses(
        (status = 204, description = "Deleted; nothing more is pushed to it."),
        (status = 400, description = "The id is not a UUID.", body = ErrorBody),
        (status = 401, description = "Missing or invalid access token.", body = ErrorBody),
        (status = 404, description = "No such device on your account.", body = ErrorBody),
        (status = 503, description = "The database is unavailable; retry.", body = ErrorBody),
    )
)]
pub async fn delete(
    caller: Authenticated,
    devices: web::Data<Devices>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse, ApiError> {
    devices.delete(caller.user_id, id.into_inner()).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    get, path = "/v1/notifications/push-key", tag = "devices",
    description = "The VAPID public key (RFC 8292) browsers subscribe with. Public: no token.",
    responses(
        (status = 200, description = "The key.", body = PushKey),
        (status = 501, description = "Push is not configured on this server.", body = ErrorBody),
    )
)]
pub async fn push_key(key: Option<web::Data<ServerKey>>) -> Result<HttpResponse, ApiError> {
    let key = key.ok_or_else(|| ApiError::from(DeviceError::PushDisabled))?;
    Ok(HttpResponse::Ok()
        .insert_header(("cache-control", "public, max-age=3600"))
        .json(PushKey {
            public_key: key.public_key.clone(),
        }))
}
