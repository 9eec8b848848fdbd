//! `doctor`: audits rendered Kubernetes manifests (`doctor manifests <dir>`) or a live cluster
//! (`doctor cluster`) for the deployment mistakes that hurt at scale.

use std::process::ExitCode;

const USAGE: &str = "usage: doctor <manifests DIR | cluster>";

fn main() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}
