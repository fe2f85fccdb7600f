//! STAND-IN supervisord, for the fan-out benchmarks only: an in-memory XML-RPC server that
//! answers the calls the agent makes as supervisord 4.2 would, for programs with one process
//! each, so that one machine can simulate hundreds of hosts. Never used by the test suite,
//! which talks to real supervisord.
//!
//! `reloadConfig` reads the host's conf dir (the files the real agent wrote) and compares them
//! with what was loaded; every added group's process is RUNNING at once.
//!
//! Stops take time, as they do in supervisord: `stopProcess(wait=false)` leaves the process
//! STOPPING for [`STOP_TIME`] (what a caller polling supervisord 4.2.5 sees for a process that
//! exits on SIGTERM at once), `removeProcessGroup` fails STILL_RUNNING until it is STOPPED,
//! and a waiting stop (`wait=true`), which supervisord answers only at its next loop turn
//! (about a second), is refused: the agent never asks for one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use corral_proto::render::{ManagedFile, managed_file_kind};
use dxr::{FaultResponse, MethodCall, MethodResponse, Value};

#[derive(Default)]
struct Host {
    /// Group -> the file content it was loaded from.
    loaded: BTreeMap<String, String>,
    /// Group -> content seen by the last reloadConfig.
    pending: BTreeMap<String, String>,
    /// Group -> (state code, pid, start).
    processes: BTreeMap<String, (i32, i32, i32)>,
    /// Group -> when its STOPPING process will be STOPPED.
    stopping: BTreeMap<String, std::time::Instant>,
}

/// How long a stop lasts for a process that exits on SIGTERM at once.
pub const STOP_TIME: std::time::Duration = std::time::Duration::from_millis(50);

impl Host {
    /// Finishes the stops whose time has come.
    fn settle(&mut self) {
        let now = std::time::Instant::now();
        let done: Vec<String> = self
            .stopping
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(g, _)| g.clone())
            .collect();
        for g in done {
            self.stopping.remove(&g);
            if let Some(p) = self.processes.get_mut(&g) {
                *p = (0, 0, p.2);
            }
        }
    }

    /// Asks a process to stop: STOPPING now, STOPPED after [`STOP_TIME`].
    fn stop(&mut self, g: &str) -> Result<(), (i32, String)> {
        let p = self.processes.get_mut(g).ok_or((10, format!("BAD_NAME: {g}")))?;
        if p.0 != 20 && p.0 != 10 {
            return Err((70, format!("NOT_RUNNING: {g}")));
        }
        p.0 = 40;
        self.stopping
            .insert(g.to_string(), std::time::Instant::now() + STOP_TIME);
        Ok(())
    }
}

/// One stand-in supervisord for one simulated host.
#[derive(Clone)]
pub struct StandIn {
    conf_dir: PathBuf,
    host: Arc<Mutex<Host>>,
    pids: Arc<AtomicI64>,
    /// reloadConfig calls, to count which agents acted on a change.
    pub reloads: Arc<AtomicUsize>,
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn now() -> i32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i32)
}

impl StandIn {
    pub fn new(conf_dir: PathBuf, pids: Arc<AtomicI64>) -> StandIn {
        StandIn {
            conf_dir,
            host: Arc::default(),
            pids,
            reloads: Arc::default(),
        }
    }

