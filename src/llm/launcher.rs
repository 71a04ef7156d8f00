//! The launcher: starts an inference server for one `infer` node from a
//! command template, on a free loopback port, waits for its health check, keeps
//! its output in the run's logs, and stops its whole process group when the
//! node ends — on success, on failure, on Ctrl-C (even a second one), and, via
//! the parent-death signal, if kvt itself is killed.
//!
//! Template variables: `{port}`, `{model}`, `{policy}`, `{budget}`, and any
//! per-budget variable from `engine.launch.vars` (e.g. `{cache_type}` for
//! llama.cpp's `-ctk {cache_type} -ctv {cache_type}`).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Process groups of every server this process started and has not stopped.
fn live() -> &'static Mutex<Vec<i32>> {
    static L: OnceLock<Mutex<Vec<i32>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// Kills every launched server now (used before exiting on a second Ctrl-C).
pub fn kill_all() {
    if let Ok(l) = live().lock() {
        for &pg in l.iter() {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
            unsafe {
                libc::kill(-pg, libc::SIGKILL);
            }
        }
    }
}

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Fills `{name}` placeholders; an unknown one is an error naming it.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 1..];
        let end = tail
            .find('}')
            .ok_or_else(|| anyhow!("`engine.launch.command`: unclosed `{{` in `{template}`"))?;
        let name = &tail[..end];
        let v = vars.get(name).ok_or_else(|| {
            anyhow!(
                "`engine.launch.command` uses `{{{name}}}`, which is not defined; known: {}",
                vars.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        out.push_str(v);
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A launch command as it may be shown (logs, errors): the values of
/// environment assignments (`HF_TOKEN=… vllm serve`, `export K=…;`) and any
/// value of a secret-looking environment variable (`*TOKEN*`, `*KEY*`,
/// `*SECRET*`, `*PASSWORD*`) — which `${VAR}` substitution may have put in the
/// command — become `***`.
pub fn redact_command(command: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    for word in command.split(' ') {
        match word.split_once('=') {
            Some((name, value))
                if !name.is_empty()
                    && !value.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !name.starts_with('-') =>
            {
                out.push(format!("{name}=***"));
            }
            _ => out.push(word.to_string()),
        }
    }
    let mut shown = out.join(" ");
    for (name, value) in std::env::vars() {
        let upper = name.to_ascii_uppercase();
        let secret = ["TOKEN", "KEY", "SECRET", "PASSWORD"]
            .iter()
            .any(|s| upper.contains(s));
        if secret && value.len() >= 6 && shown.contains(&value) {
            shown = shown.replace(&value, "***");
        }
    }
    shown
}

/// What `sh -c` runs for a launch command: `exec` for a simple command
/// (`exec env K=V cmd …` when it starts with assignments), the command as
/// written otherwise.
pub fn shell_script(command: &str) -> String {
    let simple = !command.contains(['&', ';', '|', '\n', '(', '`', '<', '>']);
    if !simple {
        return command.to_string();
    }
    let first = command.split_whitespace().next().unwrap_or("");
    let assigns = first.split_once('=').is_some_and(|(n, _)| {
        !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    });
    if assigns {
        format!("exec env {command}")
    } else {
        format!("exec {command}")
    }
}

/// A running server; stopped (whole process group) on drop.
pub struct Launched {
    child: Child,
    watchdog: Child,
    _watchdog_pipe: Option<std::process::ChildStdin>,
    pgid: i32,
    pub base_url: String,
    pub log: std::path::PathBuf,
}

impl Launched {
    /// Starts `command` (run by `sh -c`) in its own process group with its
    /// output appended to `log`.
    pub fn start(
        command: &str,
        cwd: &Path,
        port: u16,
        api_path: &str,
        log: &Path,
    ) -> Result<Launched> {
        if let Some(d) = log.parent() {
            std::fs::create_dir_all(d)?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the server log {}", log.display()))?;
        let err = out.try_clone()?;
        // The command runs in its own process group. A simple command replaces
        // the shell (`exec`, through `env` when it starts with environment
        // assignments), so the parent-death signal reaches the server itself;
        // a compound one (`cd … && …`, `source venv/bin/activate && …`) keeps
        // the shell, and the watchdog below stops its whole group.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(shell_script(command))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only
        // affects the child being set up.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting `{}`", redact_command(command)))?;
        let pgid = child.id() as i32;
        live().lock().expect("launcher registry").push(pgid);
        // A watchdog outlives kvt: it waits on a pipe only this process holds
        // open, and when that closes — kvt exited, or was killed with -9, which
        // no signal handler sees — it stops the server's whole process group,
        // however many processes a compound command started.
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _; kill -TERM -{pgid} 2>/dev/null; sleep 3; kill -KILL -{pgid} 2>/dev/null"
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0)
            .spawn()
            .context("starting the launcher's watchdog")?;
        let watchdog_pipe = watchdog.stdin.take();
        Ok(Launched {
            child,
            watchdog,
            _watchdog_pipe: watchdog_pipe,
            pgid,
            base_url: format!("http://127.0.0.1:{port}{api_path}"),
            log: log.to_path_buf(),
        })
    }

    /// Polls `health_url` until it answers 2xx, the process exits, or `timeout`.
    pub fn wait_healthy(&mut self, health_url: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the launched server exited ({status}) before it was healthy; its output is in {}",
                    self.log.display()
                );
            }
            let ok = rt.block_on(async {
                http.get(health_url)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            });
            if ok {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "the launched server did not answer {health_url} within {} s (`engine.launch.startup_timeout_s`); its output is in {}",
                    timeout.as_secs(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Peak and current resident memory of the server process (KiB), from /proc.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// Stops the whole process group: SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        // SAFETY: signals a process group this process created.
        unsafe {
            libc::kill(-self.pgid, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; also reaches children that ignored SIGTERM.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
        // Its job is done; stop it before closing its pipe would wake it.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        if let Ok(mut l) = live().lock() {
            l.retain(|&p| p != self.pgid);
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_commands_replace_the_shell_and_compound_ones_keep_it() {
        assert_eq!(shell_script("vllm serve m"), "exec vllm serve m");
        assert_eq!(
            shell_script("HF_TOKEN=x vllm serve m"),
            "exec env HF_TOKEN=x vllm serve m"
        );
        assert_eq!(shell_script("cd d && vllm serve"), "cd d && vllm serve");
        assert_eq!(
            redact_command("HF_TOKEN=abc vllm --x=1"),
            "HF_TOKEN=*** vllm --x=1"
        );
    }

    #[test]
    fn templates_fill_known_variables_and_name_unknown_ones() {
        let vars: BTreeMap<String, String> = [("port", "8081"), ("cache_type", "q8_0")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            render("srv --port {port} -ctk {cache_type}", &vars).unwrap(),
            "srv --port 8081 -ctk q8_0"
        );
        let e = render("srv {nope}", &vars).unwrap_err().to_string();
        assert!(e.contains("{nope}") && e.contains("cache_type"), "{e}");
        assert!(render("srv {port", &vars).is_err());
    }
}
