//! `cargo xtask profile <service> [--seconds N] [--frequency HZ]`: samples a running service's
//! CPU with `perf` (the one listening on the service's port, e.g. under `cargo xtask up
//! --release`), then writes `perf.data`, the folded stacks and a top-functions summary under
//! `.local/profiles/<service>-<time>/`.
//!
//! perf attaches for the run and detaches after it: nothing runs in the service, and nothing is
//! paid while no one profiles. `cpu-clock` is a software event, so it works in VMs without
//! hardware counters; stacks are unwound from the DWARF call-frame information every binary
//! carries (`.eh_frame`), since release builds keep no frame pointers.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::stack::{self, SERVICES};
use crate::{workspace_root, EDGE_PORT};

/// Seconds sampled when `--seconds` is not given, and the most that may be asked for.
const DEFAULT_SECONDS: u64 = 30;
const MAX_SECONDS: u64 = 300;
/// Samples per second: 99 (not 100) so sampling does not run in lockstep with periodic work.
const DEFAULT_FREQUENCY: u32 = 99;
const MAX_FREQUENCY: u32 = 999;
/// Functions listed in the summary.
const TOP: usize = 25;

pub fn run(args: &[String]) -> Result<()> {
    let options = Options::parse(args)?;
    let port = port_of(&options.service)?;
    let pid = listening_pid(port)?.with_context(|| {
        format!(
            "nothing listens on 127.0.0.1:{port} ({}): start it first, e.g. `cargo xtask up --release`",
            options.service
        )
    })?;
    ensure_perf()?;

    let format = time::format_description::parse_borrowed::<2>(
        "[year][month][day]T[hour][minute][second]Z",
    )?;
    let stamp = time::OffsetDateTime::now_utc().format(&format)?;
    let dir = stack::state_dir(&workspace_root())
        .join("profiles")
        .join(format!("{}-{stamp}", options.service));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = dir.join("perf.data");

    println!(
        "xtask: perf record of {} (pid {pid}, port {port}) for {} s at {} Hz",
        options.service, options.seconds, options.frequency
    );
    let status = Command::new("perf")
        .args([
            "record",
            "--quiet",
            "-e",
            "cpu-clock",
            "--call-graph",
            "dwarf",
        ])
        .arg("-F")
        .arg(options.frequency.to_string())
        .arg("-p")
        .arg(pid.to_string())
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep"])
        .arg(options.seconds.to_string())
        .status()
        .context("running perf record")?;
    ensure!(status.success(), "perf record failed ({status})");

    let output = Command::new("perf")
        .args(["script", "--no-inline", "-F", "comm,ip,sym", "-i"])
        .arg(&data)
        .stderr(Stdio::null())
        .output()
        .context("running perf script")?;
    ensure!(
        output.status.success(),
        "perf script failed ({})",
        output.status
    );
    let stacks = fold(&String::from_utf8_lossy(&output.stdout));
    ensure!(
        !stacks.is_empty(),
        "no samples: did {} use any CPU in those {} s?",
        options.service,
        options.seconds
    );

    let folded = dir.join("stacks.folded");
    let mut lines: Vec<String> = stacks
        .iter()
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect();
    lines.sort();
    std::fs::write(&folded, lines.join("\n") + "\n")?;
    let summary = summarize(&stacks, TOP);
    let top = dir.join("top.txt");
    std::fs::write(&top, &summary)?;

    println!("{summary}");
    println!(
        "xtask: written to {}\n  perf.data      `perf report -i {}` to browse\n  stacks.folded  one line per stack, for any flame-graph tool (inferno-flamegraph, speedscope)\n  top.txt        the summary above",
        dir.display(),
        data.display()
    );
    Ok(())
}

