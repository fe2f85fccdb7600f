//! supervisord's own config loader as a test oracle: a long-lived Python process
//! (`support/supervisord_load.py`) that answers, for a conf file, what supervisord 4.2 makes
//! of every option of every process, or why it refuses the file.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::Context as _;
use serde_json::Value;

/// Environment variable set in the loader, so tests can use `%(ENV_CORRAL_RT)s`.
pub const LOADER_ENV: (&str, &str) = ("CORRAL_RT", "from-env");

/// A running loader.
#[derive(Debug)]
pub struct Loader {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Loader {
    /// Starts the loader (needs Debian's `/usr/bin/python3` and Debian's `supervisor` package).
    ///
    /// # Errors
    /// If it cannot be started.
    pub fn start() -> anyhow::Result<Loader> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/supervisord_load.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(&script)
            .env(LOADER_ENV.0, LOADER_ENV.1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {}", script.display()))?;
        let stdin = child.stdin.take().context("loader stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("loader stdout")?);
        Ok(Loader { child, stdin, stdout })
    }

    /// What supervisord makes of `path`: `Ok(processes by name)` or `Err(its message)`.
    ///
    /// # Errors
    /// The outer error if the loader itself failed.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<Result<serde_json::Map<String, Value>, String>> {
        writeln!(self.stdin, "{}", path.display())?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("loader answered {line:?}"))?;
        if let Some(e) = v.get("error").and_then(Value::as_str) {
            return Ok(Err(e.to_string()));
        }
        match v.get("processes") {
            Some(Value::Object(m)) => Ok(Ok(m.clone())),
            _ => anyhow::bail!("loader answered {line:?}"),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
