//! The files in deploy/: Prometheus rules pass their promtool unit tests, the Grafana alert
//! rules are the same alerts, every PromQL expression parses, and the JSON/YAML loads.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (Debian prometheus)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn prometheus_rules_pass_their_promtool_unit_tests() {
    let dir = deploy("prometheus");
    let (ok, out) = promtool(&["check", "rules", &dir.join("corral-alerts.yml").display().to_string()]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&[
        "test",
        "rules",
        &dir.join("corral-alerts.test.yml").display().to_string(),
    ]);
    assert!(ok, "{out}");
    // Every alert has a unit test, and summary, description and runbook.
    let rules = yaml(&dir.join("corral-alerts.yml"));
    let tests = std::fs::read_to_string(dir.join("corral-alerts.test.yml")).expect("tests");
    for rule in all_alerts(&rules) {
        let name = rule["alert"].as_str().expect("alert name");
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "{name} has no promtool test"
        );
        for a in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][a].as_str().is_some_and(|s| !s.is_empty()),
                "{name} lacks {a}"
            );
        }
    }
}

fn all_alerts(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

/// The Grafana-managed equivalent of the Prometheus rules: the same expression (each returns
/// only the series that breach, all non-negative, hence the `$A > -1` condition), `for`,
/// labels and annotations.
fn grafana_rules(prometheus: &Value) -> Value {
    let groups: Vec<Value> = prometheus["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            let rules: Vec<Value> = g["rules"]
                .as_array()
                .expect("rules")
                .iter()
                .map(|r| {
                    let title = r["alert"].as_str().expect("alert");
                    let mut annotations = r["annotations"].clone();
                    if let Some(m) = annotations.as_object_mut() {
                        for v in m.values_mut() {
                            if let Some(s) = v.as_str() {
                                *v = json!(s.replace("{{ $value", "{{ $values.A.Value"));
                            }
                        }
                    }
                    json!({
                        "uid": format!("corral-{}", title.trim_start_matches("Corral").to_lowercase()),
                        "title": title,
                        "condition": "C",
                        "data": [
                            {"refId": "A", "relativeTimeRange": {"from": 900, "to": 0}, "datasourceUid": "prometheus",
                             "model": {"refId": "A", "expr": r["expr"].as_str().expect("expr").trim(), "instant": true}},
                            {"refId": "C", "datasourceUid": "__expr__",
                             "model": {"refId": "C", "type": "math", "expression": "$A > -1"}}
                        ],
                        "for": r.get("for").cloned().unwrap_or(json!("0s")),
                        "noDataState": "OK",
                        "execErrState": "Error",
                        "labels": r["labels"],
                        "annotations": annotations,
                    })
                })
                .collect();
            json!({"orgId": 1, "name": g["name"], "folder": "Corral", "interval": "1m", "rules": rules})
        })
        .collect();
    json!({"apiVersion": 1, "groups": groups})
}