    /// Serves on a free loopback port; returns its `http://` URL.
    pub async fn serve(self) -> anyhow::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new().route("/RPC2", post(handle)).with_state(self);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(url)
    }

    fn info(&self, group: &str, (state, pid, start): (i32, i32, i32)) -> Value {
        let name = match state {
            0 => "STOPPED",
            10 => "STARTING",
            20 => "RUNNING",
            40 => "STOPPING",
            _ => "UNKNOWN",
        };
        let fields: [(&str, Value); 13] = [
            ("name", s(group)),
            ("group", s(group)),
            ("state", Value::Integer(state)),
            ("statename", s(name)),
            ("start", Value::Integer(start)),
            ("stop", Value::Integer(0)),
            ("now", Value::Integer(now())),
            ("pid", Value::Integer(pid)),
            ("exitstatus", Value::Integer(0)),
            ("spawnerr", s("")),
            ("stdout_logfile", s("")),
            ("stderr_logfile", s("")),
            // As supervisord words it: a running process's uptime changes every second.
            (
                "description",
                s(&if state == 20 {
                    let up = (now() - start).max(0);
                    format!(
                        "pid {pid}, uptime {}:{:02}:{:02} (stand-in)",
                        up / 3600,
                        up / 60 % 60,
                        up % 60
                    )
                } else {
                    "stand-in".to_string()
                }),
            ),
        ];
        Value::Struct(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn call(&self, method: &str, params: &[Value]) -> Result<Value, (i32, String)> {
        let arg = |i: usize| match params.get(i) {
            Some(Value::String(v)) => Ok(v.clone()),
            _ => Err((2, "INCORRECT_PARAMETERS".to_string())),
        };
        let mut h = self.host.lock().map_err(|_| (30, "FAILED: poisoned".to_string()))?;
        h.settle();
        let wait = matches!(params.get(1), Some(Value::Boolean(true)));
        match method {
            "supervisor.getState" => Ok(Value::Struct(
                [
                    ("statecode".to_string(), Value::Integer(1)),
                    ("statename".to_string(), s("RUNNING")),
                ]
                .into(),
            )),
            "supervisor.getSupervisorVersion" => Ok(s("4.2.5 (stand-in)")),
            "supervisor.getAllProcessInfo" => Ok(Value::Array(
                h.processes.iter().map(|(g, p)| self.info(g, *p)).collect(),
            )),
            "supervisor.reloadConfig" => {
                self.reloads.fetch_add(1, Ordering::Relaxed);
                let mut seen = BTreeMap::new();
                for entry in std::fs::read_dir(&self.conf_dir).map_err(|e| (92, format!("CANT_REREAD: {e}")))? {
                    let entry = entry.map_err(|e| (92, format!("CANT_REREAD: {e}")))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if let Some(ManagedFile::Program(p)) = managed_file_kind(&name) {
                        let text =
                            std::fs::read_to_string(entry.path()).map_err(|e| (92, format!("CANT_REREAD: {e}")))?;
                        seen.insert(p, text);
                    }
                }
                let list = |v: Vec<&String>| Value::Array(v.into_iter().map(|g| s(g)).collect());
                let added = seen.keys().filter(|g| !h.loaded.contains_key(*g)).collect();
                let changed = seen
                    .iter()
                    .filter(|(g, c)| h.loaded.get(*g).is_some_and(|l| l != *c))
                    .map(|(g, _)| g)
                    .collect();
                let removed = h.loaded.keys().filter(|g| !seen.contains_key(*g)).collect();
                let answer = Value::Array(vec![Value::Array(vec![list(added), list(changed), list(removed)])]);
                h.pending = seen;
                Ok(answer)
            }
            "supervisor.addProcessGroup" => {
                let g = arg(0)?;
                let content = h.pending.get(&g).cloned().ok_or((10, format!("BAD_NAME: {g}")))?;
                if h.loaded.contains_key(&g) {
                    return Err((90, format!("ALREADY_ADDED: {g}")));
                }
                h.loaded.insert(g.clone(), content);
                let pid = self.pids.fetch_add(1, Ordering::Relaxed) as i32;
                h.processes.insert(g, (20, pid, now()));
                Ok(Value::Boolean(true))
            }
            "supervisor.removeProcessGroup" => {
                let g = arg(0)?;
                if h.processes.get(&g).is_some_and(|p| p.0 != 0) {
                    return Err((91, format!("STILL_RUNNING: {g}")));
                }
                h.loaded.remove(&g).ok_or((10, format!("BAD_NAME: {g}")))?;
                h.processes.remove(&g);
                Ok(Value::Boolean(true))
            }
            "supervisor.stopProcessGroup" | "supervisor.stopProcess" if wait => Err((
                30,
                "FAILED: the stand-in does not model waiting stops (supervisord answers them at its next loop turn)"
                    .to_string(),
            )),
            "supervisor.stopProcessGroup" => {
                let g = arg(0)?;
                let _ = h.stop(&g);
                Ok(Value::Array(vec![]))
            }
            "supervisor.stopProcess" => {
                let g = arg(0)?;
                let g = g.split(':').next_back().unwrap_or(&g).to_string();
                h.stop(&g)?;
                Ok(Value::Boolean(true))
            }
            "supervisor.startProcess" => {
                let g = arg(0)?;
                let g = g.split(':').next_back().unwrap_or(&g).to_string();
                let pid = self.pids.fetch_add(1, Ordering::Relaxed) as i32;
                let p = h.processes.get_mut(&g).ok_or((10, format!("BAD_NAME: {g}")))?;
                if p.0 != 0 {
                    return Err((60, format!("ALREADY_STARTED: {g}")));
                }
                *p = (20, pid, now());
                Ok(Value::Boolean(true))
            }
            other => Err((1, format!("UNKNOWN_METHOD: {other}"))),
        }
    }
}

async fn handle(State(standin): State<StandIn>, body: String) -> String {
    let call = match MethodCall::from_xml(&body) {
        Ok(c) => c,
        Err(e) => return fault(2, &format!("INCORRECT_PARAMETERS: {e}")),
    };
    if call.name == "system.multicall" {
        // As supervisord answers it: each call's bare value, or a fault struct.
        let Some(Value::Array(calls)) = call.params.first() else {
            return fault(2, "INCORRECT_PARAMETERS: system.multicall takes an array");
        };
        let mut answers = Vec::with_capacity(calls.len());
        for c in calls {
            let Value::Struct(fields) = c else {
                return fault(2, "INCORRECT_PARAMETERS: a multicall entry is a struct");
            };
            let name = match fields.get("methodName") {
                Some(Value::String(n)) => n.clone(),
                _ => return fault(2, "INCORRECT_PARAMETERS: methodName"),
            };
            let params = match fields.get("params") {
                Some(Value::Array(p)) => p.clone(),
                _ => Vec::new(),
            };
            answers.push(match standin.call(&name, &params) {
                Ok(v) => v,
                Err((code, msg)) => Value::Struct(
                    [
                        ("faultCode".to_string(), Value::Integer(code)),
                        ("faultString".to_string(), s(&msg)),
                    ]
                    .into(),
                ),
            });
        }
        return MethodResponse {
            value: Value::Array(answers),
        }
        .to_xml()
        .unwrap_or_default();
    }
    match standin.call(&call.name, &call.params) {
        Ok(v) => MethodResponse { value: v }.to_xml().unwrap_or_default(),
        Err((code, msg)) => fault(code, &msg),
    }
}

fn fault(code: i32, msg: &str) -> String {
    FaultResponse {
        fault: dxr::Fault::new(code, msg.to_string()),
    }
    .to_xml()
    .unwrap_or_default()
}
