//! Which path and method reach which handler, and the OpenAPI document that describes them.

use service_kit::actix_web::web;
use service_kit::http::{resource, ErrorBody, FieldIssue};
use service_kit::openapi::{document_resource, BearerSecurity};
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
        .service(resource("/v1/live").route(web::get().to(handlers::live)))
        .service(resource("/v1/notifications").route(web::get().to(inbox::list)))
        .service(
            resource("/v1/notifications/unread-count").route(web::get().to(inbox::unread_count)),
        )
        .service(resource("/v1/notifications/read-all").route(web::post().to(inbox::mark_all_read)))
        .service(
            resource("/v1/notifications/preferences")
                .route(web::get().to(inbox::get_preferences))
                .route(web::put().to(inbox::put_preferences)),
        )
        .service(
            resource("/v1/notifications/devices")
                .route(web::get().to(devices::list))
                .route(web::post().to(devices::register)),
        )
        .service(
            resource("/v1/notifications/devices/{id}").route(web::delete().to(devices::delete)),
        )
        .service(resource("/v1/notifications/push-key").route(web::get().to(devices::push_key)))
        .service(resource("/v1/notifications/{id}/read").route(web::post().to(inbox::mark_read)))
        .service(resource("/v1/notifications/{id}").route(web::delete().to(inbox::delete)));
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
    modifiers(&BearerSecurity),
    tags(
        (name = "live", description = "Live updates over WebSocket"),
        (name = "inbox", description = "The user's notifications"),
        (name = "preferences", description = "What is notified, and how"),
        (name = "devices", description = "Web Push subscriptions"),
    )
)]
pub struct ApiDoc;
