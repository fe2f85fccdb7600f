//! The XML-RPC transport and the typed methods.

use std::path::PathBuf;
use std::time::Duration;

use dxr::{FaultResponse, MethodCall, MethodResponse, Value};

use super::scan::decode_all_process_info;
use super::types::{
    Decode, Error, FaultCode, LogTail, ProcessInfo, ProcessResult, ReloadResult, SupervisorState, as_fault,
    decode_process_info, decode_process_infos, decode_process_results, decode_reload, decode_state, decode_tail,
};

/// Where supervisord listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///run/supervisor.sock`
    Unix(PathBuf),
    /// `http://127.0.0.1:9001`
    Http(String),
}

impl Endpoint {
    /// Parses `unix:///path/to/supervisor.sock` or `http://host:port`.
    ///
    /// # Errors
    /// [`Error::Endpoint`] for any other form.
    pub fn parse(url: &str) -> Result<Endpoint, Error> {
        let bad = |reason: &str| Error::Endpoint {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a unix:// URL needs an absolute socket path (unix:///run/supervisor.sock)",
                ));
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(rest) = url.strip_prefix("http://") {
            let authority = rest.trim_end_matches('/').trim_end_matches("/RPC2");
            if authority.is_empty() || authority.contains('/') {
                return Err(bad("expected http://host:port"));
            }
            Ok(Endpoint::Http(format!("http://{authority}/RPC2")))
        } else {
            Err(bad("expected unix:///path/to/supervisor.sock or http://host:port"))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Http(u) => f.write_str(u),
        }
    }
}

/// How to reach supervisord.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub endpoint: Endpoint,
    /// `[unix_http_server]`/`[inet_http_server]` username and password, if set.
    pub credentials: Option<(String, String)>,
    /// Upper bound for one call, including `startProcess(wait=true)` which lasts `startsecs`.
    pub timeout: Duration,
}