#[test]
fn grafana_alert_rules_are_the_prometheus_alerts() {
    let want = grafana_rules(&yaml(&deploy("prometheus/corral-alerts.yml")));
    let path = deploy("grafana/provisioning/alerting/corral-alerts.yml");
    if std::env::var_os("CORRAL_UPDATE_GRAFANA").is_some() {
        let text = format!(
            "# Generated from deploy/prometheus/corral-alerts.yml by the deploy tests\n# (CORRAL_UPDATE_GRAFANA=1 cargo test -p corral-tests deploy); do not edit by hand.\n{}",
            serde_saphyr::to_string(&want).expect("yaml")
        );
        std::fs::write(&path, text).expect("write");
    }
    assert_eq!(yaml(&path), want, "regenerate with CORRAL_UPDATE_GRAFANA=1");
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            let is_expression_node = m.get("datasourceUid").and_then(Value::as_str) == Some("__expr__");
            if !is_expression_node {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                for v in m.values() {
                    collect_exprs(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn every_promql_expression_in_the_dashboards_and_grafana_alerts_parses() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/dashboards/corral-fleet.json")).expect("dashboard"),
    )
    .expect("dashboard JSON loads");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids: Vec<i64> = panels.iter().map(|p| p["id"].as_i64().expect("id")).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let dashboard_count = exprs.len();
    assert!(dashboard_count >= 10, "{dashboard_count} expressions");
    collect_exprs(
        &yaml(&deploy("grafana/provisioning/alerting/corral-alerts.yml")),
        &mut exprs,
    );
    assert!(exprs.len() > dashboard_count);
    for f in [
        "grafana/provisioning/dashboards/corral.yml",
        "grafana/provisioning/datasources/prometheus.yml",
    ] {
        assert_eq!(yaml(&deploy(f))["apiVersion"], 1, "{f}");
    }

    // promtool parses each one as a recording rule (Grafana's $__ variables become a range).
    let rules = json!({"groups": [{"name": "parse", "rules": exprs.iter().enumerate().map(|(i, e)| json!({
        "record": format!("corral:parse_check_{i}"),
        "expr": e.replace("$__rate_interval", "5m").replace("$__interval", "1m"),
    })).collect::<Vec<_>>()}]});
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("exprs.yml");
    std::fs::write(&file, serde_json::to_string(&rules).expect("json")).expect("write");
    let (ok, out) = promtool(&["check", "rules", &file.display().to_string()]);
    assert!(ok, "{out}");
}

/// `target/<profile>/NAME`, built by `cargo build --bins` (scripts/test does).
pub(crate) fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --bins` first",
        bin.display()
    );
    bin
}

#[test]
fn systemd_units_verify_and_their_environment_files_name_real_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut units = Vec::new();
    for name in ["corral-agent", "corral-controller"] {
        let text = std::fs::read_to_string(deploy(&format!("systemd/{name}.service"))).expect("unit");
        assert!(text.contains(&format!("ExecStart=/usr/local/bin/{name}\n")), "{name}");
        let unit = dir.path().join(format!("{name}.service"));
        let bin = built_binary(name);
        std::fs::write(
            &unit,
            text.replace(&format!("/usr/local/bin/{name}"), &bin.display().to_string()),
        )
        .expect("write");
        units.push(unit.display().to_string());

        // Every CORRAL_* variable of the environment file is one the binary reads.
        let help = Command::new(&bin).arg("--help").output().expect("help");
        let help = String::from_utf8_lossy(&help.stdout);
        let env = std::fs::read_to_string(deploy(&format!("systemd/{name}.env"))).expect("env file");
        let vars: Vec<&str> = env
            .lines()
            .map(|l| l.trim_start_matches('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| k.starts_with("CORRAL_"))
            .collect();
        assert!(vars.len() >= 5, "{name}: {vars:?}");
        for v in vars {
            assert!(
                help.contains(&format!("[env: {v}=")),
                "{name} does not read {v}:\n{help}"
            );
        }
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

fn ansible(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(cwd)
        .env("ANSIBLE_LOCALHOST_WARNING", "false")
        .env("ANSIBLE_NOCOLOR", "true")
        // Modules run with Debian's python (supervisor's own), whatever python ansible itself uses.
        .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (ansible-core comes from PyPI; scripts/install-deps installs it)",
                args[0]
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}:\n{text}");
    text
}

#[tokio::test]
async fn the_ansible_role_passes_syntax_check_and_its_supervisord_conf_runs() -> anyhow::Result<()> {
    let dir = deploy("ansible");
    ansible(
        &[
            "ansible-playbook",
            "--syntax-check",
            "-i",
            "inventory.example.ini",
            "site.yml",
        ],
        &dir,
    );

    // Render the role's templates with Ansible itself, into a scratch supervisord layout.
    let tmp = tempfile::tempdir()?;
    let t = tmp.path().display().to_string();
    std::fs::create_dir_all(tmp.path().join("conf.d"))?;
    std::fs::create_dir_all(tmp.path().join("log"))?;
    let role = dir.join("roles/corral_agent/templates");
    let vars = format!(
        "{{\"corral_supervisor_socket\": \"{t}/s.sock\", \"corral_supervisor_log_dir\": \"{t}/log\", \"corral_supervisor_run_dir\": \"{t}\", \"corral_supervisor_conf_dir\": \"{t}/conf.d\", \"corral_etcd_endpoints\": [\"https://e1:2379\", \"https://e2:2379\"], \"corral_etcd_ca_file\": \"/etc/corral/ca.pem\", \"corral_etcd_cert_file\": \"\", \"corral_etcd_key_file\": \"\", \"corral_prefix\": \"/corral\", \"corral_host_labels\": {{\"role\": \"app\", \"zone\": \"b\"}}, \"corral_state_dir\": \"/var/lib/corral-agent\", \"corral_metrics_listen\": \"0.0.0.0:9464\"}}"
    );
    for (src, dest) in [
        ("supervisord.conf.j2", "supervisord.conf"),
        ("corral-agent.env.j2", "agent.env"),
    ] {
        ansible(
            &[
                "ansible",
                "localhost",
                "-i",
                "localhost,",
                "-c",
                "local",
                "-m",
                "ansible.builtin.template",
                "-a",
                &format!("src={} dest={t}/{dest}", role.join(src).display()),
                "-e",
                &vars,
            ],
            tmp.path(),
        );
    }
    let env = std::fs::read_to_string(tmp.path().join("agent.env"))?;
    for line in [
        "CORRAL_ETCD_ENDPOINTS=https://e1:2379,https://e2:2379",
        "CORRAL_ETCD_CA_FILE=/etc/corral/ca.pem",
        "CORRAL_LABELS=role=app,zone=b",
        &format!("CORRAL_CONF_DIR={t}/conf.d"),
    ] {
        assert!(env.lines().any(|l| l == line), "{line:?} missing:\n{env}");
    }
    assert!(!env.contains("CORRAL_ETCD_CERT_FILE"), "{env}");

    // A real supervisord accepts the rendered supervisord.conf and includes the conf dir.
    let conf = tmp.path().join("supervisord.conf");
    let mut child = corral_tests::process::ChildGuard::spawn("supervisord", {
        let mut c = Command::new("supervisord");
        c.arg("-n")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    })?;
    let client = corral_agent::supervisor::Client::new(corral_agent::supervisor::ClientConfig::new(
        corral_agent::supervisor::Endpoint::Unix(tmp.path().join("s.sock")),
    ))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while client.get_state().await.is_err() {
        child.check_alive()?;
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "supervisord did not start with the rendered config"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    std::fs::write(
        tmp.path().join("conf.d/corral-program-x.conf"),
        "[program:x]\ncommand=/bin/sleep 100\nautostart=false\n",
    )?;
    assert_eq!(client.reload_config().await?.added, ["x"]);
    child.terminate(std::time::Duration::from_secs(10));
    Ok(())
}
