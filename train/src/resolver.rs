//! Cluster resolvers, as TensorFlow's `ClusterResolver`s: where the `ClusterSpec` and this task's
//! role come from — flags, a file, `TF_CONFIG`, Slurm, an MPI launcher or torchrun.
//!
//! The environment is passed in as a map ([`Env`]; [`process_env`] reads the real one), so every
//! source is tested with a fake environment. Each result names its source, and a malformed
//! environment is an `InvalidArgument` that names the variable.
//!
//! With `--from-env` the sources are tried in this order:
//!
//! 1. `TF_CONFIG`, when set: its `cluster` and `task` are used as they are.
//! 2. An MPI launcher (`OMPI_COMM_WORLD_RANK`, `PMI_RANK`, `PMIX_RANK`, `MV2_COMM_WORLD_RANK`), when
//!    `--hosts` or `--hostfile` is given: MPI does not export the hosts, and `mpirun` inside a Slurm
//!    allocation leaves the `SLURM_*` variables of its own daemons around, which must not win.
//! 3. Slurm, when `SLURM_PROCID` is set. An MPI rank that disagrees with it is an error (it means
//!    `mpirun` started us, and the hosts are missing).
//! 4. torchrun, when `RANK` and `WORLD_SIZE` are set.
//!
//! For Slurm, MPI and torchrun, ranks are laid out node by node (Slurm's default block
//! distribution, mpirun's fill-by-slot); a task's port is the base port (`--port`, default
//! [`PORT_DEFAULT`]) plus its local index on its node; the first `--ps-tasks` ranks (default 1) are
//! `ps` tasks and the rest `worker` tasks. `--job`/`--task` given with `--from-env` override this
//! task's role (say, a `TF_CONFIG` that names no task).
//!
//! torchrun exports no host list. Without `--hosts`, every task is on `MASTER_ADDR`'s host, which
//! holds only for a single node (`LOCAL_WORLD_SIZE == WORLD_SIZE`; anything else is an error asking
//! for `--hosts`). torchrun's own rendezvous store listens on `MASTER_PORT`, so the base port is
//! `--port` or else `MASTER_PORT + 1`.

use rill_graph::{Error, Result};
use rill_transport::{ClusterSpec, ServerDef};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// The environment a resolver reads: variable name to value.
pub type Env = BTreeMap<String, String>;

/// Base port of tasks laid out from a launcher's environment (TensorFlow's customary port).
pub const PORT_DEFAULT: u16 = 2222;
/// How many of the first ranks are `ps` tasks unless `--ps-tasks` says otherwise.
pub const PS_TASKS_DEFAULT: u32 = 1;
/// Most hosts a hostlist or tasks-per-node string may expand to: bigger than any machine, small
/// enough that `n[0-999999999]` is an error rather than gigabytes of strings.
pub const HOSTLIST_HOSTS_MAX: usize = 65_536;
/// Most bytes of a hostfile or `TF_CONFIG` we read (both are a few KiB at most in practice).
pub const CONFIG_SIZE_MAX: usize = 4 << 20;

/// The MPI rank variables, in the order they are consulted.
pub const MPI_RANK_VARS: &[&str] = &["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"];
/// The MPI world-size variables (PMIx exports none; then the host slots give the size).
pub const MPI_SIZE_VARS: &[&str] = &["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"];
/// The MPI node-local rank variables, used to check the host layout.
pub const MPI_LOCAL_RANK_VARS: &[&str] =
    &["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK"];

/// The whole process environment (variables that are not UTF-8 are left out).
pub fn process_env() -> Env {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
}

/// What the user asked for: the `rill` flags that choose and shape a cluster.
#[derive(Clone, Debug, Default)]
pub struct ResolverOptions {
    /// `--cluster "ps=h1:2222;worker=h2:2222"`.
    pub cluster: Option<String>,
    /// `--cluster-file F` (the `--cluster` syntax, one job per line allowed).
    pub cluster_file: Option<PathBuf>,
    /// `--from-env`: `TF_CONFIG`, Slurm, MPI or torchrun.
    pub from_env: bool,
    /// `--job`: this task's job (required with `--cluster`/`--cluster-file`).
    pub job: Option<String>,
    /// `--task`: this task's index (default 0 with `--cluster`/`--cluster-file`).
    pub task: Option<u32>,
    /// `--ps-tasks N`: the first N ranks are `ps` tasks (launcher sources only).
    pub ps_tasks: Option<u32>,
    /// `--port P`: base port of launcher sources.
    pub port: Option<u16>,
    /// `--hosts`: hostlist of an MPI or torchrun launch, `host[:slots]` items (`n[01-04]:2,m`).
    pub hosts: Option<String>,
    /// `--hostfile F`: an MPI hostfile (`host slots=N`, `host:N` or `host` lines, `#` comments).
    pub hostfile: Option<PathBuf>,
}

/// A resolved cluster: the spec, this task's role, and where they came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedCluster {
    pub cluster: ClusterSpec,
    pub job: String,
    pub task_index: u32,
    /// `"--cluster"`, `"--cluster-file"`, `"TF_CONFIG"`, `"Slurm (SLURM_STEP_NODELIST)"`,
    /// `"MPI (PMI_RANK)"`, `"torchrun (RANK, WORLD_SIZE)"`, ...
    pub source: &'static str,
}

impl ResolvedCluster {
    /// This task's `host:port`.
    pub fn address(&self) -> Result<&str> {
        self.cluster.task_address(&self.job, self.task_index)
    }

