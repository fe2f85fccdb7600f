//! A child process that is killed and reaped when dropped.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Owns a server process for the duration of a test.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd`, naming it `name` in errors.
    ///
    /// # Errors
    /// If the program cannot be started (typically: not installed).
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?}); is it installed?"))?;
        Ok(ChildGuard {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if the process has already exited (e.g. it refused its config).
    ///
    /// # Errors
    /// The exit status, when it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            anyhow::bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }

    /// Kills the process now (SIGKILL) and waits for it, and kills what it started (a
    /// supervisord killed while a program ignores SIGTERM would leave that program running
    /// on the machine after the test).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let left = descendants(child.id());
            let _ = child.kill();
            let _ = child.wait();
            for pid in left {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }

    /// Kills the process alone (SIGKILL), as `kill -9 PID` does: what it started keeps
    /// running, orphaned (a supervisord killed so leaves its programs behind).
    pub fn kill_alone(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks the process to stop (SIGTERM), so that supervisord stops its own children, and
    /// kills it if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else { return };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stderr(std::process::Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
    }
}

/// Every process below `pid` (Linux: `/proc/PID/task/*/children`).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}