#[derive(Debug, PartialEq)]
struct Options {
    service: String,
    seconds: u64,
    frequency: u32,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        const USAGE: &str = "usage: cargo xtask profile SERVICE [--seconds N] [--frequency HZ]";
        let mut service = None;
        let mut seconds = DEFAULT_SECONDS;
        let mut frequency = DEFAULT_FREQUENCY;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    seconds = args
                        .next()
                        .and_then(|value| value.parse().ok())
                        .context(USAGE)?;
                    ensure!(
                        (1..=MAX_SECONDS).contains(&seconds),
                        "--seconds: 1 to {MAX_SECONDS}"
                    );
                }
                "--frequency" => {
                    frequency = args
                        .next()
                        .and_then(|value| value.parse().ok())
                        .context(USAGE)?;
                    ensure!(
                        (1..=MAX_FREQUENCY).contains(&frequency),
                        "--frequency: 1 to {MAX_FREQUENCY} Hz"
                    );
                }
                other if other.starts_with('-') || service.is_some() => {
                    bail!("unexpected {other:?}; {USAGE}")
                }
                other => service = Some(other.to_owned()),
            }
        }
        Ok(Self {
            service: service.context(USAGE)?,
            seconds,
            frequency,
        })
    }
}

/// The port a service of `cargo xtask up` listens on (the edge's too).
fn port_of(service: &str) -> Result<u16> {
    if service == "edge" {
        return Ok(EDGE_PORT);
    }
    SERVICES
        .iter()
        .find(|(name, _)| *name == service)
        .map(|(_, port)| *port)
        .with_context(|| {
            let known: Vec<&str> = SERVICES.iter().map(|(name, _)| *name).collect();
            format!("no service {service:?}: one of {}, edge", known.join(", "))
        })
}

fn ensure_perf() -> Result<()> {
    let found = Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    ensure!(
        found,
        "perf not found: it comes with Debian's linux-perf (`apt-get install linux-perf`)"
    );
    Ok(())
}