impl ClientConfig {
    pub fn new(endpoint: Endpoint) -> Self {
        ClientConfig {
            endpoint,
            credentials: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// An XML-RPC client for one supervisord. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    endpoint: String,
    credentials: Option<(String, String)>,
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

impl Client {
    /// Builds a client; nothing is sent until the first call.
    ///
    /// # Errors
    /// [`Error::Transport`] if the HTTP client cannot be built.
    pub fn new(config: ClientConfig) -> Result<Client, Error> {
        // reqwest is built with rustls for the CLI's https and needs a provider even for a
        // client that never speaks TLS: ring, as everywhere in Corral (installed once).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(Duration::from_secs(5))
            .http1_only();
        let url = match &config.endpoint {
            Endpoint::Unix(path) => {
                builder = builder.unix_socket(path.clone());
                // The host is ignored on a UNIX socket; supervisord only looks at the path.
                "http://localhost/RPC2".to_string()
            }
            Endpoint::Http(url) => url.clone(),
        };
        let endpoint = config.endpoint.to_string();
        let http = builder.build().map_err(|source| Error::Transport {
            endpoint: endpoint.clone(),
            method: "(client setup)".into(),
            source,
        })?;
        Ok(Client {
            http,
            url,
            endpoint,
            credentials: config.credentials,
        })
    }

    /// Calls `method` and returns its raw result.
    ///
    /// # Errors
    /// Transport and HTTP errors, [`Error::Unauthorized`] on 401, [`Error::Fault`] when
    /// supervisord answers with a fault, [`Error::Decode`] when the body is not XML-RPC.
    pub async fn call_value(&self, method: &str, params: Vec<Value>) -> Result<Value, Error> {
        let text = self.call_raw(method, params).await?;
        check_fault(method, &text)?;
        decode_value(method, &text)
    }

    /// Calls `method` and returns the body of its answer, which may be a fault.
    async fn call_raw(&self, method: &str, params: Vec<Value>) -> Result<String, Error> {
        let body = MethodCall {
            name: method.into(),
            params,
        }
        .to_xml()
        .map_err(|e| Error::Decode {
            method: method.to_string(),
            detail: format!("cannot encode the call: {e}"),
        })?;
        let mut req = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "text/xml")
            .body(body);
        if let Some((user, pass)) = &self.credentials {
            req = req.basic_auth(user, Some(pass));
        }
        let transport = |source| Error::Transport {
            endpoint: self.endpoint.clone(),
            method: method.to_string(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        match resp.status().as_u16() {
            200 => {}
            401 => {
                return Err(Error::Unauthorized {
                    endpoint: self.endpoint.clone(),
                });
            }
            status => {
                return Err(Error::Http {
                    endpoint: self.endpoint.clone(),
                    method: method.to_string(),
                    status,
                });
            }
        }
        // Validated in one pass (`text()` takes the slower lossy route for every answer).
        let body = Vec::from(resp.bytes().await.map_err(transport)?);
        Ok(String::from_utf8(body).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    async fn call<T>(
        &self,
        method: &str,
        params: Vec<Value>,
        decode: fn(&Value) -> Result<T, String>,
    ) -> Result<T, Error> {
        let v = self.call_value(method, params).await?;
        decode(&v).map_err(|detail| Error::Decode {
            method: method.to_string(),
            detail,
        })
    }

    /// `supervisor.getState`.
    pub async fn get_state(&self) -> Result<SupervisorState, Error> {
        self.call("supervisor.getState", vec![], decode_state).await
    }

    /// `supervisor.getSupervisorVersion`, e.g. `4.2.5`.
    pub async fn get_supervisor_version(&self) -> Result<String, Error> {
        self.call("supervisor.getSupervisorVersion", vec![], String::decode)
            .await
    }

    /// `supervisor.getAllProcessInfo`, the call every pass makes: decoded by the fast
    /// decoder, and by dxr only if that one does not recognise the answer.
    pub async fn get_all_process_info(&self) -> Result<Vec<ProcessInfo>, Error> {
        // The fast decoder refuses a fault, so the answer is only searched for one after that.
        let text = self.call_raw(ALL_PROCESS_INFO, vec![]).await?;
        decode_all_process_info_answer(&text)
    }

    /// `supervisor.getProcessInfo(group:name)`.
    pub async fn get_process_info(&self, namespec: &str) -> Result<ProcessInfo, Error> {
        self.call("supervisor.getProcessInfo", vec![s(namespec)], decode_process_info)
            .await
    }

    /// `supervisor.reloadConfig`: re-reads every config file and reports what differs from
    /// the running groups. Applies nothing. A parse error anywhere is fault `CANT_REREAD`.
    pub async fn reload_config(&self) -> Result<ReloadResult, Error> {
        self.call("supervisor.reloadConfig", vec![], decode_reload).await
    }

    /// `supervisor.addProcessGroup`: adds a group from the last successful `reloadConfig`.
    pub async fn add_process_group(&self, group: &str) -> Result<bool, Error> {
        self.call("supervisor.addProcessGroup", vec![s(group)], bool::decode)
            .await
    }

    /// `supervisor.removeProcessGroup`: fails `STILL_RUNNING` unless every process is stopped.
    pub async fn remove_process_group(&self, group: &str) -> Result<bool, Error> {
        self.call("supervisor.removeProcessGroup", vec![s(group)], bool::decode)
            .await
    }

    /// `supervisor.startProcess`; with `wait`, returns once RUNNING (past startsecs).
    pub async fn start_process(&self, namespec: &str, wait: bool) -> Result<bool, Error> {
        self.call(
            "supervisor.startProcess",
            vec![s(namespec), Value::Boolean(wait)],
            bool::decode,
        )
        .await
    }

    /// `supervisor.stopProcess`.
    pub async fn stop_process(&self, namespec: &str, wait: bool) -> Result<bool, Error> {
        self.call(
            "supervisor.stopProcess",
            vec![s(namespec), Value::Boolean(wait)],
            bool::decode,
        )
        .await
    }

    /// `supervisor.startProcessGroup`: one result per process.
    pub async fn start_process_group(&self, group: &str, wait: bool) -> Result<Vec<ProcessResult>, Error> {
        self.call(
            "supervisor.startProcessGroup",
            vec![s(group), Value::Boolean(wait)],
            decode_process_results,
        )
        .await
    }

    /// `supervisor.stopProcessGroup`: one result per process.
    pub async fn stop_process_group(&self, group: &str, wait: bool) -> Result<Vec<ProcessResult>, Error> {
        self.call(
            "supervisor.stopProcessGroup",
            vec![s(group), Value::Boolean(wait)],
            decode_process_results,
        )
        .await
    }

    /// `supervisor.signalProcess`: signals the main pid only (never the process group).
    pub async fn signal_process(&self, namespec: &str, signal: &str) -> Result<bool, Error> {
        self.call("supervisor.signalProcess", vec![s(namespec), s(signal)], bool::decode)
            .await
    }

    /// `supervisor.signalProcessGroup`.
    pub async fn signal_process_group(&self, group: &str, signal: &str) -> Result<Vec<ProcessResult>, Error> {
        self.call(
            "supervisor.signalProcessGroup",
            vec![s(group), s(signal)],
            decode_process_results,
        )
        .await
    }

    /// `supervisor.readProcessStdoutLog` (`offset` may be negative: from the end).
    pub async fn read_process_stdout_log(&self, namespec: &str, offset: i32, length: i32) -> Result<String, Error> {
        let params = vec![s(namespec), Value::Integer(offset), Value::Integer(length)];
        self.call("supervisor.readProcessStdoutLog", params, String::decode)
            .await
    }

    /// `supervisor.readProcessStderrLog`.
    pub async fn read_process_stderr_log(&self, namespec: &str, offset: i32, length: i32) -> Result<String, Error> {
        let params = vec![s(namespec), Value::Integer(offset), Value::Integer(length)];
        self.call("supervisor.readProcessStderrLog", params, String::decode)
            .await
    }

    /// `supervisor.tailProcessStdoutLog`: up to `length` bytes before the end, from `offset`.
    pub async fn tail_process_stdout_log(&self, namespec: &str, offset: i32, length: i32) -> Result<LogTail, Error> {
        let params = vec![s(namespec), Value::Integer(offset), Value::Integer(length)];
        self.call("supervisor.tailProcessStdoutLog", params, decode_tail).await
    }

    /// `supervisor.tailProcessStderrLog`.
    pub async fn tail_process_stderr_log(&self, namespec: &str, offset: i32, length: i32) -> Result<LogTail, Error> {
        let params = vec![s(namespec), Value::Integer(offset), Value::Integer(length)];
        self.call("supervisor.tailProcessStderrLog", params, decode_tail).await
    }

    /// `system.multicall`: several calls in one request, each answered on its own.
    ///
    /// supervisord answers each call with its bare value or a fault struct (not the
    /// one-element arrays of the multicall convention), so this decodes them itself.
    ///
    /// # Errors
    /// The outer error if the request as a whole fails; per-call faults are in the vector.
    pub async fn multicall(&self, calls: &[(&str, Vec<Value>)]) -> Result<Vec<Result<Value, Error>>, Error> {
        let list = calls
            .iter()
            .map(|(name, params)| {
                Value::Struct(
                    [
                        ("methodName".to_string(), s(name)),
                        ("params".to_string(), Value::Array(params.clone())),
                    ]
                    .into(),
                )
            })
            .collect();
        let answer = self.call_value("system.multicall", vec![Value::Array(list)]).await?;
        let Value::Array(items) = answer else {
            return Err(Error::Decode {
                method: "system.multicall".into(),
                detail: format!("expected an array, got {answer:?}"),
            });
        };
        if items.len() != calls.len() {
            return Err(Error::Decode {
                method: "system.multicall".into(),
                detail: format!("{} answers to {} calls", items.len(), calls.len()),
            });
        }
        Ok(items
            .into_iter()
            .zip(calls)
            .map(|(item, (name, _))| match as_fault(&item) {
                Some((code, message)) => Err(fault_error(name, code, &message)),
                None => Ok(item),
            })
            .collect())
    }

    /// [`Client::multicall`] of `calls` followed by `getAllProcessInfo`: each call's answer,
    /// and the processes as they are right after the calls, in one request.
    ///
    /// # Errors
    /// The outer error if the request fails, or if the process listing cannot be read.
    pub async fn multicall_then_observe(
        &self,
        calls: &[(&str, Vec<Value>)],
    ) -> Result<(Vec<Result<Value, Error>>, Vec<ProcessInfo>), Error> {
        let mut all = calls.to_vec();
        all.push((ALL_PROCESS_INFO, Vec::new()));
        let mut answers = self.multicall(&all).await?;
        let infos = match answers.pop() {
            Some(Ok(v)) => crate::supervisor::types::decode_process_infos(&v).map_err(|detail| Error::Decode {
                method: ALL_PROCESS_INFO.into(),
                detail,
            })?,
            Some(Err(e)) => return Err(e),
            None => {
                return Err(Error::Decode {
                    method: "system.multicall".into(),
                    detail: "no answer for getAllProcessInfo".into(),
                });
            }
        };
        Ok((answers, infos))
    }
}

const ALL_PROCESS_INFO: &str = "supervisor.getAllProcessInfo";

fn decode_all_process_info_answer(text: &str) -> Result<Vec<ProcessInfo>, Error> {
    decode_all_process_info(text).or_else(|why| {
        check_fault(ALL_PROCESS_INFO, text)?;
        // Said once at info level: a supervisord whose answer always needs dxr makes every
        // pass slower, which an operator may want to know; the reason then goes to debug.
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::debug!("{ALL_PROCESS_INFO}: fast decoder declined ({why}); decoding with dxr");
        } else {
            tracing::info!("{ALL_PROCESS_INFO}: fast decoder declined ({why}); decoding with dxr (slower)");
        }
        decode_process_infos(&decode_value(ALL_PROCESS_INFO, text)?).map_err(|detail| Error::Decode {
            method: ALL_PROCESS_INFO.to_string(),
            detail,
        })
    })
}

/// The fault in `text`, if it is a fault answer.
fn check_fault(method: &str, text: &str) -> Result<(), Error> {
    // Markup inside values is escaped, so this tag only appears in a fault answer.
    if !text.contains("<fault>") {
        return Ok(());
    }
    let fault = FaultResponse::from_xml(text)
        .map_err(|e| Error::Decode {
            method: method.to_string(),
            detail: format!("bad fault response: {e}"),
        })?
        .fault;
    Err(fault_error(method, fault.code(), fault.string()))
}

fn decode_value(method: &str, text: &str) -> Result<Value, Error> {
    MethodResponse::from_xml(text)
        .map(|r| r.value)
        .map_err(|e| Error::Decode {
            method: method.to_string(),
            detail: e.to_string(),
        })
}

fn fault_error(method: &str, code: i32, message: &str) -> Error {
    Error::Fault {
        method: method.to_string(),
        code: FaultCode::from_code(code),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("unix:///run/s.sock").ok(),
            Some(Endpoint::Unix("/run/s.sock".into()))
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:9001").ok(),
            Some(Endpoint::Http("http://127.0.0.1:9001/RPC2".into()))
        );
        assert_eq!(
            Endpoint::parse("http://h:1/RPC2").ok(),
            Some(Endpoint::Http("http://h:1/RPC2".into()))
        );
        for bad in ["unix://rel.sock", "ftp://x", "http://", "http://h/x/y", "/run/s.sock"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    const MEMBERS: &str = "<member><name>name</name><value><string>web</string></value></member>\
        <member><name>group</name><value><string>web</string></value></member>\
        <member><name>start</name><value><int>1</int></value></member>\
        <member><name>stop</name><value><int>0</int></value></member>\
        <member><name>now</name><value><int>2</int></value></member>\
        <member><name>state</name><value><int>20</int></value></member>\
        <member><name>statename</name><value><string>RUNNING</string></value></member>\
        <member><name>spawnerr</name><value><string></string></value></member>\
        <member><name>exitstatus</name><value><int>0</int></value></member>\
        <member><name>stdout_logfile</name><value><string>/o</string></value></member>\
        <member><name>stderr_logfile</name><value><string>/e</string></value></member>\
        <member><name>pid</name><value><int>42</int></value></member>\
        <member><name>description</name><value><string>pid 42</string></value></member>";

    fn answer(extra_member: &str) -> String {
        format!(
            "<?xml version='1.0'?><methodResponse><params><param><value><array><data>\
             <value><struct>{MEMBERS}{extra_member}</struct></value>\
             </data></array></value></param></params></methodResponse>"
        )
    }

    #[test]
    fn an_answer_the_fast_decoder_declines_is_decoded_by_dxr() {
        // A later supervisord adding a struct-valued member: not this decoder's shape, but a
        // valid answer, so dxr decodes it and the unknown member is ignored.
        let text = answer("<member><name>extra</name><value><struct></struct></value></member>");
        assert!(decode_all_process_info(&text).is_err());
        let infos = decode_all_process_info_answer(&text).expect("dxr decodes it");
        assert_eq!(infos.len(), 1);
        assert_eq!((infos[0].name.as_str(), infos[0].pid), ("web", 42));
        // The usual shape never needs the fallback.
        assert_eq!(decode_all_process_info(&answer("")).ok(), Some(infos));
    }

    #[test]
    fn valid_shapes_outside_the_fast_grammar_decode_the_same_through_dxr() {
        let d = "<member><name>description</name><value><string>pid 42</string></value></member>";
        let cases = [
            ("<string><![CDATA[<a&b>]]></string>", "<a&b>"),
            ("<string>a<!-- note -->b</string>", "ab"),
            // XML line ends are normalised, as every XML parser does.
            ("<string>a\r\nb</string>", "a\nb"),
        ];
        for (value, want) in cases {
            let text = answer("").replace(
                d,
                &format!("<member><name>description</name><value>{value}</value></member>"),
            );
            assert!(
                decode_all_process_info(&text).is_err(),
                "{value} is outside the fast grammar"
            );
            let infos = decode_all_process_info_answer(&text).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(infos[0].description, want, "{value}");
        }
    }

    #[test]
    fn a_fault_answer_is_a_fault_not_a_decode_error() {
        let text = "<?xml version='1.0'?><methodResponse><fault><value><struct>\
            <member><name>faultCode</name><value><int>6</int></value></member>\
            <member><name>faultString</name><value><string>SHUTDOWN_STATE</string></value></member>\
            </struct></value></fault></methodResponse>";
        match decode_all_process_info_answer(text) {
            Err(Error::Fault { code, message, .. }) => {
                assert_eq!((code, message.as_str()), (FaultCode::ShutdownState, "SHUTDOWN_STATE"));
            }
            other => panic!("expected a fault, got {other:?}"),
        }
    }

    #[test]
    fn a_broken_answer_is_a_decode_error_from_either_decoder() {
        let text = answer("").replace("<name>pid</name>", "<name>pidx</name>");
        match decode_all_process_info_answer(&text) {
            Err(Error::Decode { method, detail }) => {
                assert_eq!(method, "supervisor.getAllProcessInfo");
                assert!(detail.contains("pid"), "{detail}");
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
    }
}
