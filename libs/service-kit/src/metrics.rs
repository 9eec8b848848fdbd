//! Prometheus metrics: the recorder behind the `metrics` facade, and the names every service shares.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` histograms) and every series
//! carries a `service` label, so one dashboard serves all four services.

use std::path::PathBuf;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests served, by `method`, `route` (the route pattern, never the raw path) and `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Requests answered with a 5xx (including timeouts), by `method` and `route`.
pub const HTTP_ERRORS: &str = "http_request_errors_total";
/// Time from request head to response head, by `method` and `route`.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// Handler panics caught and answered 500 (each is also a 5xx in the counters above).
pub const HTTP_PANICS: &str = "http_panics_total";
/// Connections closed because they sent nothing within 5 s of opening.
pub const HTTP_SILENT_CONNECTIONS_CLOSED: &str = "http_silent_connections_closed_total";
/// 1 while a dependency answers its health check, 0 while it does not, by `dependency`
/// (`primary`, `broker`); checked every few seconds. Readiness does not depend on it.
pub const DEPENDENCY_UP: &str = "dependency_up";
/// Connections open in a pool, by `pool` (`writer` or `reader`).
pub const DB_POOL_SIZE: &str = "db_pool_connections";
/// Connections lent out of a pool right now, by `pool`.
pub const DB_POOL_IN_USE: &str = "db_pool_connections_in_use";
/// The pool's upper bound, by `pool`.
pub const DB_POOL_MAX: &str = "db_pool_connections_max";
/// Time spent waiting for a pooled connection, by `pool`.
pub const DB_POOL_WAIT: &str = "db_pool_acquire_seconds";
/// Time a query (or a unit of work on one connection) took, by `pool`.
pub const DB_QUERY_DURATION: &str = "db_query_duration_seconds";
/// Reads served by the primary because the replica was down, lagging or failed, by `reason`.
pub const DB_REPLICA_FALLBACK: &str = "db_replica_fallback_total";
/// 1 while reads go to the replica, 0 while they fall back to the primary.
pub const DB_REPLICA_IN_USE: &str = "db_replica_in_use";
/// Replay lag of the replica as last measured, in seconds.
pub const DB_REPLICA_LAG: &str = "db_replica_lag_seconds";
/// Access tokens refused, by `reason` (`expired`, `invalid`, `unknown_key`, ...).
pub const ACCESS_TOKENS_REJECTED: &str = "access_tokens_rejected_total";
/// Jobs waiting in a worker pool's queue, by `pool`.
pub const WORKER_POOL_QUEUE_DEPTH: &str = "worker_pool_queue_depth";
/// Threads of a worker pool, by `pool`.
pub const WORKER_POOL_WORKERS: &str = "worker_pool_workers";
/// Time a job waited in the queue before a worker took it, by `pool`.
pub const WORKER_POOL_WAIT: &str = "worker_pool_wait_seconds";
/// Jobs refused because the queue was full (answered 503), by `pool`.
pub const WORKER_POOL_REJECTED: &str = "worker_pool_rejected_total";

/// Rows deleted by housekeeping, by `sweep` (`outbox`, `processed_events`, ...).
pub const HOUSEKEEPING_DELETED: &str = "housekeeping_deleted_total";

// The process itself, read on each scrape ([`record_process_metrics`]) under the names every
// Prometheus client library uses, so stock dashboards and `rate(process_cpu_seconds_total[5m])`
// work unchanged, in a cluster and on the local stack alike.

/// User plus system CPU time used since start, in seconds. A gauge carrying a value that only
/// grows: counters of the `metrics` facade hold whole numbers, and whole seconds would turn the
/// CPU use of a mostly idle service into a step function. `rate()` reads it like a counter.
pub const PROCESS_CPU_SECONDS: &str = "process_cpu_seconds_total";
/// Resident set size, in bytes.
pub const PROCESS_RESIDENT_MEMORY: &str = "process_resident_memory_bytes";
/// Open file descriptors (sockets included).
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
/// The soft limit of open file descriptors.
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
/// OS threads.
pub const PROCESS_THREADS: &str = "process_threads";
/// CFS enforcement periods of the process's cgroup (`cpu.stat` `nr_periods`, cgroup v2 or v1):
/// periods in which the cgroup ran under a CPU limit. No series where there is no `cpu.stat`.
pub const CGROUP_CPU_PERIODS: &str = "process_cgroup_cpu_periods_total";
/// Of those, periods in which the cgroup used up its quota and was throttled (`nr_throttled`).
pub const CGROUP_CPU_THROTTLED_PERIODS: &str = "process_cgroup_cpu_throttled_periods_total";
/// Time the cgroup's threads spent throttled (`throttled_usec`), in seconds; a gauge that only
/// grows, for the same reason as [`PROCESS_CPU_SECONDS`].
pub const CGROUP_CPU_THROTTLED_SECONDS: &str = "process_cgroup_cpu_throttled_seconds_total";

/// Latency buckets from 1 ms to 10 s: fine below 100 ms where the targets are.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide recorder; returns the handle that renders `/metrics`.
pub fn install(service_name: &'static str) -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .add_global_label("service", service_name)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|err| err.to_string())?
        .install_recorder()
        .map_err(|err| err.to_string())
}

/// Publishes the process metrics (CPU, memory, file descriptors, threads) and the CFS throttling
/// of the process's cgroup; called when `/metrics` is scraped so the numbers are current. A figure
/// that cannot be read here (no `/proc`, no cgroup v2 `cpu.stat`) has no series; never an error.
pub fn record_process_metrics() {
    if let Some(seconds) = cpu_seconds() {
        metrics::gauge!(PROCESS_CPU_SECONDS).set(seconds);
    }
    if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(ProcStat::parse)
    {
        metrics::gauge!(PROCESS_THREADS).set(stat.threads as f64);
        metrics::gauge!(PROCESS_RESIDENT_MEMORY).set((stat.rss_pages * page_size()) as f64);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        // The handle that lists the folder is one of its entries.
        let open = entries.count().saturating_sub(1);
        metrics::gauge!(PROCESS_OPEN_FDS).set(open as f64);
    }
    if let Some(limit) = max_fds() {
        metrics::gauge!(PROCESS_MAX_FDS).set(limit as f64);
    }
    if let Some(stat) = own_cpu_stat() {
        record_cpu_stat(&stat);
    }
}

fn record_cpu_stat(stat: &CpuStat) {
    if let Some(periods) = stat.periods {
        metrics::counter!(CGROUP_CPU_PERIODS).absolute(periods);
    }
    if let Some(throttled) = stat.throttled_periods {
        metrics::counter!(CGROUP_CPU_THROTTLED_PERIODS).absolute(throttled);
    }
    if let Some(usec) = stat.throttled_usec {
        metrics::gauge!(CGROUP_CPU_THROTTLED_SECONDS).set(usec as f64 / 1e6);
    }
}

/// User plus system CPU time of the whole process, at microsecond resolution (`/proc`'s ticks
/// are 10 ms).
fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as u64,
        _ => 4096,
    }
}

/// The soft limit of open files; none when unlimited.
fn max_fds() -> Option<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

/// What `/proc/self/stat` tells that `getrusage` does not.
#[derive(Debug, PartialEq)]
struct ProcStat {
    threads: u64,
    rss_pages: u64,
}

impl ProcStat {
    fn parse(line: &str) -> Option<Self> {
        // Fields after the command name, which is in parentheses and may hold spaces and `)`:
        // `state` is field 3 of proc(5), so field N is at index N - 3.
        let fields: Vec<&str> = line.rsplit_once(')')?.1.split_whitespace().collect();
        Some(Self {
            threads: fields.get(20 - 3)?.parse().ok()?,
            rss_pages: fields.get(24 - 3)?.parse().ok()?,
        })
    }
}

/// The CFS bandwidth figures of a cgroup v2 `cpu.stat`; each absent when the file lacks it (the
/// `cpu` controller is not enabled for the cgroup).
#[derive(Debug, Default, PartialEq)]
struct CpuStat {
    periods: Option<u64>,
    throttled_periods: Option<u64>,
    throttled_usec: Option<u64>,
}

impl CpuStat {
    /// Parses `key value` lines; unknown keys and malformed lines are skipped.
    fn parse(text: &str) -> Self {
        let mut stat = Self::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(key), Some(value), None) = (words.next(), words.next(), words.next()) else {
                continue;
            };
            let slot = match key {
                "nr_periods" => &mut stat.periods,
                "nr_throttled" => &mut stat.throttled_periods,
                "throttled_usec" => &mut stat.throttled_usec,
                // cgroup v1 counts the throttled time in nanoseconds.
                "throttled_time" => {
                    stat.throttled_usec = value.parse::<u64>().ok().map(|ns| ns / 1000);
                    continue;
                }
                _ => continue,
            };
            *slot = value.parse().ok();
        }
        stat
    }
}

/// The process's own cgroup v2 path, from `/proc/self/cgroup` (its `0::` line; cgroup v1 lines
/// are ignored).
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
        .filter(|path| path.starts_with('/'))
}

/// Where the `cpu.stat` of the cgroup at `path` is, under the v2 hierarchy at `/sys/fs/cgroup`.
fn cpu_stat_file(path: &str) -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
        .join(path.trim_start_matches('/'))
        .join("cpu.stat")
}

/// The process's cgroup v1 path in the `cpu` controller's hierarchy (a `N:cpu:` or
/// `N:cpu,cpuacct:` line), for hosts without cgroup v2's `cpu` controller.
fn cgroup_v1_cpu_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers
            .split(',')
            .any(|controller| controller == "cpu")
            .then_some(path.trim())
    })
}

fn own_cpu_stat() -> Option<CpuStat> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // In a container with a cgroup namespace of its own the path is `/`, and its cgroup is
    // mounted at /sys/fs/cgroup. On a hybrid v1/v2 host (this workplace's machines, older
    // nodes) /sys/fs/cgroup is not the v2 hierarchy: the v1 `cpu` controller's file is read.
    if let Some(text) =
        cgroup_v2_path(&cgroups).and_then(|path| std::fs::read_to_string(cpu_stat_file(path)).ok())
    {
        return Some(CpuStat::parse(&text));
    }
    let path = cgroup_v1_cpu_path(&cgroups)?;
    let file = PathBuf::from("/sys/fs/cgroup/cpu")
        .join(path.trim_start_matches('/'))
        .join("cpu.stat");
    Some(CpuStat::parse(&std::fs::read_to_string(file).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throttled container's `cpu.stat` (cgroup v2, Linux 6.x).
    const THROTTLED: &str = "usage_usec 8123456\nuser_usec 6000000\nsystem_usec 2123456\n\
        core_sched.force_idle_usec 0\nnr_periods 5321\nnr_throttled 412\n\
        throttled_usec 20750000\nnr_bursts 0\nburst_usec 0\n";

    #[test]
    fn cpu_stat_of_a_throttled_cgroup() {
        assert_eq!(
            CpuStat::parse(THROTTLED),
            CpuStat {
                periods: Some(5321),
                throttled_periods: Some(412),
                throttled_usec: Some(20_750_000),
            }
        );
    }

    #[test]
    fn cpu_stat_without_the_cpu_controller_has_no_throttling_figures() {
        // Only the usage lines: the `cpu` controller is not enabled for this cgroup.
        let stat =
            CpuStat::parse("usage_usec 69951402\nuser_usec 39943414\nsystem_usec 30007987\n");
        assert_eq!(stat, CpuStat::default());
    }

    #[test]
    fn cgroup_v1_cpu_stat_and_path() {
        assert_eq!(
            CpuStat::parse("nr_periods 40\nnr_throttled 3\nthrottled_time 2500000000\n"),
            CpuStat {
                periods: Some(40),
                throttled_periods: Some(3),
                throttled_usec: Some(2_500_000),
            }
        );
        assert_eq!(
            cgroup_v1_cpu_path("4:memory:/process_api/38\n2:cpuacct:/\n1:cpu:/\n0::/\n"),
            Some("/")
        );
        assert_eq!(
            cgroup_v1_cpu_path("3:cpu,cpuacct:/kubepods/burstable/pod1/ab12\n"),
            Some("/kubepods/burstable/pod1/ab12")
        );
        assert_eq!(cgroup_v1_cpu_path("2:cpuacct:/\n0::/\n"), None);
    }

    #[test]
    fn cpu_stat_skips_malformed_lines() {
        let stat = CpuStat::parse("nr_periods\nnr_throttled x\nthrottled_usec 5 6\n\nnr_periods 7");
        assert_eq!(
            stat,
            CpuStat {
                periods: Some(7),
                throttled_periods: None,
                throttled_usec: None,
            }
        );
    }

    #[test]
    fn cgroup_path_is_the_v2_line() {
        // A container with its own cgroup namespace.
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        // A pod's container seen from the host's cgroup namespace.
        assert_eq!(
            cgroup_v2_path(
                "0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-ab12.scope\n"
            ),
            Some("/kubepods.slice/kubepods-burstable.slice/cri-containerd-ab12.scope")
        );
        // A hybrid host: v1 lines first.
        assert_eq!(
            cgroup_v2_path("4:memory:/process_api/38\n1:cpu:/\n0::/user.slice\n"),
            Some("/user.slice")
        );
        // cgroup v1 only.
        assert_eq!(cgroup_v2_path("2:cpuacct:/\n1:cpu:/\n"), None);
    }

    #[test]
    fn cpu_stat_file_is_under_the_v2_mount() {
        assert_eq!(cpu_stat_file("/"), PathBuf::from("/sys/fs/cgroup/cpu.stat"));
        assert_eq!(
            cpu_stat_file("/kubepods.slice/pod.scope"),
            PathBuf::from("/sys/fs/cgroup/kubepods.slice/pod.scope/cpu.stat")
        );
    }

    #[test]
    fn proc_stat_fields_after_a_command_name_with_spaces() {
        // proc(5) fields 1-24 (and more), with a command name that holds `) (`.
        let line = "4242 (tokio (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 150 40 0 0 20 0 \
                    17 0 123456 987654321 2345 18446744073709551615";
        assert_eq!(
            ProcStat::parse(line),
            Some(ProcStat {
                threads: 17,
                rss_pages: 2345,
            })
        );
        assert_eq!(ProcStat::parse("4242 (short) S 1 2"), None);
    }

    #[test]
    fn process_metrics_render_under_the_standard_names() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            record_process_metrics();
            record_cpu_stat(&CpuStat::parse(THROTTLED));
        });
        let text = handle.render();
        for name in [
            PROCESS_CPU_SECONDS,
            PROCESS_RESIDENT_MEMORY,
            PROCESS_OPEN_FDS,
            PROCESS_MAX_FDS,
            PROCESS_THREADS,
        ] {
            let value: f64 = text
                .lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
                .parse()
                .unwrap();
            assert!(value > 0.0, "{name} {value}");
        }
        assert!(
            text.contains("process_cgroup_cpu_periods_total 5321\n"),
            "{text}"
        );
        assert!(
            text.contains("process_cgroup_cpu_throttled_periods_total 412\n"),
            "{text}"
        );
        assert!(
            text.contains("process_cgroup_cpu_throttled_seconds_total 20.75\n"),
            "{text}"
        );
    }
}
