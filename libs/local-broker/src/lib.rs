//! A throwaway Kafka-protocol broker on loopback: the static `tansu` binary with memory storage
//! (see the README's broker notes), for `cargo xtask up/test` and for tests that need a broker of
//! their own. Pausing it (SIGSTOP) is how an outage is simulated: a restart would empty it.
//! Topics are created with the broker's own CLI, so the developer tools that start a broker need
//! no Kafka client library (and no C toolchain to build one).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use local_postgres::{stop_child, supervise, PgInstall};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the broker may take to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A broker we started; stopped when dropped.
pub struct LocalBroker {
    child: Child,
    port: u16,
    paused: bool,
}

impl LocalBroker {
    /// Starts `binary` on 127.0.0.1:`port`, in `workdir` (it reads a `.env` there: give it a
    /// folder of its own), logging to `log`. It runs as the server account of `install` when we
    /// are root, like the databases.
    pub fn start(
        install: &PgInstall,
        binary: &Path,
        workdir: &Path,
        port: u16,
        log: File,
    ) -> io::Result<Self> {
        install.prepare_dir(workdir)?;
        let listener = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(binary);
        command
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        install.run_as_server_account(&mut command);
        supervise(&mut command);
        let mut broker = Self {
            child: command.spawn()?,
            port,
            paused: false,
        };
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Some(status) = broker.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "the broker exited during start-up ({status}); see its log"
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "the broker did not open port {port} within {START_TIMEOUT:?}"
                )));
            }
            sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, for `KAFKA_BOOTSTRAP_SERVERS`.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Freezes the broker: connections stay open but nothing is answered, as in an outage.
    pub fn pause(&mut self) -> io::Result<()> {
        self.signal(Signal::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// Lets a paused broker go on, with everything it held.
    pub fn resume(&mut self) -> io::Result<()> {
        self.signal(Signal::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    /// Stops the broker (its memory is gone).
    pub fn stop(&mut self) -> io::Result<()> {
        if self.paused {
            self.resume()?;
        }
        stop_child(&mut self.child, Signal::SIGTERM, Duration::from_secs(10)).map(drop)
    }

    fn signal(&self, signal: Signal) -> io::Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal).map_err(io::Error::from)
    }
}

/// Creates `topics` (name, partitions) on the broker at `bootstrap_servers` (`host:port`) with
/// `binary`'s `topic` commands, leaving the ones that exist as they are.
pub fn create_topics(
    binary: &Path,
    bootstrap_servers: &str,
    topics: &[(String, i32)],
) -> io::Result<()> {
    let broker = format!("tcp://{bootstrap_servers}");
    let listing = run_topic_command(binary, &["list", "--broker", &broker])?;
    let existing: Vec<serde_json::Value> = serde_json::from_slice(&listing)
        .map_err(|err| io::Error::other(format!("`tansu topic list` printed no JSON: {err}")))?;
    let exists = |name: &str| existing.iter().any(|topic| topic["name"] == name);
    for (name, partitions) in topics.iter().filter(|(name, _)| !exists(name)) {
        let partitions = partitions.to_string();
        run_topic_command(
            binary,
            &[
                "create",
                "--broker",
                &broker,
                "--partitions",
                &partitions,
                name,
            ],
        )?;
    }
    Ok(())
}

fn run_topic_command(binary: &Path, args: &[&str]) -> io::Result<Vec<u8>> {
    let output = Command::new(binary)
        .arg("topic")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "`tansu topic {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output.stdout)
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
