//! Cluster resolvers against fake environments: flags, files, TF_CONFIG, Slurm, MPI launchers and
//! torchrun; hostlist and tasks-per-node expansion; the JSON parser, including random bytes.

use rill_graph::Code;
use rill_train::resolver::{
    expand_hostlist, json, parse_hostfile, parse_hosts_flag, parse_tasks_per_node, resolve, tf_config, Env,
    HostSlots, ResolverOptions,
};
use std::path::PathBuf;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn from_env() -> ResolverOptions {
    ResolverOptions { from_env: true, ..Default::default() }
}

/// A file with `text` under the temp dir, named for this test process and `tag`.
fn temp_file(tag: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rill-resolver-{}-{tag}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

/// Expectation: `Ok((source, spec, "/job:J/task:T at ADDR"))` or `Err(substring of the message)`.
type Want = Result<(&'static str, &'static str, &'static str), &'static str>;

fn check(label: &str, opts: &ResolverOptions, e: &[(&str, &str)], want: Want) {
    match (resolve(opts, &env(e)), want) {
        (Ok(r), Ok((source, spec, task))) => {
            assert_eq!(r.source, source, "{label}");
            assert_eq!(r.cluster.to_string(), spec, "{label}");
            assert_eq!(format!("{} at {}", r.task_name(), r.address().unwrap()), task, "{label}");
        }
        (Err(err), Err(part)) => {
            assert_eq!(err.code, Code::InvalidArgument, "{label}: {err}");
            assert!(err.msg.contains(part), "{label}: '{}' does not mention '{part}'", err.msg);
        }
        (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
    }
}

#[test]
fn hostlists_expand() {
    let ok: &[(&str, &[&str])] = &[
        ("node[01-04,07]", &["node01", "node02", "node03", "node04", "node07"]),
        ("a[1-2]b,c", &["a1b", "a2b", "c"]),
        ("n[001-003]-ib", &["n001-ib", "n002-ib", "n003-ib"]),
        ("r[1-2]n[1-2]", &["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[8-11]", &["n8", "n9", "n10", "n11"]),
        ("n[098-101]", &["n098", "n099", "n100", "n101"]),
        ("n[7],m", &["n7", "m"]),
        ("[1-2].ib", &["1.ib", "2.ib"]),
        (" host.example.org ", &["host.example.org"]),
        ("a[0-1],b[2-3]x", &["a0", "a1", "b2x", "b3x"]),
    ];
    for (list, want) in ok {
        assert_eq!(expand_hostlist(list).unwrap(), *want, "{list}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "empty"),
        ("a,,b", "host 2 of the list is empty"),
        ("n[1-2", "never closed"),
        ("n1-2]", "without '['"),
        ("n[[1]]", "nested"),
        ("n[2-1]", "backwards"),
        ("n[a-b]", "bad range"),
        ("n[]", "bad range"),
        ("n[1-]", "bad range"),
        ("n[1-2,]", "bad range"),
        ("n[0-9999999]", "expands past"),
        ("n[1-300]m[1-300]", "expands past"),
        ("n[1234567890123456789]", "bad range"),
        ("a b", "bad character"),
        ("n;1", "bad character"),
    ];
    for (list, part) in bad {
        let e = expand_hostlist(list).unwrap_err();
        assert!(e.code == Code::InvalidArgument && e.msg.contains(part), "{list}: {e}");
    }
}

#[test]
fn tasks_per_node_expand() {
    let ok: &[(&str, &[u32])] =
        &[("3(x2),1", &[3, 3, 1]), ("2", &[2]), ("1(x3)", &[1, 1, 1]), ("4,2(x1),1", &[4, 2, 1])];
    for (s, want) in ok {
        assert_eq!(parse_tasks_per_node(s).unwrap(), *want, "{s}");
    }
    for s in ["", "x", "3(x0)", "3(x2", "3(2)", "-1", "3(x2),", "3(xa)", "1(x99999999)"] {
        assert_eq!(parse_tasks_per_node(s).unwrap_err().code, Code::InvalidArgument, "{s}");
    }
}

#[test]
fn hosts_flags_and_hostfiles_parse() {
    let hs = |v: &[(&str, Option<u32>)]| {
        v.iter().map(|(h, s)| HostSlots { host: h.to_string(), slots: *s }).collect::<Vec<_>>()
    };
    assert_eq!(
        parse_hosts_flag("n[01-02]:4,login").unwrap(),
        hs(&[("n01", Some(4)), ("n02", Some(4)), ("login", None)])
    );
    assert_eq!(
        parse_hostfile("# nodes\nn1 slots=2 max_slots=4\nn2:3\n\nn3 # spare\n").unwrap(),
        hs(&[("n1", Some(2)), ("n2", Some(3)), ("n3", None)])
    );
    for bad in ["n1:0", "n1:x", "n[1-2", ""] {
        assert!(parse_hosts_flag(bad).is_err(), "{bad}");
    }
    for (bad, part) in
        [("n1 slots=0", "line 1"), ("n1\nn2 cpus=4", "line 2"), ("# empty\n", "no host"), ("a;b", "bad host")]
    {
        let e = parse_hostfile(bad).unwrap_err();
        assert!(e.msg.contains(part), "{bad}: {e}");
    }
}

#[test]
fn flags_and_files() {
    let file = temp_file("cluster", "# the cluster\nps=h1:2222\nworker=h2:2222,h3:2222\n");
    let flags = |cluster: Option<&str>, job: Option<&str>, task: Option<u32>| ResolverOptions {
        cluster: cluster.map(String::from),
        job: job.map(String::from),
        task,
        ..Default::default()
    };
    let spec = "ps=h1:2222;worker=h2:2222,h3:2222";
    check(
        "cluster flag",
        &flags(Some(spec), Some("worker"), Some(1)),
        &[],
        Ok(("--cluster", spec, "/job:worker/task:1 at h3:2222")),
    );
    check(
        "task defaults to 0",
        &flags(Some(spec), Some("ps"), None),
        &[],
        Ok(("--cluster", spec, "/job:ps/task:0 at h1:2222")),
    );
    let from_file = ResolverOptions {
        cluster_file: Some(file.clone()),
        job: Some("worker".into()),
        ..Default::default()
    };
    check("cluster file", &from_file, &[], Ok(("--cluster-file", spec, "/job:worker/task:0 at h2:2222")));
    // Flags win over an environment that is never read without --from-env.
    check(
        "env ignored",
        &flags(Some(spec), Some("ps"), Some(0)),
        &[("TF_CONFIG", "{")],
        Ok(("--cluster", spec, "/job:ps/task:0 at h1:2222")),
    );
    check("no job", &flags(Some(spec), None, None), &[], Err("--cluster needs --job"));
    check(
        "task not in spec",
        &flags(Some(spec), Some("worker"), Some(2)),
        &[],
        Err("/job:worker/task:2 is not in the cluster spec"),
    );
    check("bad spec", &flags(Some("ps=h1"), Some("ps"), None), &[], Err("--cluster: bad address 'h1'"));
    check("no source", &ResolverOptions::default(), &[], Err("no cluster given"));
    let two = ResolverOptions { from_env: true, ..flags(Some(spec), Some("ps"), None) };
    check("two sources", &two, &[], Err("only one of"));
    let stray = ResolverOptions { ps_tasks: Some(2), ..flags(Some(spec), Some("ps"), None) };
    check("launcher flag without --from-env", &stray, &[], Err("--ps-tasks applies only with --from-env"));
    let missing = ResolverOptions {
        cluster_file: Some("/nonexistent/rill-cluster".into()),
        job: Some("ps".into()),
        ..Default::default()
    };
    assert_eq!(resolve(&missing, &env(&[])).unwrap_err().code, Code::NotFound);
    let _ = std::fs::remove_file(file);
}

#[test]
fn tf_config_table() {
    let base = r#"{"cluster": {"chief": ["c:1"], "ps": ["p:2"], "worker": ["w0:3", "w1:3"]}, "task": {"type": "worker", "index": 1}}"#;
    let with_flags = ResolverOptions { job: Some("ps".into()), task: Some(0), ..from_env() };
    let cases: &[(&str, &ResolverOptions, &str, Want)] = &[
        (
            "basic",
            &from_env(),
            base,
            Ok(("TF_CONFIG", "chief=c:1;ps=p:2;worker=w0:3,w1:3", "/job:worker/task:1 at w1:3")),
        ),
        (
            "flags override the task",
            &with_flags,
            base,
            Ok(("TF_CONFIG", "chief=c:1;ps=p:2;worker=w0:3,w1:3", "/job:ps/task:0 at p:2")),
        ),
        (
            "sparse job",
            &from_env(),
            r#"{"cluster":{"worker":{"1":"a:1","3":"b:2"}},"task":{"type":"worker","index":3,"rpc_layer":"grpc"}}"#,
            Ok(("TF_CONFIG", "worker=1@a:1,3@b:2", "/job:worker/task:3 at b:2")),
        ),
        (
            "escapes",
            &from_env(),
            "{\"cluster\":{\"w\":[\"h\\u0031:5\"]},\"task\":{\"type\":\"\\u0077\",\"index\":0.0e0}}",
            Ok(("TF_CONFIG", "w=h1:5", "/job:w/task:0 at h1:5")),
        ),
        (
            "no task but flags",
            &with_flags,
            r#"{"cluster":{"ps":["p:2"]}}"#,
            Ok(("TF_CONFIG", "ps=p:2", "/job:ps/task:0 at p:2")),
        ),
        ("no task", &from_env(), r#"{"cluster":{"ps":["p:2"]}}"#, Err("no \"task\"; give --job and --task")),
        (
            "bad json",
            &from_env(),
            r#"{"cluster": {"ps": ["p:2",]}}"#,
            Err("TF_CONFIG: JSON: unexpected ']' at byte 26"),
        ),
        ("not an object", &from_env(), "[1]", Err("TF_CONFIG is an array, not an object")),
        ("no cluster", &from_env(), r#"{"task":{}}"#, Err("no \"cluster\"")),
        (
            "job not a list",
            &from_env(),
            r#"{"cluster":{"ps":"p:2"},"task":{"type":"ps","index":0}}"#,
            Err("cluster.ps is a string"),
        ),
        (
            "address not a string",
            &from_env(),
            r#"{"cluster":{"ps":[2222]},"task":{"type":"ps","index":0}}"#,
            Err("cluster.ps[0] is a number"),
        ),
        (
            "address breaks the spec",
            &from_env(),
            r#"{"cluster":{"ps":["a;b:1"]},"task":{"type":"ps","index":0}}"#,
            Err("bad host name 'a;b:1'"),
        ),
        (
            "empty job",
            &from_env(),
            r#"{"cluster":{"ps":[]},"task":{"type":"ps","index":0}}"#,
            Err("job \"ps\" has no tasks"),
        ),
        (
            "negative index",
            &from_env(),
            r#"{"cluster":{"ps":["p:2"]},"task":{"type":"ps","index":-1}}"#,
            Err("task.index is -1"),
        ),
        (
            "fractional index",
            &from_env(),
            r#"{"cluster":{"ps":["p:2"]},"task":{"type":"ps","index":1.5}}"#,
            Err("task.index is 1.5"),
        ),
        (
            "string index",
            &from_env(),
            r#"{"cluster":{"ps":["p:2"]},"task":{"type":"ps","index":"0"}}"#,
            Err("task.index is a string"),
        ),
        (
            "task not in cluster",
            &from_env(),
            r#"{"cluster":{"ps":["p:2"]},"task":{"type":"evaluator","index":0}}"#,
            Err("/job:evaluator/task:0 is not in the cluster spec"),
        ),
        (
            "bad sparse index",
            &from_env(),
            r#"{"cluster":{"ps":{"x":"p:2"}},"task":{"type":"ps","index":0}}"#,
            Err("task index \"x\""),
        ),
    ];
    for (label, opts, text, want) in cases {
        check(label, opts, &[("TF_CONFIG", text), ("SLURM_PROCID", "0")], *want);
    }
    let stray = ResolverOptions { ps_tasks: Some(1), ..from_env() };
    check(
        "launcher flag with TF_CONFIG",
        &stray,
        &[("TF_CONFIG", base)],
        Err("--ps-tasks does not apply to TF_CONFIG"),
    );
}

#[test]
fn slurm_table() {
    let step = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "7"),
        ("SLURM_STEP_NODELIST", "n[01-02],m07"),
        ("SLURM_STEP_TASKS_PER_NODE", "3(x2),1"),
        ("SLURM_JOB_NODELIST", "ignored[1-9]"),
    ];
    let with = |over: &[(&'static str, &'static str)]| {
        let mut e: Vec<(&str, &str)> =
            step.iter().filter(|(k, _)| !over.iter().any(|(o, _)| o == k)).copied().collect();
        e.extend(over.iter().filter(|(_, v)| !v.is_empty()).copied());
        e
    };
    let spec = "ps=n01:2222;worker=n01:2223,n01:2224,n02:2222,n02:2223,n02:2224,m07:2222";
    let src = "Slurm (SLURM_STEP_NODELIST)";
    let opts = |ps: Option<u32>, port: Option<u16>| ResolverOptions { ps_tasks: ps, port, ..from_env() };
    let cases: &[(&str, ResolverOptions, Vec<(&str, &str)>, Want)] = &[
        ("rank 0 is the ps", opts(None, None), with(&[]), Ok((src, spec, "/job:ps/task:0 at n01:2222"))),
        (
            "rank 4 on the second node",
            opts(None, None),
            with(&[("SLURM_PROCID", "4"), ("SLURM_LOCALID", "1")]),
            Ok((src, spec, "/job:worker/task:3 at n02:2223")),
        ),
        (
            "last rank",
            opts(None, None),
            with(&[("SLURM_PROCID", "6")]),
            Ok((src, spec, "/job:worker/task:5 at m07:2222")),
        ),
        (
            "two ps tasks and a base port",
            opts(Some(2), Some(3000)),
            with(&[("SLURM_PROCID", "2")]),
            Ok((
                src,
                "ps=n01:3000,n01:3001;worker=n01:3002,n02:3000,n02:3001,n02:3002,m07:3000",
                "/job:worker/task:0 at n01:3002",
            )),
        ),
        (
            "no ps tasks",
            opts(Some(0), None),
            with(&[("SLURM_PROCID", "1")]),
            Ok((
                src,
                "worker=n01:2222,n01:2223,n01:2224,n02:2222,n02:2223,n02:2224,m07:2222",
                "/job:worker/task:1 at n01:2223",
            )),
        ),
        (
            "job node list when the step has none",
            opts(None, None),
            vec![("SLURM_PROCID", "1"), ("SLURM_JOB_NODELIST", "c[9-10]"), ("SLURM_TASKS_PER_NODE", "1(x2)")],
            Ok((
                "Slurm (SLURM_JOB_NODELIST)",
                "ps=c9:2222;worker=c10:2222",
                "/job:worker/task:0 at c10:2222",
            )),
        ),
        (
            "tasks per node from SLURM_NTASKS",
            opts(None, None),
            vec![("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_STEP_NODELIST", "a,b")],
            Ok((src, "ps=a:2222;worker=a:2223,b:2222,b:2223", "/job:worker/task:2 at b:2223")),
        ),
        (
            "one task per node by default",
            opts(None, None),
            vec![("SLURM_PROCID", "1"), ("SLURM_STEP_NODELIST", "a,b")],
            Ok((src, "ps=a:2222;worker=b:2222", "/job:worker/task:0 at b:2222")),
        ),
        (
            "--job/--task override the role",
            ResolverOptions { job: Some("worker".into()), task: Some(5), ..from_env() },
            with(&[]),
            Ok((src, spec, "/job:worker/task:5 at m07:2222")),
        ),
        (
            "an agreeing PMIx rank",
            opts(None, None),
            with(&[("SLURM_PROCID", "3"), ("PMIX_RANK", "3")]),
            Ok((src, spec, "/job:worker/task:2 at n02:2222")),
        ),
        (
            "bad rank",
            opts(None, None),
            with(&[("SLURM_PROCID", "x")]),
            Err("SLURM_PROCID='x' is not a valid number"),
        ),
        (
            "rank out of range",
            opts(None, None),
            with(&[("SLURM_PROCID", "7")]),
            Err("SLURM_PROCID=7 is not below the 7 tasks"),
        ),
        (
            "task count mismatch",
            opts(None, None),
            with(&[("SLURM_NTASKS", "8")]),
            Err("SLURM_NTASKS=8 but SLURM_STEP_TASKS_PER_NODE adds up to 7"),
        ),
        ("bad task count", opts(None, None), with(&[("SLURM_NTASKS", "seven")]), Err("SLURM_NTASKS='seven'")),
        (
            "node count mismatch",
            opts(None, None),
            with(&[("SLURM_STEP_TASKS_PER_NODE", "3(x2)")]),
            Err("SLURM_STEP_TASKS_PER_NODE gives 2 nodes but SLURM_STEP_NODELIST has 3"),
        ),
        (
            "bad node list",
            opts(None, None),
            with(&[("SLURM_STEP_NODELIST", "n[01-02")]),
            Err("SLURM_STEP_NODELIST: 'n[01-02': '[' at byte 1 is never closed"),
        ),
        (
            "bad tasks per node",
            opts(None, None),
            with(&[("SLURM_STEP_TASKS_PER_NODE", "3(x)")]),
            Err("SLURM_STEP_TASKS_PER_NODE: '3(x)'"),
        ),
        (
            "no node list",
            opts(None, None),
            vec![("SLURM_PROCID", "0")],
            Err("neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
        ),
        (
            "ntasks does not divide",
            opts(None, None),
            vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "3"), ("SLURM_STEP_NODELIST", "a,b")],
            Err("SLURM_NTASKS=3 does not divide"),
        ),
        (
            "cyclic distribution",
            opts(None, None),
            with(&[("SLURM_PROCID", "4"), ("SLURM_LOCALID", "0")]),
            Err("SLURM_LOCALID=0 but the block layout puts task 4 at index 1 on n02"),
        ),
        (
            "no worker left",
            opts(Some(7), None),
            with(&[]),
            Err("--ps-tasks 7 leaves no worker among the 7 tasks"),
        ),
        ("port past 65535", opts(None, Some(65534)), with(&[]), Err("port 65536 for host n01 is past 65535")),
        (
            "mpirun inside Slurm",
            opts(None, None),
            with(&[("OMPI_COMM_WORLD_RANK", "5"), ("SLURM_PROCID", "1")]),
            Err("OMPI_COMM_WORLD_RANK=5 but SLURM_PROCID=1"),
        ),
        (
            "hosts flag with Slurm",
            ResolverOptions { hosts: Some("a".into()), ..from_env() },
            with(&[]),
            Err("do not apply to Slurm"),
        ),
        (
            "overridden task missing",
            ResolverOptions { task: Some(9), ..from_env() },
            with(&[]),
            Err("/job:ps/task:9 is not in the cluster spec"),
        ),
    ];
    for (label, opts, e, want) in cases {
        check(label, opts, e, *want);
    }
}

#[test]
fn mpi_table() {
    let hostfile = temp_file("hostfile", "n1 slots=2\nn2:1 # MPICH style\n");
    let hosts = |h: &str| ResolverOptions { hosts: Some(h.into()), ..from_env() };
    let file = ResolverOptions { hostfile: Some(hostfile.clone()), ..from_env() };
    let cases: &[(&str, ResolverOptions, Vec<(&str, &str)>, Want)] = &[
        (
            "Open MPI, hosts share the ranks",
            hosts("n1,n2"),
            vec![("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1")],
            Ok(("MPI (OMPI_COMM_WORLD_RANK)", "ps=n1:2222;worker=n1:2223,n2:2222,n2:2223", "/job:worker/task:2 at n2:2223")),
        ),
        (
            "Intel MPI with a hostfile",
            file.clone(),
            vec![("PMI_RANK", "2"), ("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "0")],
            Ok(("MPI (PMI_RANK)", "ps=n1:2222;worker=n1:2223,n2:2222", "/job:worker/task:1 at n2:2222")),
        ),
        (
            "PMIx exports no size: the slots give it",
            hosts("g[1-2]:2"),
            vec![("PMIX_RANK", "1")],
            Ok(("MPI (PMIX_RANK)", "ps=g1:2222;worker=g1:2223,g2:2222,g2:2223", "/job:worker/task:0 at g1:2223")),
        ),
        (
            "MVAPICH, one host per rank",
            ResolverOptions { ps_tasks: Some(0), port: Some(5000), ..hosts("a,b,c") },
            vec![("MV2_COMM_WORLD_RANK", "2"), ("MV2_COMM_WORLD_SIZE", "3"), ("MV2_COMM_WORLD_LOCAL_RANK", "0")],
            Ok(("MPI (MV2_COMM_WORLD_RANK)", "worker=a:5000,b:5000,c:5000", "/job:worker/task:2 at c:5000")),
        ),
        (
            "extra slots stay unused",
            hosts("a:4,b:4"),
            vec![("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "3")],
            Ok(("MPI (OMPI_COMM_WORLD_RANK)", "ps=a:2222;worker=a:2223,a:2224", "/job:worker/task:0 at a:2223")),
        ),
        (
            "mpirun inside Slurm, hosts given: MPI wins",
            hosts("n1,n2"),
            vec![("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "2"), ("SLURM_PROCID", "0"), ("SLURM_STEP_NODELIST", "x")],
            Ok(("MPI (OMPI_COMM_WORLD_RANK)", "ps=n1:2222;worker=n2:2222", "/job:worker/task:0 at n2:2222")),
        ),
        ("no hosts", from_env(), vec![("PMI_RANK", "0"), ("PMI_SIZE", "2")], Err("PMI_RANK is set (an MPI launch), but MPI does not export the hosts; pass --hosts or --hostfile")),
        ("too few slots", hosts("a:1,b:1"), vec![("PMI_RANK", "0"), ("PMI_SIZE", "3")], Err("3 ranks but --hosts gives only 2 slots")),
        ("rank past size", hosts("a,b"), vec![("PMI_RANK", "2"), ("PMI_SIZE", "2")], Err("PMI_RANK=2 is not below the world size 2")),
        ("size past the limit", hosts("a"), vec![("PMI_RANK", "0"), ("PMI_SIZE", "4000000000")], Err("PMI_SIZE: world size 4000000000 is not between 1 and 65536")),
        ("slots past the limit", hosts("a:65536,b:65536"), vec![("PMIX_RANK", "0")], Err("--hosts: world size 131072")),
        ("bad size", hosts("a,b"), vec![("PMI_RANK", "0"), ("PMI_SIZE", "-2")], Err("PMI_SIZE='-2'")),
        ("local rank disagrees", hosts("a,b"), vec![("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")], Err("OMPI_COMM_WORLD_LOCAL_RANK=0 but --hosts puts rank 1 at index 1 on a")),
        ("launchers disagree", hosts("a,b"), vec![("OMPI_COMM_WORLD_RANK", "1"), ("PMIX_RANK", "0")], Err("OMPI_COMM_WORLD_RANK=1 but PMIX_RANK=0")),
        ("both host flags", ResolverOptions { hostfile: Some(hostfile.clone()), ..hosts("a") }, vec![("PMI_RANK", "0")], Err("only one of --hosts and --hostfile")),
        ("bad hosts flag", hosts("a[1-"), vec![("PMI_RANK", "0")], Err("--hosts")),
    ];
    for (label, opts, e, want) in cases {
        check(label, opts, e, *want);
    }
    let missing = ResolverOptions { hostfile: Some("/nonexistent/rill-hosts".into()), ..from_env() };
    assert_eq!(resolve(&missing, &env(&[("PMI_RANK", "0")])).unwrap_err().code, Code::NotFound);
    let _ = std::fs::remove_file(hostfile);
}

#[test]
fn torchrun_table() {
    let single = vec![
        ("RANK", "2"),
        ("WORLD_SIZE", "3"),
        ("LOCAL_RANK", "2"),
        ("LOCAL_WORLD_SIZE", "3"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let multi = vec![
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "a"),
        ("MASTER_PORT", "29500"),
    ];
    let src = "torchrun (RANK, WORLD_SIZE)";
    let with = |base: &[(&'static str, &'static str)], over: (&'static str, &'static str)| {
        let mut e: Vec<(&str, &str)> = base.iter().filter(|(k, _)| *k != over.0).copied().collect();
        if !over.1.is_empty() {
            e.push(over);
        }
        e
    };
    let cases: &[(&str, ResolverOptions, Vec<(&str, &str)>, Want)] = &[
        (
            "single node: MASTER_ADDR, ports above MASTER_PORT",
            from_env(),
            single.clone(),
            Ok((
                src,
                "ps=127.0.0.1:29501;worker=127.0.0.1:29502,127.0.0.1:29503",
                "/job:worker/task:1 at 127.0.0.1:29503",
            )),
        ),
        (
            "--port",
            ResolverOptions { port: Some(4000), ..from_env() },
            single.clone(),
            Ok((
                src,
                "ps=127.0.0.1:4000;worker=127.0.0.1:4001,127.0.0.1:4002",
                "/job:worker/task:1 at 127.0.0.1:4002",
            )),
        ),
        (
            "several nodes with --hosts",
            ResolverOptions { hosts: Some("a,b".into()), ..from_env() },
            multi.clone(),
            Ok((src, "ps=a:29501;worker=a:29502,b:29501,b:29502", "/job:worker/task:2 at b:29502")),
        ),
        (
            "several nodes without hosts",
            from_env(),
            multi.clone(),
            Err("torchrun across several nodes (WORLD_SIZE=4, LOCAL_WORLD_SIZE=2)"),
        ),
        (
            "local rank disagrees with --hosts",
            ResolverOptions { hosts: Some("a,b".into()), ..from_env() },
            with(&multi, ("LOCAL_RANK", "0")),
            Err("LOCAL_RANK=0 but --hosts puts rank 3 at index 1 on b"),
        ),
        ("bad RANK", from_env(), with(&single, ("RANK", "two")), Err("RANK='two'")),
        (
            "RANK past WORLD_SIZE",
            from_env(),
            with(&single, ("RANK", "3")),
            Err("RANK=3 is not below WORLD_SIZE=3"),
        ),
        ("no MASTER_PORT", from_env(), with(&single, ("MASTER_PORT", "")), Err("MASTER_PORT is not set")),
        (
            "MASTER_PORT at the top",
            from_env(),
            with(&single, ("MASTER_PORT", "65535")),
            Err("MASTER_PORT=65535 leaves no port"),
        ),
        ("bad MASTER_PORT", from_env(), with(&single, ("MASTER_PORT", "70000")), Err("MASTER_PORT='70000'")),
        ("no MASTER_ADDR", from_env(), with(&single, ("MASTER_ADDR", "")), Err("MASTER_ADDR is not set")),
        (
            "ports run out",
            from_env(),
            with(&single, ("MASTER_PORT", "65533")),
            Err("is past 65535 (check MASTER_PORT)"),
        ),
        ("nothing at all", from_env(), vec![("RANK", "0")], Err("--from-env found no cluster")),
    ];
    for (label, opts, e, want) in cases {
        check(label, opts, e, *want);
    }
}

#[test]
fn json_values_and_errors() {
    use json::Value::*;
    let s = |v: &str| String(v.to_string());
    let ok: &[(&str, json::Value)] = &[
        ("null", Null),
        (" true ", Bool(true)),
        ("-0.5e1", Number(-5.0)),
        ("[]", Array(vec![])),
        ("[1, [false], {}]", Array(vec![Number(1.0), Array(vec![Bool(false)]), Object(vec![])])),
        (r#"{"a": "x", "b": [null]}"#, Object(vec![("a".into(), s("x")), ("b".into(), Array(vec![Null]))])),
        (r#""\"\\\/\b\f\n\r\t""#, s("\"\\/\u{8}\u{c}\n\r\t")),
        (r#""\u00e9\ud83d\ude00""#, s("é😀")),
        ("\"é\"", s("é")),
    ];
    for (text, want) in ok {
        assert_eq!(json::parse(text.as_bytes()).unwrap(), *want, "{text}");
    }
    let deep = "[".repeat(100);
    let bad: &[(&[u8], &str)] = &[
        (b"", "unexpected end of input at byte 0"),
        (b"{\"a\":1,}", "expected a string key at byte 7"),
        (b"[1 2]", "unexpected '2' at byte 3"),
        (b"\"\\x\"", "bad escape at byte 1"),
        (b"\"abc", "unterminated string at byte 0"),
        (b"01", "unexpected data after the JSON value at byte 1"),
        (b"{\"a\":1,\"a\":2}", "duplicate key \"a\" at byte 7"),
        (deep.as_bytes(), "nesting deeper than 64 at byte 64"),
        (b"tru", "bad literal (want true) at byte 0"),
        (b"\"\\ud800\"", "unpaired surrogate at byte 1"),
        (b"\"\\udc00\"", "unpaired surrogate at byte 1"),
        (b"\"\\u12zz\"", "bad \\u escape at byte 3"),
        (b"\"\\u12", "truncated \\u escape at byte 3"),
        (b"1e999", "number out of range at byte 0"),
        (b"-", "bad number at byte 1"),
        (b"1.", "no digits after '.' at byte 2"),
        (b"1e+", "no digits in exponent at byte 3"),
        (b"\"a\x01\"", "control character in string at byte 2"),
        (b"\"\xff\"", "invalid UTF-8 in string at byte 0"),
        (b"{1:2}", "expected a string key at byte 1"),
        (b"{\"a\" 1}", "unexpected '1' at byte 5"),
        (b"\x00", "unexpected byte 0x00 at byte 0"),
    ];
    for (text, part) in bad {
        let e = json::parse(text).unwrap_err();
        assert!(
            e.code == Code::InvalidArgument && e.msg.contains(part),
            "{:?}: {e}",
            std::string::String::from_utf8_lossy(text)
        );
    }
}

/// A deterministic generator, so a failure replays.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn random_bytes_never_panic_the_parsers() {
    let mut rng = Lcg(0x5eed);
    let seeds: &[&[u8]] = &[
        br#"{"cluster": {"ps": ["h:1"], "worker": ["a:2", "b:3"]}, "task": {"type": "worker", "index": 1}}"#,
        br#"["\u00e9\ud83d\ude00", -1.5e3, true, false, null, {"k": [[]]}]"#,
    ];
    let alphabet = b"{}[]\",:\\u0123456789.eE+-truefalsnl \n\t\xff\xc3";
    for round in 0..20_000 {
        let bytes: Vec<u8> = match round % 3 {
            // Arbitrary bytes.
            0 => (0..rng.next() % 64).map(|_| rng.next() as u8).collect(),
            // JSON-ish tokens, which reach deeper into the grammar.
            1 => (0..rng.next() % 64).map(|_| alphabet[rng.next() as usize % alphabet.len()]).collect(),
            // A valid document with a few bytes changed, dropped or cut.
            _ => {
                let mut b = seeds[rng.next() as usize % seeds.len()].to_vec();
                for _ in 0..1 + rng.next() % 3 {
                    if b.is_empty() {
                        break;
                    }
                    let i = rng.next() as usize % b.len();
                    match rng.next() % 3 {
                        0 => b[i] = alphabet[rng.next() as usize % alphabet.len()],
                        1 => {
                            b.remove(i);
                        }
                        _ => b.truncate(i + 1),
                    }
                }
                b
            }
        };
        if let Err(e) = json::parse(&bytes) {
            assert!(e.code == Code::InvalidArgument && e.msg.contains(" at byte "), "{bytes:?}: {e}");
        }
        let text = std::string::String::from_utf8_lossy(&bytes);
        if let Err(e) = tf_config(&text, false) {
            assert_eq!(e.code, Code::InvalidArgument, "{text}: {e}");
        }
        let _ = expand_hostlist(&text);
        let _ = parse_tasks_per_node(&text);
        let _ = parse_hosts_flag(&text);
        let _ = parse_hostfile(&text);
    }
}