    /// `/job:J/task:T`.
    pub fn task_name(&self) -> String {
        format!("/job:{}/task:{}", self.job, self.task_index)
    }

    pub fn server_def(&self) -> Result<ServerDef> {
        ServerDef::new(self.cluster.clone(), &self.job, self.task_index)
    }

    /// The one line a launcher prints: `cluster from SOURCE: SPEC; this task: /job:J/task:T at ADDR`.
    pub fn describe(&self) -> String {
        format!(
            "cluster from {}: {}; this task: {} at {}",
            self.source,
            self.cluster,
            self.task_name(),
            self.address().unwrap_or("?")
        )
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid_argument(msg)
}

/// Resolves the cluster from exactly one of `--cluster`, `--cluster-file` and `--from-env`.
pub fn resolve(opts: &ResolverOptions, env: &Env) -> Result<ResolvedCluster> {
    let given = [opts.cluster.is_some(), opts.cluster_file.is_some(), opts.from_env];
    match given.iter().filter(|g| **g).count() {
        0 => return Err(invalid("no cluster given: use --cluster, --cluster-file or --from-env")),
        1 => {}
        _ => return Err(invalid("give only one of --cluster, --cluster-file and --from-env")),
    }
    if !opts.from_env {
        for (set, flag) in [
            (opts.ps_tasks.is_some(), "--ps-tasks"),
            (opts.port.is_some(), "--port"),
            (opts.hosts.is_some(), "--hosts"),
            (opts.hostfile.is_some(), "--hostfile"),
        ] {
            if set {
                return Err(invalid(format!("{flag} applies only with --from-env")));
            }
        }
        let (cluster, source) = match (&opts.cluster, &opts.cluster_file) {
            (Some(s), _) => (ClusterSpec::parse(s).map_err(|e| e.context("--cluster"))?, "--cluster"),
            (None, Some(path)) => (ClusterSpec::from_file(path)?, "--cluster-file"),
            (None, None) => unreachable!("one source was checked to be given"),
        };
        let job =
            opts.job.clone().ok_or_else(|| invalid(format!("{source} needs --job (this task's job)")))?;
        let r = ResolvedCluster { cluster, job, task_index: opts.task.unwrap_or(0), source };
        r.address()?;
        return Ok(r);
    }
    let mut r = from_env(opts, env)?;
    if let Some(job) = &opts.job {
        r.job = job.clone();
    }
    if let Some(task) = opts.task {
        r.task_index = task;
    }
    r.address()?;
    Ok(r)
}

/// The `--from-env` resolution, in the order the module documentation gives.
fn from_env(opts: &ResolverOptions, env: &Env) -> Result<ResolvedCluster> {
    let hosts_given = opts.hosts.is_some() || opts.hostfile.is_some();
    if opts.hosts.is_some() && opts.hostfile.is_some() {
        return Err(invalid("give only one of --hosts and --hostfile"));
    }
    if let Some(text) = env.get("TF_CONFIG").filter(|t| !t.trim().is_empty()) {
        for (set, flag) in [
            (opts.ps_tasks.is_some(), "--ps-tasks"),
            (opts.port.is_some(), "--port"),
            (hosts_given, "--hosts/--hostfile"),
        ] {
            if set {
                return Err(invalid(format!("{flag} does not apply to TF_CONFIG, which names every task")));
            }
        }
        return tf_config(text, opts.job.is_some() && opts.task.is_some());
    }
    let mpi_rank = mpi_rank(env)?;
    if let (Some(_), true) = (&mpi_rank, hosts_given) {
        return mpi(opts, env);
    }
    if env.contains_key("SLURM_PROCID") {
        if hosts_given {
            return Err(invalid("--hosts/--hostfile do not apply to Slurm, which gives its own node list"));
        }
        if let Some((var, rank)) = mpi_rank {
            let procid = num::<u32>(env, "SLURM_PROCID")?;
            if procid != rank {
                return Err(invalid(format!(
                    "{var}={rank} but SLURM_PROCID={procid}: an MPI launcher inside a Slurm allocation \
                     started this task, and MPI does not export the hosts; pass --hosts or --hostfile"
                )));
            }
        }
        return slurm(opts, env);
    }
    if let Some((var, _)) = mpi_rank {
        return Err(invalid(format!(
            "{var} is set (an MPI launch), but MPI does not export the hosts; pass --hosts or --hostfile"
        )));
    }
    if env.contains_key("RANK") && env.contains_key("WORLD_SIZE") {
        return torchrun(opts, env);
    }
    Err(invalid(format!(
        "--from-env found no cluster in the environment (looked for TF_CONFIG, SLURM_PROCID, {}, \
         RANK and WORLD_SIZE)",
        MPI_RANK_VARS.join(", ")
    )))
}

/// Parses variable `var` as a number, naming it when it is malformed.
fn num<T: std::str::FromStr>(env: &Env, var: &str) -> Result<T> {
    let v = env.get(var).ok_or_else(|| invalid(format!("{var} is not set")))?;
    v.trim().parse::<T>().map_err(|_| invalid(format!("{var}='{v}' is not a valid number")))
}

fn num_opt<T: std::str::FromStr>(env: &Env, var: &str) -> Result<Option<T>> {
    if env.contains_key(var) {
        num(env, var).map(Some)
    } else {
        Ok(None)
    }
}

/// The first of `vars` that is set, parsed; every other one that is set must agree with it.
fn first_agreeing(env: &Env, vars: &[&'static str]) -> Result<Option<(&'static str, u32)>> {
    let mut found: Option<(&'static str, u32)> = None;
    for var in vars {
        if let Some(v) = num_opt::<u32>(env, var)? {
            match found {
                None => found = Some((var, v)),
                Some((first, w)) if w != v => {
                    return Err(invalid(format!(
                        "{first}={w} but {var}={v}: the launcher variables disagree"
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(found)
}

fn mpi_rank(env: &Env) -> Result<Option<(&'static str, u32)>> {
    first_agreeing(env, MPI_RANK_VARS)
}

/// `host:port`, bracketing IPv6 literals.
fn addr(host: &str, port: u32, port_var: &str) -> Result<String> {
    let port = u16::try_from(port)
        .map_err(|_| invalid(format!("port {port} for host {host} is past 65535 (check {port_var})")))?;
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// A host name from a launcher: no characters that would break the cluster-spec syntax.
fn check_host(host: &str, var: &str) -> Result<()> {
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || ",;#=@".contains(c)) {
        return Err(invalid(format!("{var}: bad host name '{host}'")));
    }
    Ok(())
}

/// Lays `rank_hosts` (one host per rank, node by node) out as a cluster: ports are `base_port` plus
/// the rank's index on its host; the first `ps_tasks` ranks are `ps`, the rest `worker`.
fn layout(
    rank_hosts: &[String],
    rank: u32,
    ps_tasks: u32,
    base_port: u16,
    port_var: &str,
    source: &'static str,
) -> Result<ResolvedCluster> {
    let n = rank_hosts.len();
    if rank as usize >= n {
        return Err(invalid(format!("{source}: rank {rank} is not below the {n} tasks of the launch")));
    }
    if ps_tasks as usize >= n {
        return Err(invalid(format!(
            "--ps-tasks {ps_tasks} leaves no worker among the {n} tasks of {source}"
        )));
    }
    let mut per_host: HashMap<&str, u32> = HashMap::new();
    let mut addrs = Vec::with_capacity(n);
    for host in rank_hosts {
        let local = per_host.entry(host.as_str()).or_insert(0);
        addrs.push(addr(host, base_port as u32 + *local, port_var)?);
        *local += 1;
    }
    let mut cluster = ClusterSpec::new();
    let (ps, workers) = addrs.split_at(ps_tasks as usize);
    if !ps.is_empty() {
        cluster.set_job("ps", &ps.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    cluster.set_job("worker", &workers.iter().map(String::as_str).collect::<Vec<_>>())?;
    let (job, task_index) = if rank < ps_tasks { ("ps", rank) } else { ("worker", rank - ps_tasks) };
    Ok(ResolvedCluster { cluster, job: job.into(), task_index, source })
}

/// The local index of `rank` on its host in `rank_hosts`.
fn local_index(rank_hosts: &[String], rank: u32) -> u32 {
    let host = &rank_hosts[rank as usize];
    rank_hosts[..rank as usize].iter().filter(|h| *h == host).count() as u32
}

// ---------------------------------------------------------------------------------------------
// TF_CONFIG

/// Resolves `TF_CONFIG` JSON: `{"cluster": {"ps": ["h:p"], "worker": [..]}, "task": {"type":
/// "worker", "index": 1}}`. A job may also be an object of index to address (sparse jobs). Without
/// `task`, `task_from_flags` must say that `--job` and `--task` name it.
pub fn tf_config(text: &str, task_from_flags: bool) -> Result<ResolvedCluster> {
    let ctx = |e: Error| e.context("TF_CONFIG");
    let v = json::parse(text.as_bytes()).map_err(ctx)?;
    let top = v.as_object().ok_or_else(|| invalid(format!("TF_CONFIG is {}, not an object", v.kind())))?;
    let cluster_v = json::get(top, "cluster").ok_or_else(|| invalid("TF_CONFIG has no \"cluster\""))?;
    let jobs = cluster_v
        .as_object()
        .ok_or_else(|| invalid(format!("TF_CONFIG \"cluster\" is {}, not an object", cluster_v.kind())))?;
    let mut spec_text = String::new();
    for (job, tasks) in jobs {
        let addr_of = |v: &json::Value, i: &str| -> Result<String> {
            let a = v.as_str().ok_or_else(|| {
                invalid(format!("TF_CONFIG cluster.{job}[{i}] is {}, not a \"host:port\" string", v.kind()))
            })?;
            check_host(a, &format!("TF_CONFIG cluster.{job}[{i}]"))?;
            Ok(a.to_string())
        };
        let entries: Vec<String> = match tasks {
            json::Value::Array(items) => {
                items.iter().enumerate().map(|(i, v)| addr_of(v, &i.to_string())).collect::<Result<_>>()?
            }
            json::Value::Object(items) => items
                .iter()
                .map(|(k, v)| {
                    let i: u32 = k.parse().map_err(|_| {
                        invalid(format!("TF_CONFIG cluster.{job}: task index \"{k}\" is not a number"))
                    })?;
                    Ok(format!("{i}@{}", addr_of(v, k)?))
                })
                .collect::<Result<_>>()?,
            other => {
                return Err(invalid(format!(
                    "TF_CONFIG cluster.{job} is {}, not a list of \"host:port\"",
                    other.kind()
                )))
            }
        };
        if job.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')) {
            return Err(invalid(format!("TF_CONFIG: bad job name \"{job}\"")));
        }
        if entries.is_empty() {
            return Err(invalid(format!("TF_CONFIG: job \"{job}\" has no tasks")));
        }
        spec_text.push_str(&format!("{job}={};", entries.join(",")));
    }
    let cluster = ClusterSpec::parse(&spec_text).map_err(ctx)?;
    let (job, task_index) = match json::get(top, "task") {
        None | Some(json::Value::Null) if task_from_flags => (String::new(), 0),
        None | Some(json::Value::Null) => {
            return Err(invalid("TF_CONFIG has no \"task\"; give --job and --task"));
        }
        Some(task) => {
            let t = task
                .as_object()
                .ok_or_else(|| invalid(format!("TF_CONFIG \"task\" is {}, not an object", task.kind())))?;
            let ty = json::get(t, "type")
                .and_then(json::Value::as_str)
                .ok_or_else(|| invalid("TF_CONFIG task.type is missing or not a string"))?;
            let index = match json::get(t, "index") {
                Some(json::Value::Number(n)) if n.fract() == 0.0 && *n >= 0.0 && *n <= u32::MAX as f64 => {
                    *n as u32
                }
                Some(other) => {
                    return Err(invalid(format!(
                        "TF_CONFIG task.index is {}, not a task index",
                        match other {
                            json::Value::Number(n) => n.to_string(),
                            o => o.kind().to_string(),
                        }
                    )))
                }
                None => return Err(invalid("TF_CONFIG task.index is missing")),
            };
            (ty.to_string(), index)
        }
    };
    Ok(ResolvedCluster { cluster, job, task_index, source: "TF_CONFIG" })
}

// ---------------------------------------------------------------------------------------------
// Slurm

/// Resolves a Slurm step: `SLURM_PROCID`, `SLURM_STEP_NODELIST` with `SLURM_STEP_TASKS_PER_NODE`
/// (or the job's `SLURM_JOB_NODELIST` with `SLURM_TASKS_PER_NODE`), and `SLURM_NTASKS` when set.
/// `SLURM_LOCALID`, when set, must match the block layout.
pub fn slurm(opts: &ResolverOptions, env: &Env) -> Result<ResolvedCluster> {
    let procid = num::<u32>(env, "SLURM_PROCID")?;
    let (list_var, tpn_var, source) = if env.contains_key("SLURM_STEP_NODELIST") {
        ("SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE", "Slurm (SLURM_STEP_NODELIST)")
    } else if env.contains_key("SLURM_JOB_NODELIST") {
        ("SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE", "Slurm (SLURM_JOB_NODELIST)")
    } else {
        return Err(invalid("SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is"));
    };
    let nodes = expand_hostlist(&env[list_var]).map_err(|e| e.context(list_var))?;
    for n in &nodes {
        check_host(n, list_var)?;
    }
    let ntasks = num_opt::<u32>(env, "SLURM_NTASKS")?;
    let per_node: Vec<u32> = match (env.get(tpn_var), ntasks) {
        (Some(t), _) => parse_tasks_per_node(t).map_err(|e| e.context(tpn_var))?,
        (None, Some(n)) if (n as usize).is_multiple_of(nodes.len()) => {
            vec![n / nodes.len() as u32; nodes.len()]
        }
        (None, Some(n)) => {
            return Err(invalid(format!(
                "{tpn_var} is not set and SLURM_NTASKS={n} does not divide among the {} nodes of {list_var}",
                nodes.len()
            )))
        }
        (None, None) => vec![1; nodes.len()],
    };
    if per_node.len() != nodes.len() {
        return Err(invalid(format!(
            "{tpn_var} gives {} nodes but {list_var} has {}",
            per_node.len(),
            nodes.len()
        )));
    }
    let total: u64 = per_node.iter().map(|&n| n as u64).sum();
    if total as usize > HOSTLIST_HOSTS_MAX {
        return Err(invalid(format!("{tpn_var}: {total} tasks is more than {HOSTLIST_HOSTS_MAX}")));
    }
    if let Some(n) = ntasks {
        if n as u64 != total {
            return Err(invalid(format!("SLURM_NTASKS={n} but {tpn_var} adds up to {total} tasks")));
        }
    }
    if procid as u64 >= total {
        return Err(invalid(format!("SLURM_PROCID={procid} is not below the {total} tasks of the step")));
    }
    let rank_hosts: Vec<String> =
        nodes.iter().zip(&per_node).flat_map(|(h, &k)| std::iter::repeat_n(h.clone(), k as usize)).collect();
    if let Some(local) = num_opt::<u32>(env, "SLURM_LOCALID")? {
        let want = local_index(&rank_hosts, procid);
        if local != want {
            return Err(invalid(format!(
                "SLURM_LOCALID={local} but the block layout puts task {procid} at index {want} on {}; \
                 run with --distribution=block",
                rank_hosts[procid as usize]
            )));
        }
    }
    layout(
        &rank_hosts,
        procid,
        opts.ps_tasks.unwrap_or(PS_TASKS_DEFAULT),
        opts.port.unwrap_or(PORT_DEFAULT),
        "--port",
        source,
    )
}

/// Expands a Slurm hostlist: `node[01-04,07]`, `a[1-2]b,c`, `n[001-003]-ib`, `r[1-2]n[1-2]`.
/// Zero padding follows the width of each range's low bound; several bracket groups expand with
/// the leftmost varying slowest, as Slurm does.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in split_top_level(list.trim())? {
        expand_item(item, &mut out)?;
    }
    Ok(out)
}

/// Splits at commas outside brackets, checking that brackets pair up and do not nest.
fn split_top_level(s: &str) -> Result<Vec<&str>> {
    let (mut items, mut start, mut open) = (Vec::new(), 0, None::<usize>);
    for (i, c) in s.char_indices() {
        match (c, open) {
            ('[', Some(o)) => {
                return Err(invalid(format!("'{s}': nested '[' at byte {i} (the one at {o} is open)")))
            }
            ('[', None) => open = Some(i),
            (']', None) => return Err(invalid(format!("'{s}': ']' without '[' at byte {i}"))),
            (']', Some(_)) => open = None,
            (',', None) => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if let Some(o) = open {
        return Err(invalid(format!("'{s}': '[' at byte {o} is never closed")));
    }
    items.push(&s[start..]);
    if let Some(i) = items.iter().position(|i| i.trim().is_empty()) {
        return Err(invalid(format!("'{s}': host {} of the list is empty", i + 1)));
    }
    Ok(items)
}

/// Expands one hostlist item (no top-level commas) onto `out`.
fn expand_item(item: &str, out: &mut Vec<String>) -> Result<()> {
    let bad = |what: String| invalid(format!("hostlist item '{item}': {what}"));
    // Segments alternate: literal text, then the expansions of one bracket group.
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut rest = item;
    while !rest.is_empty() {
        let lit_end = rest.find('[').unwrap_or(rest.len());
        let lit = &rest[..lit_end];
        if let Some(c) = lit.chars().find(|c| !(c.is_ascii_alphanumeric() || "-._".contains(*c))) {
            return Err(bad(format!("bad character '{c}'")));
        }
        if !lit.is_empty() {
            groups.push(vec![lit.to_string()]);
        }
        rest = &rest[lit_end..];
        if rest.is_empty() {
            break;
        }
        let close = rest.find(']').ok_or_else(|| bad("unclosed '['".into()))?;
        groups.push(expand_ranges(&rest[1..close]).map_err(|e| bad(e.msg))?);
        rest = &rest[close + 1..];
    }
    let count = groups
        .iter()
        .try_fold(1usize, |acc, g| acc.checked_mul(g.len()).filter(|&n| n <= HOSTLIST_HOSTS_MAX))
        .filter(|&n| out.len() + n <= HOSTLIST_HOSTS_MAX)
        .ok_or_else(|| bad(format!("expands past {HOSTLIST_HOSTS_MAX} hosts")))?;
    let mut hosts = vec![String::new()];
    for g in &groups {
        hosts = hosts.iter().flat_map(|h| g.iter().map(move |s| format!("{h}{s}"))).collect();
    }
    debug_assert_eq!(hosts.len(), count);
    out.extend(hosts);
    Ok(())
}

/// `01-04,07` → `01 02 03 04 07`.
fn expand_ranges(body: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for r in body.split(',') {
        let (lo, hi) = r.split_once('-').unwrap_or((r, r));
        let digits = |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(invalid(format!("bad range '{r}' in brackets (want N or N-M, up to 18 digits)")));
        }
        let (l, h): (u64, u64) = (lo.parse().unwrap_or(0), hi.parse().unwrap_or(0));
        if l > h {
            return Err(invalid(format!("range '{r}' runs backwards")));
        }
        if h - l >= (HOSTLIST_HOSTS_MAX - out.len()) as u64 {
            return Err(invalid(format!("range '{r}' expands past {HOSTLIST_HOSTS_MAX} hosts")));
        }
        out.extend((l..=h).map(|v| format!("{v:0width$}", width = lo.len())));
    }
    Ok(out)
}

/// Expands Slurm's tasks-per-node string: `3(x2),1` → `[3, 3, 1]`.
pub fn parse_tasks_per_node(s: &str) -> Result<Vec<u32>> {
    let mut out: Vec<u32> = Vec::new();
    for item in s.trim().split(',') {
        let bad = || invalid(format!("'{s}': bad item '{item}' (want N or N(xM))"));
        let (n, times) = match item.split_once("(x") {
            Some((n, rest)) => {
                (n, rest.strip_suffix(')').ok_or_else(bad)?.parse::<u32>().map_err(|_| bad())?)
            }
            None => (item, 1),
        };
        let n: u32 = n.parse().map_err(|_| bad())?;
        if times == 0 {
            return Err(bad());
        }
        if out.len() + times as usize > HOSTLIST_HOSTS_MAX {
            return Err(invalid(format!("'{s}' expands past {HOSTLIST_HOSTS_MAX} nodes")));
        }
        out.extend(std::iter::repeat_n(n, times as usize));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// MPI launchers and torchrun: hosts come from flags.

/// One host of `--hosts` or a hostfile, with its slot count when one is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSlots {
    pub host: String,
    pub slots: Option<u32>,
}

/// Parses `--hosts`: hostlist items, each optionally `:SLOTS` (`n[01-02]:4,login`).
pub fn parse_hosts_flag(s: &str) -> Result<Vec<HostSlots>> {
    let mut out = Vec::new();
    for item in split_top_level(s.trim()).map_err(|e| e.context("--hosts"))? {
        let (list, slots) = match item.rsplit_once(':') {
            Some((l, n)) => {
                (l, Some(parse_slots(n).map_err(|e| e.context(format!("--hosts item '{item}'")))?))
            }
            None => (item, None),
        };
        let mut hosts = Vec::new();
        expand_item(list, &mut hosts).map_err(|e| e.context("--hosts"))?;
        out.extend(hosts.into_iter().map(|host| HostSlots { host, slots }));
        if out.len() > HOSTLIST_HOSTS_MAX {
            return Err(invalid(format!("--hosts expands past {HOSTLIST_HOSTS_MAX} hosts")));
        }
    }
    Ok(out)
}

fn parse_slots(n: &str) -> Result<u32> {
    match n.parse::<u32>() {
        Ok(k) if k > 0 && k as usize <= HOSTLIST_HOSTS_MAX => Ok(k),
        _ => Err(invalid(format!("bad slot count '{n}' (want 1 to {HOSTLIST_HOSTS_MAX})"))),
    }
}

/// Parses an MPI hostfile: `host`, `host slots=N [max_slots=M]` (Open MPI) or `host:N` (MPICH)
/// per line; `#` starts a comment.
pub fn parse_hostfile(text: &str) -> Result<Vec<HostSlots>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = |e: Error| e.context(format!("hostfile line {}", i + 1));
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let (host, mut slots) = match first.split_once(':') {
            Some((h, n)) => (h, Some(parse_slots(n).map_err(at)?)),
            None => (first, None),
        };
        check_host(host, "hostfile").map_err(at)?;
        for w in words {
            match w.split_once('=') {
                Some(("slots", n)) => slots = Some(parse_slots(n).map_err(at)?),
                Some(("max_slots" | "max-slots", _)) => {}
                _ => return Err(at(invalid(format!("unknown word '{w}' (want slots=N)")))),
            }
        }
        out.push(HostSlots { host: host.to_string(), slots });
        if out.len() > HOSTLIST_HOSTS_MAX {
            return Err(invalid(format!("hostfile has more than {HOSTLIST_HOSTS_MAX} hosts")));
        }
    }
    if out.is_empty() {
        return Err(invalid("hostfile names no host"));
    }
    Ok(out)
}

/// Host slots from `--hosts` or `--hostfile`.
fn flag_hosts(opts: &ResolverOptions) -> Result<Option<(Vec<HostSlots>, &'static str)>> {
    if let Some(h) = &opts.hosts {
        return Ok(Some((parse_hosts_flag(h)?, "--hosts")));
    }
    if let Some(path) = &opts.hostfile {
        let text = read_small_file(path, "hostfile")?;
        return Ok(Some((parse_hostfile(&text).map_err(|e| e.context(path.display()))?, "--hostfile")));
    }
    Ok(None)
}

/// Reads a small text file, refusing one past [`CONFIG_SIZE_MAX`].
fn read_small_file(path: &std::path::Path, what: &str) -> Result<String> {
    let cannot = |e: std::io::Error| {
        Error::new(Error::from(e).code, format!("{what} {}: cannot read", path.display()))
    };
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if meta.len() > CONFIG_SIZE_MAX as u64 {
        return Err(invalid(format!("{what} {} is larger than {CONFIG_SIZE_MAX} bytes", path.display())));
    }
    std::fs::read_to_string(path).map_err(cannot)
}

/// One host per rank for `size` ranks: with no slot counts and `size` a multiple of the host
/// count, each host takes `size / hosts` ranks; otherwise ranks fill the slots in order (one slot
/// per host unless given), as mpirun does.
fn rank_hosts(hosts: &[HostSlots], size: u32, flag: &str) -> Result<Vec<String>> {
    let n = hosts.len() as u32;
    if n == 0 {
        return Err(invalid(format!("{flag} names no host")));
    }
    if hosts.iter().all(|h| h.slots.is_none()) && size.is_multiple_of(n) {
        let per = (size / n) as usize;
        return Ok(hosts.iter().flat_map(|h| std::iter::repeat_n(h.host.clone(), per)).collect());
    }
    let mut out = Vec::with_capacity(size as usize);
    for h in hosts {
        let take = (h.slots.unwrap_or(1) as usize).min(size as usize - out.len());
        out.extend(std::iter::repeat_n(h.host.clone(), take));
    }
    if out.len() < size as usize {
        return Err(invalid(format!("{size} ranks but {flag} gives only {} slots", out.len())));
    }
    Ok(out)
}

/// Checks a launcher's node-local rank against the layout.
fn check_local(env: &Env, vars: &[&'static str], hosts: &[String], rank: u32, flag: &str) -> Result<()> {
    if let Some((var, local)) = first_agreeing(env, vars)? {
        let want = local_index(hosts, rank);
        if local != want {
            return Err(invalid(format!(
                "{var}={local} but {flag} puts rank {rank} at index {want} on {}; the hosts do not match \
                 the launch",
                hosts[rank as usize]
            )));
        }
    }
    Ok(())
}

/// Resolves an MPI launch: the rank from the launcher's variables, the hosts from `--hosts` or
/// `--hostfile`, the size from the launcher (or, under PMIx, which exports none, the slot count).
pub fn mpi(opts: &ResolverOptions, env: &Env) -> Result<ResolvedCluster> {
    let (rank_var, rank) =
        mpi_rank(env)?.ok_or_else(|| invalid(format!("none of {} is set", MPI_RANK_VARS.join(", "))))?;
    let (hosts, flag) = flag_hosts(opts)?.ok_or_else(|| {
        invalid(format!("{rank_var} is set, but MPI does not export the hosts; pass --hosts or --hostfile"))
    })?;
    let (size_var, size): (&str, u64) = match first_agreeing(env, MPI_SIZE_VARS)? {
        Some((var, s)) => (var, s as u64),
        None => (flag, hosts.iter().map(|h| h.slots.unwrap_or(1) as u64).sum()),
    };
    if size == 0 || size > HOSTLIST_HOSTS_MAX as u64 {
        return Err(invalid(format!(
            "{size_var}: world size {size} is not between 1 and {HOSTLIST_HOSTS_MAX}"
        )));
    }
    let size = size as u32;
    if rank >= size {
        return Err(invalid(format!("{rank_var}={rank} is not below the world size {size}")));
    }
    let per_rank = rank_hosts(&hosts, size, flag)?;
    check_local(env, MPI_LOCAL_RANK_VARS, &per_rank, rank, flag)?;
    let source = match rank_var {
        "OMPI_COMM_WORLD_RANK" => "MPI (OMPI_COMM_WORLD_RANK)",
        "PMI_RANK" => "MPI (PMI_RANK)",
        "PMIX_RANK" => "MPI (PMIX_RANK)",
        _ => "MPI (MV2_COMM_WORLD_RANK)",
    };
    layout(
        &per_rank,
        rank,
        opts.ps_tasks.unwrap_or(PS_TASKS_DEFAULT),
        opts.port.unwrap_or(PORT_DEFAULT),
        "--port",
        source,
    )
}

/// Resolves a torchrun launch (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
/// `MASTER_ADDR`, `MASTER_PORT`); see the module documentation for the host and port rule.
pub fn torchrun(opts: &ResolverOptions, env: &Env) -> Result<ResolvedCluster> {
    let rank = num::<u32>(env, "RANK")?;
    let size = num::<u32>(env, "WORLD_SIZE")?;
    if size == 0 || size as usize > HOSTLIST_HOSTS_MAX {
        return Err(invalid(format!("WORLD_SIZE={size} is not between 1 and {HOSTLIST_HOSTS_MAX}")));
    }
    if rank >= size {
        return Err(invalid(format!("RANK={rank} is not below WORLD_SIZE={size}")));
    }
    let (base, port_var) = match (opts.port, num_opt::<u16>(env, "MASTER_PORT")?) {
        (Some(p), _) => (p, "--port"),
        (None, Some(p)) => (
            p.checked_add(1)
                .ok_or_else(|| invalid("MASTER_PORT=65535 leaves no port above it; pass --port"))?,
            "MASTER_PORT",
        ),
        (None, None) => return Err(invalid("MASTER_PORT is not set; pass --port")),
    };
    let per_rank = match flag_hosts(opts)? {
        Some((hosts, flag)) => {
            let per_rank = rank_hosts(&hosts, size, flag)?;
            check_local(env, &["LOCAL_RANK"], &per_rank, rank, flag)?;
            per_rank
        }
        None => {
            let master =
                env.get("MASTER_ADDR").ok_or_else(|| invalid("MASTER_ADDR is not set; pass --hosts"))?;
            check_host(master, "MASTER_ADDR")?;
            let local_size = num_opt::<u32>(env, "LOCAL_WORLD_SIZE")?;
            let local = num_opt::<u32>(env, "LOCAL_RANK")?;
            if local_size.is_some_and(|l| l != size) || local.is_some_and(|l| l != rank) {
                return Err(invalid(format!(
                    "torchrun across several nodes (WORLD_SIZE={size}, LOCAL_WORLD_SIZE={}): torchrun \
                     does not export the other nodes' hosts; pass --hosts",
                    local_size.map(|l| l.to_string()).unwrap_or_else(|| "unset".into())
                )));
            }
            vec![master.clone(); size as usize]
        }
    };
    layout(
        &per_rank,
        rank,
        opts.ps_tasks.unwrap_or(PS_TASKS_DEFAULT),
        base,
        port_var,
        "torchrun (RANK, WORLD_SIZE)",
    )
}

// ---------------------------------------------------------------------------------------------

/// A small JSON parser for `TF_CONFIG`: objects, arrays, strings with escapes, numbers, `true`,
/// `false`, `null`. Every error is an `InvalidArgument` with the byte offset; no input panics.
pub mod json {
    use rill_graph::{Error, Result};

    /// Deepest nesting accepted: recursion is bounded, so no input can overflow the stack.
    pub const DEPTH_MAX: usize = 64;

    #[derive(Clone, Debug, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Number(f64),
        String(String),
        Array(Vec<Value>),
        /// Members in document order; duplicate keys are rejected while parsing.
        Object(Vec<(String, Value)>),
    }

    impl Value {
        /// `"null"`, `"a number"`, ... for messages.
        pub fn kind(&self) -> &'static str {
            match self {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => "an object",
            }
        }

        pub fn as_str(&self) -> Option<&str> {
            match self {
                Value::String(s) => Some(s),
                _ => None,
            }
        }

        pub fn as_object(&self) -> Option<&[(String, Value)]> {
            match self {
                Value::Object(m) => Some(m),
                _ => None,
            }
        }
    }

    /// The member `key` of an object's members.
    pub fn get<'a>(members: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
        members.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Parses one JSON document (surrounding whitespace allowed, nothing else after it).
    pub fn parse(text: &[u8]) -> Result<Value> {
        let mut p = Parser { b: text, pos: 0 };
        let v = p.value(0)?;
        p.ws();
        if p.pos < p.b.len() {
            return Err(p.err("unexpected data after the JSON value"));
        }
        Ok(v)
    }

    struct Parser<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn err_at(&self, at: usize, what: &str) -> Error {
            Error::invalid_argument(format!("JSON: {what} at byte {at}"))
        }

        fn err(&self, what: &str) -> Error {
            self.err_at(self.pos, what)
        }

        fn peek(&self) -> Option<u8> {
            self.b.get(self.pos).copied()
        }

        fn ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.pos += 1;
            }
        }

        fn unexpected(&self) -> Error {
            match self.peek() {
                None => self.err("unexpected end of input"),
                Some(c) if c.is_ascii_graphic() => self.err(&format!("unexpected '{}'", c as char)),
                Some(c) => self.err(&format!("unexpected byte 0x{c:02x}")),
            }
        }

        fn expect(&mut self, c: u8) -> Result<()> {
            if self.peek() == Some(c) {
                self.pos += 1;
                Ok(())
            } else {
                Err(self.unexpected())
            }
        }

        fn value(&mut self, depth: usize) -> Result<Value> {
            self.ws();
            match self.peek() {
                Some(b'{') => self.object(depth + 1),
                Some(b'[') => self.array(depth + 1),
                Some(b'"') => self.string().map(Value::String),
                Some(b't') => self.literal("true", Value::Bool(true)),
                Some(b'f') => self.literal("false", Value::Bool(false)),
                Some(b'n') => self.literal("null", Value::Null),
                Some(b'-' | b'0'..=b'9') => self.number(),
                _ => Err(self.unexpected()),
            }
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value> {
            if self.b[self.pos..].starts_with(word.as_bytes()) {
                self.pos += word.len();
                Ok(v)
            } else {
                Err(self.err(&format!("bad literal (want {word})")))
            }
        }

        fn enter(&self, depth: usize) -> Result<()> {
            if depth > DEPTH_MAX {
                return Err(self.err(&format!("nesting deeper than {DEPTH_MAX}")));
            }
            Ok(())
        }

        fn array(&mut self, depth: usize) -> Result<Value> {
            self.enter(depth)?;
            self.pos += 1;
            let mut items = Vec::new();
            self.ws();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Value::Array(items));
            }
            loop {
                items.push(self.value(depth)?);
                self.ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b']') => {
                        self.pos += 1;
                        return Ok(Value::Array(items));
                    }
                    _ => return Err(self.unexpected()),
                }
            }
        }

        fn object(&mut self, depth: usize) -> Result<Value> {
            self.enter(depth)?;
            self.pos += 1;
            let mut members: Vec<(String, Value)> = Vec::new();
            self.ws();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(Value::Object(members));
            }
            loop {
                self.ws();
                let key_at = self.pos;
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected a string key"));
                }
                let key = self.string()?;
                if members.iter().any(|(k, _)| *k == key) {
                    return Err(self.err_at(key_at, &format!("duplicate key \"{key}\"")));
                }
                self.ws();
                self.expect(b':')?;
                let v = self.value(depth)?;
                members.push((key, v));
                self.ws();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        return Ok(Value::Object(members));
                    }
                    _ => return Err(self.unexpected()),
                }
            }
        }

        fn hex4(&mut self) -> Result<u32> {
            let at = self.pos;
            let digits = self.b.get(at..at + 4).ok_or_else(|| self.err("truncated \\u escape"))?;
            let mut v = 0u32;
            for &d in digits {
                let x = (d as char).to_digit(16).ok_or_else(|| self.err_at(at, "bad \\u escape"))?;
                v = v * 16 + x;
            }
            self.pos += 4;
            Ok(v)
        }

        fn string(&mut self) -> Result<String> {
            let start = self.pos;
            self.pos += 1;
            let mut out: Vec<u8> = Vec::new();
            loop {
                let c = self.peek().ok_or_else(|| self.err_at(start, "unterminated string"))?;
                match c {
                    b'"' => {
                        self.pos += 1;
                        return String::from_utf8(out)
                            .map_err(|_| self.err_at(start, "invalid UTF-8 in string"));
                    }
                    b'\\' => {
                        let esc_at = self.pos;
                        self.pos += 1;
                        let e = self.peek().ok_or_else(|| self.err_at(start, "unterminated string"))?;
                        self.pos += 1;
                        let ch = match e {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let hi = self.hex4()?;
                                let code = if (0xD800..0xDC00).contains(&hi) {
                                    if !self.b[self.pos..].starts_with(b"\\u") {
                                        return Err(self.err_at(esc_at, "unpaired surrogate"));
                                    }
                                    self.pos += 2;
                                    let lo = self.hex4()?;
                                    if !(0xDC00..0xE000).contains(&lo) {
                                        return Err(self.err_at(esc_at, "unpaired surrogate"));
                                    }
                                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                } else {
                                    hi
                                };
                                char::from_u32(code)
                                    .ok_or_else(|| self.err_at(esc_at, "unpaired surrogate"))?
                            }
                            _ => return Err(self.err_at(esc_at, "bad escape")),
                        };
                        out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                    }
                    0..=0x1f => return Err(self.err("control character in string")),
                    _ => {
                        out.push(c);
                        self.pos += 1;
                    }
                }
            }
        }

        fn digits(&mut self) -> usize {
            let from = self.pos;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.pos += 1;
            }
            self.pos - from
        }

        fn number(&mut self) -> Result<Value> {
            let start = self.pos;
            if self.peek() == Some(b'-') {
                self.pos += 1;
            }
            match self.peek() {
                Some(b'0') => self.pos += 1,
                Some(b'1'..=b'9') => {
                    self.digits();
                }
                _ => return Err(self.err("bad number")),
            }
            if self.peek() == Some(b'.') {
                self.pos += 1;
                if self.digits() == 0 {
                    return Err(self.err("bad number: no digits after '.'"));
                }
            }
            if matches!(self.peek(), Some(b'e' | b'E')) {
                self.pos += 1;
                if matches!(self.peek(), Some(b'+' | b'-')) {
                    self.pos += 1;
                }
                if self.digits() == 0 {
                    return Err(self.err("bad number: no digits in exponent"));
                }
            }
            // The scanned bytes are ASCII digits and signs, so they are valid UTF-8.
            let text = std::str::from_utf8(&self.b[start..self.pos])
                .map_err(|_| self.err_at(start, "bad number"))?;
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Value::Number(v)),
                _ => Err(self.err_at(start, "number out of range")),
            }
        }
    }
}
