//! Cluster specs: jobs of tasks with `host:port` addresses, from a flag string
//! (`ps=h1:2222;worker=h2:2222,h3:2222`) or a file, and the `ServerDef` of one task.

use rill_graph::{DeviceName, Error, Result, SessionOptions};
use std::collections::BTreeMap;
use std::fmt;

/// Jobs by name, each a map of task index to `host:port`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterSpec {
    jobs: BTreeMap<String, BTreeMap<u32, String>>,
}

fn valid_job(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn valid_addr(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

impl ClusterSpec {
    pub fn new() -> ClusterSpec {
        ClusterSpec::default()
    }

    /// Parses `job=addr,addr;job=addr`. Newlines work like `;`, and `#` starts a comment, so the
    /// same syntax serves as a file format. A task may be given as `index@addr` (sparse jobs).
    pub fn parse(s: &str) -> Result<ClusterSpec> {
        let mut spec = ClusterSpec::new();
        let body: String = s.lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join(";");
        for part in body.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (job, tasks) = part.split_once('=').ok_or_else(|| {
                Error::invalid_argument(format!("cluster spec entry '{part}' is not job=host:port,..."))
            })?;
            let job = job.trim();
            if !valid_job(job) {
                return Err(Error::invalid_argument(format!("bad job name '{job}' in cluster spec")));
            }
            if spec.jobs.contains_key(job) {
                return Err(Error::invalid_argument(format!("job '{job}' appears twice in cluster spec")));
            }
            let mut map = BTreeMap::new();
            for (i, t) in tasks.split(',').map(str::trim).filter(|t| !t.is_empty()).enumerate() {
                let (idx, addr) = match t.split_once('@') {
                    Some((k, a)) => (
                        k.parse::<u32>().map_err(|_| {
                            Error::invalid_argument(format!("bad task index '{k}' for job '{job}'"))
                        })?,
                        a,
                    ),
                    None => (i as u32, t),
                };
                if !valid_addr(addr) {
                    return Err(Error::invalid_argument(format!(
                        "bad address '{addr}' for /job:{job}/task:{idx} (want host:port)"
                    )));
                }
                if map.insert(idx, addr.to_string()).is_some() {
                    return Err(Error::invalid_argument(format!("task {idx} of job '{job}' given twice")));
                }
            }
            if map.is_empty() {
                return Err(Error::invalid_argument(format!("job '{job}' has no tasks")));
            }
            spec.jobs.insert(job.to_string(), map);
        }
        if spec.jobs.is_empty() {
            return Err(Error::invalid_argument("empty cluster spec"));
        }
        Ok(spec)
    }

    /// Reads a cluster spec file (the flag syntax, one job per line allowed).
    pub fn from_file(path: &std::path::Path) -> Result<ClusterSpec> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(Error::from(e).code, format!("cluster file {}: cannot read", path.display()))
        })?;
        ClusterSpec::parse(&text).map_err(|e| e.context(format!("cluster file {}", path.display())))
    }

    /// Adds (or replaces) a job.
    pub fn set_job(&mut self, job: &str, addrs: &[&str]) -> Result<()> {
        if !valid_job(job) {
            return Err(Error::invalid_argument(format!("bad job name '{job}'")));
        }
        for a in addrs {
            if !valid_addr(a) {
                return Err(Error::invalid_argument(format!("bad address '{a}'")));
            }
        }
        self.jobs.insert(
            job.to_string(),
            addrs.iter().enumerate().map(|(i, a)| (i as u32, a.to_string())).collect(),
        );
        Ok(())
    }

    pub fn jobs(&self) -> impl Iterator<Item = &str> {
        self.jobs.keys().map(|s| s.as_str())
    }

    pub fn num_tasks(&self, job: &str) -> usize {
        self.jobs.get(job).map(|m| m.len()).unwrap_or(0)
    }

    pub fn task_indices(&self, job: &str) -> Vec<u32> {
        self.jobs.get(job).map(|m| m.keys().copied().collect()).unwrap_or_default()
    }

    /// The address of `/job:job/task:task`, or `InvalidArgument` naming it.
    pub fn task_address(&self, job: &str, task: u32) -> Result<&str> {
        self.jobs.get(job).and_then(|m| m.get(&task)).map(|s| s.as_str()).ok_or_else(|| {
            Error::invalid_argument(format!("/job:{job}/task:{task} is not in the cluster spec ({self})"))
        })
    }

    /// Every task as `(job, index, address)`.
    pub fn tasks(&self) -> impl Iterator<Item = (&str, u32, &str)> {
        self.jobs.iter().flat_map(|(j, m)| m.iter().map(move |(i, a)| (j.as_str(), *i, a.as_str())))
    }

    /// The task name `/job:J/replica:0/task:T`.
    pub fn task_name(job: &str, task: u32) -> DeviceName {
        DeviceName { job: Some(job.to_string()), replica: Some(0), task: Some(task), ..Default::default() }
    }

    /// A stable identity of the whole cluster (FNV-1a of the canonical form), exchanged in the
    /// handshake so tasks of different clusters refuse each other.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.to_string().bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

