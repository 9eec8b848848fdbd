//! `cargo xtask up` as a child process, for commands that need the whole system running (the
//! smoke test, load tests): started, awaited until it prints `ready`, stopped with SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::{own_binary, Build, EDGE_PORT};

pub struct RunningUp {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl RunningUp {
    /// Starts `cargo xtask up` built as `build` says, with `env` added to ours; returns once it
    /// is ready. Its output is echoed, indented.
    pub async fn start(build: Build, env: &[(&str, &str)]) -> Result<Self> {
        let mut command = Command::new(own_binary()?);
        command.arg("up");
        match build {
            Build::Release => {
                command.arg("--release");
            }
            Build::AsTests => {
                command.arg("--as-tests");
            }
            Build::Debug => {}
        }
        let mut child = command
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting xtask up")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout of xtask up")?).lines();
        // A cold release build happens inside `up`, hence the generous bound.
        let ready = tokio::time::timeout(Duration::from_secs(1200), async {
            while let Some(line) = lines.next_line().await? {
                println!("  | {line}");
                if line == format!("ready: http://127.0.0.1:{EDGE_PORT}") {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        ensure!(
            matches!(ready, Ok(Ok(true))),
            "`cargo xtask up` never printed ready"
        );
        Ok(Self { child, lines })
    }

    /// Sends SIGTERM and expects a clean exit within 90 s.
    ///
    /// actix-web sends no HTTP/2 GOAWAY on shutdown (actix/actix-web#3169): close idle h2c
    /// connections to the services first, or they hold the drain until its timeout.
    pub async fn stop(mut self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id().context("xtask up pid")? as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let lines = &mut self.lines;
        let child = &mut self.child;
        let status = tokio::time::timeout(Duration::from_secs(90), async {
            while lines.next_line().await.ok().flatten().is_some() {}
            child.wait().await
        })
        .await
        .context("`cargo xtask up` did not stop within 90 s of SIGTERM")??;
        if !status.success() {
            bail!("`cargo xtask up` exited with {status} after SIGTERM");
        }
        Ok(())
    }
}
