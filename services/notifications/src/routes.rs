//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::error::{ErrorBody, FieldIssue};
use service_kit::http::resource;
use service_kit::openapi::{document_resource, BearerSecurity, SpineResponses};
use utoipa::OpenApi;

use crate::api;
use crate::handlers::{self, devices, inbox};

pub fn configure(routes: &mut web::ServiceConfig) {
    // The fixed paths before `/v1/notifications/{id}`.
    routes
        .service(document_resource(
            "/v1/notifications/openapi.json",
            ApiDoc::openapi(),
        ))
        .service(resource("/v1/live").get(handlers::live))
        .service(resource("/v1/notifications").get(inbox::list))
        .service(resource("/v1/notifications/unread-count").get(inbox::unread_count))
        .service(resource("/v1/notifications/read-all").post(inbox::mark_all_read))
        .service(
            resource("/v1/notifications/preferences")
                .get(inbox::get_preferences)
                .put(inbox::put_preferences),
        )
        .service(
            resource("/v1/notifications/devices")
                .get(devices::list)
                .post(devices::register),
        )
        .service(resource("/v1/notifications/devices/{id}").delete(devices::delete))
        .service(resource("/v1/notifications/push-key").get(devices::push_key))
        .service(resource("/v1/notifications/{id}/read").post(inbox::mark_read))
        .service(resource("/v1/notifications/{id}").delete(inbox::delete));
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "taskstream notifications",
        version = "1",
        description = "Live updates, the inbox, preferences and Web Push devices.\n\n\
            Live: one WebSocket per device carries a small frame for every change to the user's \
            tasks and every new notification, in order, with a per-user sequence number; a \
            device that reconnects with its last `seq` gets exactly what it missed, from any \
            instance.\n\n\
            Reminders: every open task with a due date gets a \"due soon\" notification (the \
            user's lead time before it, default 1 hour) and an \"overdue\" one at it, each once; \
            they land in the inbox, as a live frame `notification.created`, and as a Web Push \
            to each registered device when the user's preferences say `push`.\n\n\
            Errors are `{\"error\": {\"code\", \"message\", \"details\"?}}`."
    ),
    paths(
        handlers::live,
        inbox::list,
        inbox::unread_count,
        inbox::mark_read,
        inbox::mark_all_read,
        inbox::delete,
        inbox::get_preferences,
        inbox::put_preferences,
        devices::register,
        devices::list,
        devices::delete,
        devices::push_key,
    ),
    components(schemas(
        ErrorBody,
        FieldIssue,
        api::NotificationView,
        api::NotificationPage,
        api::UnreadCount,
        api::PreferencesBody,
        api::QuietHoursBody,
        api::DeliveryName,
        api::DeviceBody,
        api::DeviceKeys,
        api::DeviceView,
        api::DeviceList,
        api::PushKey,
    )),
    modifiers(&BearerSecurity, &SpineResponses),
    tags(
        (name = "live", description = "Live updates over WebSocket"),
        (name = "inbox", description = "The user's notifications"),
        (name = "preferences", description = "What is notified, and how"),
        (name = "devices", description = "Web Push subscriptions"),
    )
)]
pub struct ApiDoc;
