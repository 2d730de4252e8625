//! What the benchmark reads from `/proc`: which process listens on a loopback port (so a
//! peer's server can be found whether the bench script or the machine started it), and how
//! much memory a server's process tree holds.

use std::collections::{BTreeSet, HashMap};
use std::fs;

/// Memory of a process tree, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct MemSample {
    /// Sum of `VmRSS` over the tree (counts shared pages once per process).
    pub rss_kib: u64,
    /// Sum of `Pss` over the tree (shared pages divided among their users; for PostgreSQL's
    /// many processes on one shared lock table this is the figure that adds up).
    pub pss_kib: u64,
    /// Processes in the tree.
    pub processes: usize,
}

/// The PID of the process listening on `127.0.0.1:port` (or `0.0.0.0:port`), the root of
/// its process tree if several share the socket.
#[must_use]
pub fn pid_listening_on(port: u16) -> Option<u32> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        return None;
    }
    let mut holders = BTreeSet::new();
    for pid in all_pids() {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                && inodes.contains(inode)
            {
                holders.insert(pid);
            }
        }
    }
    let parents = parent_map();
    holders
        .iter()
        .copied()
        .find(|pid| parents.get(pid).is_none_or(|ppid| !holders.contains(ppid)))
}

/// Socket inodes in LISTEN state on the port, from `/proc/net/tcp` and `/proc/net/tcp6`.
fn listening_inodes(port: u16) -> BTreeSet<String> {
    let port_hex = format!("{port:04X}");
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields.len() < 10 || fields[3] != "0A" {
                continue;
            }
            if fields[1].rsplit(':').next() == Some(port_hex.as_str()) {
                inodes.insert(fields[9].to_owned());
            }
        }
    }
    inodes
}

fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// pid → parent pid for every process.
fn parent_map() -> HashMap<u32, u32> {
    all_pids()
        .into_iter()
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may contain spaces and parentheses: parse after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `root` and all its descendants.
#[must_use]
pub fn process_tree(root: u32) -> Vec<u32> {
    let parents = parent_map();
    let mut tree = vec![root];
    let mut index = 0;
    while index < tree.len() {
        let parent = tree[index];
        tree.extend(
            parents
                .iter()
                .filter(|&(_, &ppid)| ppid == parent)
                .map(|(&pid, _)| pid),
        );
        index += 1;
    }
    tree
}

/// Reads a `Name:   123 kB` field.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
}

/// Memory of `root`'s process tree now; `None` if `root` is gone.
#[must_use]
pub fn mem_sample(root: u32) -> Option<MemSample> {
    let mut sample = MemSample::default();
    for pid in process_tree(root) {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            if pid == root {
                return None;
            }
            continue;
        };
        sample.rss_kib += kib_field(&status, "VmRSS").unwrap_or(0);
        if let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            sample.pss_kib += kib_field(&rollup, "Pss").unwrap_or(0);
        }
        sample.processes += 1;
    }
    Some(sample)
}

/// Kernel clock ticks per second of `utime`/`stime` in `/proc/PID/stat` (`USER_HZ`, 100 on
/// every Linux architecture the benchmark runs on).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) consumed so far by `root`'s process tree, in seconds: the living
/// processes' own time plus what their exited and reaped children used (`cutime`/`cstime`),
/// so that PostgreSQL backends that end between two samples do not take their time with them.
#[must_use]
pub fn cpu_seconds(root: u32) -> Option<f64> {
    let mut ticks = 0_u64;
    for pid in process_tree(root) {
        match stat_cpu_ticks(pid) {
            Some((own, children)) => ticks += own + children,
            None if pid == root => return None,
            None => {}
        }
    }
    #[allow(clippy::cast_precision_loss)]
    Some(ticks as f64 / USER_HZ)
}

/// CPU time of this process alone, in seconds: not its children (the holdfast servers the
/// benchmark starts are its children and are measured separately).
#[must_use]
pub fn own_cpu_seconds() -> Option<f64> {
    #[allow(clippy::cast_precision_loss)]
    stat_cpu_ticks(std::process::id()).map(|(own, _)| own as f64 / USER_HZ)
}

/// (utime + stime, cutime + cstime) of one process, in clock ticks.
fn stat_cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name: state(3) ppid(4) ... utime(14) stime(15) cutime(16)
    // cstime(17).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Some((field(14) + field(15), field(16) + field(17)))
}

/// The port of a URL such as `redis://127.0.0.1:6390` or `postgres://u@127.0.0.1:5433/db`.
#[must_use]
pub fn port_of(url: &str) -> Option<u16> {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    host_port.rsplit_once(':')?.1.parse().ok()
}

/// The 1-minute load average (`/proc/loadavg`): how busy the machine was around a run.
#[must_use]
pub fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `nproc` and the CPU model, for the report header.
#[must_use]
pub fn machine() -> (usize, String) {
    let nproc = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    (nproc, model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_urls() {
        assert_eq!(port_of("redis://127.0.0.1:6390"), Some(6390));
        assert_eq!(
            port_of("postgres://postgres@127.0.0.1:5433/test"),
            Some(5433)
        );
        assert_eq!(port_of("mysql://root@127.0.0.1:3307/test"), Some(3307));
        assert_eq!(port_of("http://127.0.0.1:2389"), Some(2389));
        assert_eq!(port_of("http://localhost/"), None);
    }

    #[test]
    fn own_memory_is_readable() {
        let sample = mem_sample(std::process::id()).expect("own process");
        assert!(sample.rss_kib > 0);
        assert!(sample.processes >= 1);
    }

    #[test]
    fn own_cpu_time_grows() {
        let before = cpu_seconds(std::process::id()).expect("own process");
        let mut x = 0_u64;
        let began = std::time::Instant::now();
        while began.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let after = cpu_seconds(std::process::id()).expect("own process");
        assert!(after >= before);
        assert!(own_cpu_seconds().is_some_and(|own| own <= after + 0.01));
    }

    #[test]
    fn finds_the_listener_of_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert_eq!(pid_listening_on(port), Some(std::process::id()));
    }
}