impl fmt::Display for ClusterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, (job, tasks)) in self.jobs.iter().enumerate() {
            if k > 0 {
                write!(f, ";")?;
            }
            write!(f, "{job}=")?;
            let dense = tasks.keys().enumerate().all(|(i, t)| i as u32 == *t);
            for (n, (i, a)) in tasks.iter().enumerate() {
                if n > 0 {
                    write!(f, ",")?;
                }
                if dense {
                    write!(f, "{a}")?;
                } else {
                    write!(f, "{i}@{a}")?;
                }
            }
        }
        Ok(())
    }
}

/// A free TCP port on 127.0.0.1 for a local cluster. A port is never handed out twice in one
/// process: the OS may offer a port it just released again before its first user binds it.
pub fn free_loopback_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Bounded: the ephemeral range is far larger than any test's needs.
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.contains(&port) {
            seen.push(port);
            return Ok(port);
        }
    }
    Err(Error::unavailable("no unused loopback port found"))
}

/// What a server needs to know about itself (TensorFlow's `ServerDef`).
#[derive(Clone, Debug)]
pub struct ServerDef {
    pub cluster: ClusterSpec,
    pub job_name: String,
    pub task_index: u32,
    /// `"tcp"` (the only protocol today; an RDMA data path would add another).
    pub protocol: String,
    /// Options for the server's devices and for sessions that set none.
    pub default_session_options: SessionOptions,
    /// Shared secret for the handshake; `None` accepts any peer that speaks the protocol.
    pub secret: Option<Vec<u8>>,
    /// Whether tensor bodies to tasks on the same host may go through shared memory (see
    /// `shm_enabled_by_env`: on unless `RILL_SHM=0`); off, every byte crosses the TCP socket.
    pub shm: bool,
}

/// The default of [`ServerDef::shm`] and `TransportOptions::shm`: on unless the environment sets
/// `RILL_SHM=0` (the switch for comparing the shared-memory path with plain TCP).
pub fn shm_enabled_by_env() -> bool {
    std::env::var("RILL_SHM").map_or(true, |v| v != "0")
}

impl ServerDef {
    pub fn new(cluster: ClusterSpec, job: &str, task: u32) -> Result<ServerDef> {
        cluster.task_address(job, task)?;
        Ok(ServerDef {
            cluster,
            job_name: job.to_string(),
            task_index: task,
            protocol: "tcp".into(),
            default_session_options: SessionOptions::default(),
            secret: None,
            shm: shm_enabled_by_env(),
        })
    }

    /// This task's `host:port` from the cluster spec (servers bind exactly there).
    pub fn address(&self) -> Result<&str> {
        self.cluster.task_address(&self.job_name, self.task_index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok: &[(&str, &str)] = &[
            ("ps=h1:2222;worker=h2:2222,h3:2222", "ps=h1:2222;worker=h2:2222,h3:2222"),
            (" worker = a:1 , b:2 ; ps=c:3 ", "ps=c:3;worker=a:1,b:2"),
            ("# comment\nps=a:1\nworker=1@b:2,3@c:3\n", "ps=a:1;worker=1@b:2,3@c:3"),
            ("chief=[::1]:5000", "chief=[::1]:5000"),
        ];
        for (input, want) in ok {
            assert_eq!(ClusterSpec::parse(input).unwrap().to_string(), *want, "{input}");
        }
        let bad = ["", "ps", "ps=", "ps=h1", "ps=h1:x", "ps=a:1;ps=b:2", "p s=a:1", "w=0@a:1,0@b:2"];
        for input in bad {
            assert_eq!(
                ClusterSpec::parse(input).unwrap_err().code,
                rill_graph::Code::InvalidArgument,
                "{input}"
            );
        }
    }

    #[test]
    fn lookups_and_fingerprint() {
        let c = ClusterSpec::parse("ps=a:1;worker=b:2,c:3").unwrap();
        assert_eq!(c.task_address("worker", 1).unwrap(), "c:3");
        assert!(c.task_address("worker", 2).unwrap_err().msg.contains("/job:worker/task:2"));
        assert_eq!(c.num_tasks("worker"), 2);
        assert_eq!(c.tasks().count(), 3);
        assert_eq!(c.fingerprint(), ClusterSpec::parse("worker=b:2,c:3;ps=a:1").unwrap().fingerprint());
        assert_ne!(c.fingerprint(), ClusterSpec::parse("ps=a:1;worker=b:2").unwrap().fingerprint());
        assert!(ServerDef::new(c, "ps", 1).is_err());
    }
}
