//! `tasks` serves the tasks API; `tasks migrate` applies its migrations.

use std::process::ExitCode;

fn main() -> ExitCode {
    service_kit::run::<tasks::TasksService>()
}
