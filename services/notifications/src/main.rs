//! `notifications` serves live updates; `notifications migrate` applies its migrations.

use std::process::ExitCode;

fn main() -> ExitCode {
    service_kit::run::<notifications::NotificationsService>()
}
