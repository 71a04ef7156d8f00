//! The launcher: a server per `infer` node from a command template (here
//! `kvt serve` itself), health-checked, and stopped with its whole process
//! group — after success, after a failure, and after Ctrl-C.

mod common;
use common::*;

/// Processes of this project other than `except` (the build itself): the
/// servers its builds launched, found by working directory, not by name.
fn alive(p: &Project, except: Option<u32>) -> Vec<u32> {
    p.processes_here()
        .into_iter()
        .filter(|&pid| Some(pid) != except)
        .collect()
}

fn none_alive(p: &Project) {
    // The kernel (and the launcher's watchdog) end them: polled as
    // `wait_until` does (no process can announce its own death), and the
    // survivors named when any outlive 8 s.
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(8) {
        if alive(p, None).is_empty() {
            return;
        }
        // No signal: a process cannot announce its own death to us (not
        // our child), so its absence from /proc is polled.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let cmds: Vec<String> = alive(p, None)
        .iter()
        .map(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default()
        })
        .collect();
    panic!("servers survived the build: {cmds:?}");
}

fn project(marker: &str, serve_flags: &str) -> Project {
    project_with("", marker, serve_flags)
}

/// `prefix` goes before the server command (an environment assignment, `cd … &&`).
fn project_with(prefix: &str, marker: &str, serve_flags: &str) -> Project {
    let p = Project::new();
    let kvt = env!("CARGO_BIN_EXE_kvt");
    let log = p.path("served.log");
    p.write(
        "config/experiments/l.yaml",
        &format!(
            "output: {{exp_group_id: l}}
dataset: {{lengths: [256, 512], per_length: 4}}
binning: {{n_bins: 2}}
sampling: {{n_per_bin: 4}}
kv: {{policies: [streaming], budgets: [1.0, 0.3]}}
analysis: {{bootstrap: {{iters: 50}}}}
engine:
  kind: launch
  concurrency: 2
  launch:
    command: \"{prefix}{kvt} serve --port {{port}} --policy {{policy}} --budget {{budget}} --model {marker} --request-log {} {serve_flags}\"
    startup_timeout_s: 30
",
            log.display()
        ),
    );
    p
}

fn build(p: &Project, extra: &[&str]) -> std::process::Output {
    p.kvt()
        .args(["build", "report", "-c", "config/experiments/l.yaml"])
        .args(extra)
        .env("KVT_BACKOFF_MS", "5")
        .output()
        .unwrap()
}

