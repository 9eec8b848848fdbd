//! Starting the probe service (examples/probe_service.rs), the spine's stand-in for a real
//! service, on the test stack.

use test_support::{ServiceProcess, TestStack};

/// The probe reading from the replica at `reader_port`, with `extra` settings (a name already in
/// the stack's environment takes the value given here), once it reports ready.
pub async fn start_probe(
    stack: &TestStack,
    reader_port: u16,
    label: &str,
    extra: &[(&str, &str)],
) -> ServiceProcess {
    let mut env = stack.service_env_with_reader("postgres", reader_port);
    // Later entries win when the process environment is built, so `extra` overrides.
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    // Cargo builds the package's examples next to its test binaries.
    let binary = test_support::workspace_binary("examples/probe_service");
    let mut probe = ServiceProcess::spawn(binary, &env, &stack.scratch_dir(label));
    probe.wait_ready().await;
    probe
}