/// The process with a TCP socket listening on `port`, from `/proc/net/tcp{,6}` and the socket
/// links in `/proc/<pid>/fd`.
fn listening_pid(port: u16) -> Result<Option<u32>> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return Ok(None);
    }
    let targets: Vec<String> = inodes
        .iter()
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|link| targets.iter().any(|target| Path::new(target) == link))
        });
        if holds {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// Inodes of the sockets listening on `port` in a `/proc/net/tcp` table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(3)? == LISTEN)
                .then(|| fields.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Folds `perf script -F comm,ip,sym` output into `thread;outer;...;leaf` → samples, the
/// format flame-graph tools read. The thread name is the root frame.
fn fold(script: &str) -> HashMap<String, u64> {
    let mut stacks = HashMap::new();
    let mut thread: Option<String> = None;
    let mut frames: Vec<String> = Vec::new();
    let mut flush = |thread: &mut Option<String>, frames: &mut Vec<String>| {
        if let Some(name) = thread.take() {
            let mut stack = name.replace(' ', "_");
            for frame in frames.iter().rev() {
                stack.push(';');
                stack.push_str(frame);
            }
            *stacks.entry(stack).or_insert(0) += 1;
        }
        frames.clear();
    };
    for line in script.lines() {
        if line.trim().is_empty() {
            flush(&mut thread, &mut frames);
        } else if line.starts_with(char::is_whitespace) {
            // `    55d0c0a1b2c3 some::function+0x23` (or `[unknown]`).
            let frame = line.trim();
            let symbol = frame.split_once(' ').map_or(frame, |(_, symbol)| symbol);
            let symbol = symbol
                .rsplit_once("+0x")
                .map_or(symbol, |(name, _)| name)
                .trim();
            frames.push(symbol.replace(';', ":"));
        } else {
            flush(&mut thread, &mut frames);
            thread = Some(line.trim().to_owned());
        }
    }
    flush(&mut thread, &mut frames);
    stacks
}

/// The functions that used the most CPU by themselves (leaf frames) and with what they called
/// (every named frame of a stack, each counted once per stack), as shares of all samples.
fn summarize(stacks: &HashMap<String, u64>, top: usize) -> String {
    let total: u64 = stacks.values().sum();
    let mut own: HashMap<&str, u64> = HashMap::new();
    let mut with_callees: HashMap<&str, u64> = HashMap::new();
    for (stack, count) in stacks {
        let mut frames: Vec<&str> = stack.split(';').skip(1).collect();
        if let Some(leaf) = frames.last() {
            *own.entry(leaf).or_insert(0) += count;
        }
        // Frames the unwinder could not name say nothing about where time went.
        frames.retain(|frame| *frame != "[unknown]");
        frames.sort_unstable();
        frames.dedup();
        for frame in frames {
            *with_callees.entry(frame).or_insert(0) += count;
        }
    }
    let table = |counts: HashMap<&str, u64>| {
        let mut rows: Vec<(&str, u64)> = counts.into_iter().collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        rows.iter()
            .take(top)
            .map(|(name, count)| {
                format!(
                    "{:>6.2}%  {count:>7}  {name}\n",
                    100.0 * *count as f64 / total as f64
                )
            })
            .collect::<String>()
    };
    format!(
        "{total} samples\n\nself (the function itself)\n{}\ntotal (with what it called)\n{}",
        table(own),
        table(with_callees)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn options_have_bounded_defaults() {
        assert_eq!(
            Options::parse(&args(&["tasks"])).unwrap(),
            Options {
                service: "tasks".into(),
                seconds: DEFAULT_SECONDS,
                frequency: DEFAULT_FREQUENCY,
            }
        );
        assert_eq!(
            Options::parse(&args(&["auth", "--seconds", "5", "--frequency", "999"])).unwrap(),
            Options {
                service: "auth".into(),
                seconds: 5,
                frequency: 999,
            }
        );
        assert!(Options::parse(&args(&[])).is_err());
        assert!(Options::parse(&args(&["tasks", "--seconds", "0"])).is_err());
        assert!(Options::parse(&args(&["tasks", "--seconds", "3600"])).is_err());
        assert!(Options::parse(&args(&["tasks", "--frequency", "10000"])).is_err());
        assert!(Options::parse(&args(&["tasks", "auth"])).is_err());
    }

    #[test]
    fn ports_come_from_the_stack() {
        assert_eq!(port_of("tasks").unwrap(), 8082);
        assert_eq!(port_of("edge").unwrap(), EDGE_PORT);
        assert!(port_of("postgres").is_err());
    }

    #[test]
    fn listening_sockets_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F92 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41234 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F92 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 41299 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F93 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41240 1 0000000000000000 100 0 0 10 0
";
        // 0x1F92 = 8082: the listener, not the established connection on the same port.
        assert_eq!(listening_inodes(table, 8082), vec![41234]);
        assert_eq!(listening_inodes(table, 8083), vec![41240]);
        assert!(listening_inodes(table, 8084).is_empty());
    }

    #[test]
    fn perf_script_folds_into_stacks() {
        let script = "tokio-runtime-w \n\
            \t    55d0c0a1b2c3 tasks::handlers::get_task+0x23\n\
            \t    55d0c0a1b000 tokio::runtime::task::raw::poll+0x10\n\
            \t    7f0000001000 start_thread+0x1\n\
            \n\
            tokio-runtime-w \n\
            \t    55d0c0a1b2c3 tasks::handlers::get_task+0x40\n\
            \t    55d0c0a1b000 tokio::runtime::task::raw::poll+0x10\n\
            \t    7f0000001000 start_thread+0x1\n\
            \n\
            actix-rt|system \n\
            \t    ffffffff81000000 [unknown]\n";
        let stacks = fold(script);
        assert_eq!(
            stacks.get(
                "tokio-runtime-w;start_thread;tokio::runtime::task::raw::poll;tasks::handlers::get_task"
            ),
            Some(&2)
        );
        assert_eq!(stacks.get("actix-rt|system;[unknown]"), Some(&1));
        assert_eq!(stacks.len(), 2);

        let summary = summarize(&stacks, 5);
        assert!(summary.starts_with("3 samples\n"), "{summary}");
        assert!(
            summary.contains(" 66.67%        2  tasks::handlers::get_task\n"),
            "{summary}"
        );
    }
}