#[test]
fn a_server_per_budget_started_checked_and_stopped() {
    let marker = "kvt-launch-ok-5d1e";
    let p = project(marker, "");
    let out = build(&p, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    none_alive(&p);
    // Two budgets, two servers, each with its own log; 8 requests each.
    let logs: Vec<_> = std::fs::read_dir(p.path("runs/l/logs"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(logs.len(), 2);
    assert_eq!(p.read("served.log").lines().count(), 16);
    // The budget reached the server through its flags: retained tokens shrink.
    let c = rusqlite::Connection::open(p.path("runs/l/kv_transition.sqlite")).unwrap();
    let (kept, total, rss): (f64, f64, Option<f64>) = c
        .query_row(
            "SELECT AVG(t.retained_tokens), AVG(t.prompt_tokens), MAX(t.server_rss_kib) FROM telemetry t
             JOIN requests q USING (request_id) WHERE q.run_id = 'streaming@0.3'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert!(kept < total * 0.4, "{kept} of {total}");
    assert!(
        rss.unwrap_or(0.0) > 1000.0,
        "server memory measured: {rss:?}"
    );
    assert!(p.read("runs/l/report.md").contains("MiB"));
    // Nothing to do the second time: no server is started.
    let out = build(&p, &[]);
    assert!(built_nodes(&out).is_empty());
    assert_eq!(std::fs::read_dir(p.path("runs/l/logs")).unwrap().count(), 2);
}

#[test]
fn servers_are_stopped_when_the_build_fails() {
    let marker = "kvt-launch-fail-8c2a";
    let p = project(marker, "--delay-ms 3000");
    let out = build(
        &p,
        &[
            "--set",
            "engine.timeout_s=0.2",
            "--set",
            "engine.max_retries=0",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    none_alive(&p);
    // A command that dies at once: a clear error naming its log.
    let q = project("kvt-launch-dies", "");
    let out = build(
        &q,
        &[
            "--set",
            "engine.launch.command=sh -c 'echo cannot start; exit 3'",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("exited") && err.contains("runs/l/logs"),
        "{err}"
    );
    // An unknown template variable is a configuration error.
    let out = build(
        &q,
        &[
            "--set",
            "engine.launch.command=srv --port {port} --x {nope}",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("{nope}"));
}

fn spawn_build(p: &Project, stderr: std::process::Stdio) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_kvt"))
        .args(["build", "report", "-c", "config/experiments/l.yaml"])
        .current_dir(p.root())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Waits until a server launched by the build `build` runs.
fn wait_started(p: &Project, build: u32) {
    wait_until("a launched server", || !alive(p, Some(build)).is_empty());
}

#[test]
fn servers_are_stopped_when_the_build_is_interrupted() {
    let marker = "kvt-launch-int-3b7f";
    let p = project(marker, "--delay-ms 400");
    let child = spawn_build(&p, std::process::Stdio::piped());
    wait_started(&p, child.id());
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("interrupted"),
        "{}",
        stderr_of(&out)
    );
    none_alive(&p);
    // Killed outright (SIGKILL, no cleanup in kvt): the servers die with it.
    let child = spawn_build(&p, std::process::Stdio::null());
    wait_started(&p, child.id());
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    none_alive(&p);
}

#[test]
fn kill_9_of_a_build_with_a_compound_launch_command_leaves_no_server() {
    // `cd sub && server`: the shell stays as the server's parent, so the
    // parent-death signal alone would leave the server running.
    let p = project_with("cd sub && ", "kvt-launch-compound", "--delay-ms 400");
    p.write("sub/README", "the launched server runs here\n");
    let mut child = spawn_build(&p, std::process::Stdio::null());
    wait_started(&p, child.id());
    let build = child.id();
    // The server really runs in `sub` (a compound command, not `exec`).
    let sub = p.path("sub").canonicalize().unwrap();
    wait_until("a server in sub/", || {
        alive(&p, Some(build))
            .iter()
            .any(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == sub))
    });
    child.kill().unwrap(); // SIGKILL: kvt runs no cleanup at all
    child.wait().unwrap();
    none_alive(&p);
}

#[test]
fn an_env_prefixed_launch_command_works_and_its_secret_is_in_no_file() {
    const SECRET: &str = "hf-kvt-sentinel-51c0d2e9";
    let p = project_with(&format!("KVT_LAUNCH_TOKEN={SECRET} "), "kvt-launch-env", "");
    let out = p
        .kvt()
        .args(["-v", "build", "report", "-c", "config/experiments/l.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(p.path("runs/l/report.md").is_file());
    assert!(!stderr_of(&out).contains(SECRET), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("KVT_LAUNCH_TOKEN=***"),
        "the launch is logged, redacted: {}",
        stderr_of(&out)
    );
    // Not in the run's logs, the cache, the database, the report: nowhere
    // but the experiment file the user wrote it in.
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(p.root(), &mut files);
    assert!(files.iter().any(|f| f.to_string_lossy().contains("/logs/")));
    for f in files {
        if f.ends_with("config/experiments/l.yaml") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the secret is in {}",
            f.display()
        );
    }
    none_alive(&p);
}

/// Issue #26, finding 2: a launch command's secrets, written each way a user
/// would, reached `kvt bundle`'s config, `resolve --print-config` and `-v`
/// logs. Every file a build, `bundle` and `resolve` write, and stderr at
/// `-vv`, are searched for each sentinel: none is found.
#[test]
fn regression_launch_secrets_reach_no_file_log_bundle_or_resolve() {
    // Substituted by `${KVT_SERVE_KEY}`, and sent as `Authorization: Bearer`.
    const SUBST: &str = "kvt-subst-sentinel-93b1";
    // The second word of a quoted assignment.
    const QUOTED: &str = "kvtq2sentinel";
    // A literal value after `--api-key`, in no environment variable.
    const LITERAL: &str = "kvt-literal-sentinel-77aa";
    let p = project_with(
        &format!("true --api-key {LITERAL} && SERVER_API_KEY='kvtq1sentinel {QUOTED}' "),
        "kvt-launch-secret",
        "--api-key ${KVT_SERVE_KEY}",
    );
    let config = "config/experiments/l.yaml";
    let key_env = ["--set", "engine.api_key_env=KVT_SERVE_KEY"];
    let run = |args: &[&str]| {
        p.kvt()
            .args(args)
            .args(key_env)
            .env("KVT_SERVE_KEY", SUBST)
            .output()
            .unwrap()
    };
    let built = run(&["-vv", "build", "report", "-c", config]);
    assert!(built.status.success(), "{}", stderr_of(&built));
    none_alive(&p);
    // Every request was answered: the key reached the server that required it.
    assert_eq!(p.read("served.log").lines().count(), 16);
    let resolved = run(&["-vv", "resolve", "--print-config", "-c", config]);
    assert!(resolved.status.success(), "{}", stderr_of(&resolved));
    assert!(
        stdout_of(&resolved).contains("--api-key ***"),
        "{}",
        stdout_of(&resolved)
    );
    let bundled = run(&["-vv", "bundle", "-c", config, "-o", "out/b.tar.zst"]);
    assert!(bundled.status.success(), "{}", stderr_of(&bundled));
    let bundle: Vec<u8> = bundle_entries(&p.path("out/b.tar.zst"))
        .into_iter()
        .flat_map(|(n, b)| n.into_bytes().into_iter().chain(b))
        .collect();
    let stderr = [&built, &resolved, &bundled]
        .iter()
        .map(|o| stderr_of(o) + &stdout_of(o))
        .collect::<String>();
    assert!(stderr.contains("launching"), "{stderr}");
    for secret in [SUBST, QUOTED, LITERAL] {
        assert!(!stderr.contains(secret), "{secret} in stderr:\n{stderr}");
        assert!(
            !bundle.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} in the bundle"
        );
        // Every file but the experiment the user wrote it in.
        std::fs::remove_file(p.path(config)).ok();
        let files = assert_secret_nowhere(p.root(), secret);
        assert!(files > 20, "searched {files} files");
    }
}

/// The largest server memory (KiB) recorded for any request of a build.
fn server_rss(p: &Project) -> f64 {
    let c = rusqlite::Connection::open(p.path("runs/l/kv_transition.sqlite")).unwrap();
    c.query_row("SELECT MAX(server_rss_kib) FROM telemetry", [], |r| {
        r.get::<_, Option<f64>>(0)
    })
    .unwrap()
    .unwrap_or(0.0)
}

/// Issue #26, finding 7: a launch command that detaches (`setsid …`)
/// "exited before it was healthy" and left its server running. The
/// supervisor is now a child subreaper: the detached server stays its
/// descendant, is health-checked, used, and stopped with the build.
#[test]
fn regression_a_detaching_launch_command_is_tracked_and_stopped() {
    let p = project_with("setsid ", "kvt-launch-setsid", "");
    let out = build(&p, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(p.read("served.log").lines().count(), 16);
    assert!(server_rss(&p) > 1000.0, "{}", server_rss(&p));
    none_alive(&p);
}

/// Issue #26, finding 8: with a compound launch command the memory measured
/// was the shell's (2 MiB against 21 MiB for the same server launched as a
/// simple command). Now it is the server's, however it was launched.
#[test]
fn regression_a_compound_launch_command_measures_the_server_not_the_shell() {
    let simple = project("kvt-launch-mem-simple", "");
    assert!(build(&simple, &[]).status.success());
    let compound = project_with("cd sub && ", "kvt-launch-mem-compound", "");
    compound.write("sub/README", "the launched server runs here\n");
    let out = build(&compound, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (s, c) = (server_rss(&simple), server_rss(&compound));
    assert!(s > 1000.0, "simple: {s} KiB");
    assert!(
        c > 0.8 * s && c < 1.5 * s,
        "compound {c} KiB against simple {s} KiB"
    );
    none_alive(&simple);
    none_alive(&compound);
}
