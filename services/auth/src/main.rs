//! `auth` serves; `auth migrate` applies the migrations; `auth keygen <dir> <key-id>` writes a new
//! Ed25519 signing key.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("keygen") => keygen(&args[1..]),
        _ => service_kit::run::<auth::Auth>(),
    }
}

/// `auth keygen <dir> <key-id>`: a new signing key for `AUTH_JWT_KEYS_DIR`.
fn keygen(args: &[String]) -> ExitCode {
    let [dir, key_id] = args else {
        eprintln!("usage: auth keygen <dir> <key-id>");
        return ExitCode::from(2);
    };
    match auth::keys::generate(Path::new(dir), key_id) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("auth keygen: {err}");
            ExitCode::FAILURE
        }
    }
}
