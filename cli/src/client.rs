//! A typed client of the controller's `/v1` API.

use std::time::Duration;

use corral_proto::api::{ApplyResult, Deleted, ErrorBody, Health, ProgramAction};
use corral_proto::fleet::FleetStatus;
use corral_proto::resource::{Group, Host, Kind, Program, Resource};
use serde::de::DeserializeOwned;

/// What went wrong talking to the controller.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the controller at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The controller answered with an error.
    #[error("{message}{}", details.iter().map(|d| format!("\n  {d}")).collect::<String>())]
    Api {
        status: u16,
        message: String,
        details: Vec<String>,
    },
    #[error("unexpected answer from the controller: {0}")]
    Decode(String),
    /// Refused before anything was sent (an invalid name, a server that is not a URL).
    #[error("{0}")]
    Invalid(String),
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A controller API client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Makes rustls's ring provider the process default, once. reqwest (built with rustls for
/// https) needs one before any client is built, even one that only speaks plain HTTP; Corral
/// uses ring everywhere (etcd-client's TLS, the controller's HTTPS).
pub fn ensure_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How to trust the controller over https, and how to prove who we are.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Trust only this CA (PEM) for the controller's certificate; without it, the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) and its key, for a controller that asks for one.
    pub cert_file: Option<std::path::PathBuf>,
    pub key_file: Option<std::path::PathBuf>,
}

impl ApiClient {
    /// `server` is the controller's base URL (`http://127.0.0.1:7070`).
    ///
    /// # Errors
    /// If the HTTP client cannot be built.
    pub fn new(server: &str, token: Option<String>) -> Result<ApiClient, ClientError> {
        ApiClient::with_tls(server, token, &TlsOptions::default())
    }

    /// Like [`ApiClient::new`], with a CA and client certificate for https.
    ///
    /// # Errors
    /// An invalid URL, unreadable or invalid PEM files, or an HTTP client that cannot be built.
    pub fn with_tls(server: &str, token: Option<String>, tls: &TlsOptions) -> Result<ApiClient, ClientError> {
        // `127.0.0.1:7070` means plain HTTP, as the controller's own --listen does.
        let server = if server.contains("://") {
            server.to_string()
        } else {
            format!("http://{server}")
        };
        match reqwest::Url::parse(&server) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(ClientError::Invalid(format!(
                    "--server {server:?} is not the controller's URL (http://HOST:PORT or https://HOST:PORT)"
                )));
            }
        }
        let server = server.as_str();
        ensure_tls_provider();
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Invalid(format!("cannot read {}: {e}", p.display())))
        };
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
        if let Some(ca) = &tls.ca_file {
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
                .map_err(|e| ClientError::Invalid(format!("{}: not PEM certificates: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(ClientError::Invalid(format!("{} holds no certificate", ca.display())));
            }
            builder = builder.tls_certs_only(certs);
        }
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                let mut pem = read(cert)?;
                pem.extend(read(key)?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    ClientError::Invalid(format!(
                        "{} and {}: not a PEM certificate and key: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?;
                builder = builder.identity(identity);
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::Invalid(
                    "a client certificate needs both --cert-file and --key-file".into(),
                ));
            }
        }
        let http = builder.build().map_err(|source| ClientError::Transport {
            url: server.to_string(),
            source,
        })?;
        Ok(ApiClient {
            http,
            base: server.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The controller's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request; a 503 (etcd electing a new leader, say) is retried a few times, which
    /// is safe because every call is idempotent (GET, PUT of a whole object, DELETE).
    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let transport = |source| ClientError::Transport {
            url: self.base.clone(),
            source,
        };
        let mut attempt = 0u32;
        let (status, body) = loop {
            let this = req
                .try_clone()
                .ok_or_else(|| ClientError::Decode("a request that cannot be retried".into()))?;
            let resp = this.send().await.map_err(transport)?;
            let status = resp.status();
            let body = resp.text().await.map_err(transport)?;
            if status == reqwest::StatusCode::SERVICE_UNAVAILABLE && attempt < 5 {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
                continue;
            }
            break (status, body);
        };
        if !status.is_success() {
            // The API's error body; anything else (a proxy's page) is shown as it came.
            let (message, details) = match serde_json::from_str::<ErrorBody>(&body) {
                Ok(e) => (e.error, e.details),
                Err(_) => (format!("HTTP {status}: {body}"), Vec::new()),
            };
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
                details,
            });
        }
        serde_json::from_str(&body).map_err(|e| ClientError::Decode(format!("{e}: {body}")))
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.base)
    }

    /// `/v1/<collection>/<name>`, the name checked (it must be a valid program or group name,
    /// so `..`, `/` or `?` never reach a URL) and escaped all the same.
    fn object_url(&self, collection: &str, name: &str) -> Result<String, ClientError> {
        corral_proto::validate::check_name(name).map_err(ClientError::Invalid)?;
        Ok(self.segments_url(&["v1", collection, name])?.to_string())
    }

    /// The server's URL with `segments` appended, each escaped as one path segment.
    fn segments_url(&self, segments: &[&str]) -> Result<reqwest::Url, ClientError> {
        let mut url =
            reqwest::Url::parse(&self.base).map_err(|e| ClientError::Invalid(format!("{}: {e}", self.base)))?;
        url.path_segments_mut()
            .map_err(|()| ClientError::Invalid(format!("{} cannot be a base URL", self.base)))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn collection(kind: Kind) -> &'static str {
        match kind {
            Kind::Program => "programs",
            Kind::Group => "groups",
            Kind::Host => "hosts",
        }
    }

    /// Creates or replaces a Program or Group. The answer says `created`, `configured` or
    /// `unchanged`, and carries the stored object.
    ///
    /// # Errors
    /// Validation (422, every field error in `details`), conflicts (409), transport.
    pub async fn apply(&self, r: &Resource, dry_run: bool) -> Result<ApplyResult<Resource>, ClientError> {
        let url = self.object_url(Self::collection(r.kind()), &r.metadata().name)?;
        self.send(self.http.put(format!("{url}?dry_run={dry_run}")).json(r))
            .await
    }

    /// # Errors
    /// 404 when absent.
    pub async fn program(&self, name: &str) -> Result<Program, ClientError> {
        self.send(self.http.get(self.object_url("programs", name)?)).await
    }

    /// # Errors
    /// Transport and API errors.
    pub async fn programs(&self) -> Result<Vec<Program>, ClientError> {
        self.send(self.http.get(self.url("/programs"))).await
    }

    /// # Errors
    /// 404 when absent.
    pub async fn group(&self, name: &str) -> Result<Group, ClientError> {
        self.send(self.http.get(self.object_url("groups", name)?)).await
    }

    /// # Errors
    /// Transport and API errors.
    pub async fn groups(&self) -> Result<Vec<Group>, ClientError> {
        self.send(self.http.get(self.url("/groups"))).await
    }

    /// # Errors
    /// Transport and API errors.
    pub async fn hosts(&self) -> Result<Vec<Host>, ClientError> {
        self.send(self.http.get(self.url("/hosts"))).await
    }

    /// # Errors
    /// Transport and API errors.
    pub async fn status(&self) -> Result<FleetStatus, ClientError> {
        self.send(self.http.get(self.url("/status"))).await
    }

    /// Who changed what, newest first: the last `limit` writes, of `name` (a program or
    /// group) when given.
    ///
    /// # Errors
    /// An invalid name (nothing is sent); transport and API errors.
    pub async fn history(
        &self,
        kind: Option<Kind>,
        name: Option<&str>,
        limit: usize,
    ) -> Result<Vec<corral_proto::api::AuditEntry>, ClientError> {
        let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
        if let Some(name) = name {
            let check = match kind {
                Some(Kind::Host) => corral_proto::validate::check_host_name,
                _ => corral_proto::validate::check_name,
            };
            check(name).map_err(ClientError::Invalid)?;
            query.push(("name", name.to_string()));
        }
        match kind {
            Some(Kind::Program) => query.push(("kind", "program".into())),
            Some(Kind::Group) => query.push(("kind", "group".into())),
            Some(Kind::Host) => query.push(("kind", "host".into())),
            None => {}
        }
        let mut url = self.segments_url(&["v1", "history"])?;
        url.query_pairs_mut().extend_pairs(&query);
        self.send(self.http.get(url)).await
    }

    /// `/v1/hosts/<name>/<what>`, the host name checked and escaped.
    fn host_url(&self, name: &str, what: &str) -> Result<reqwest::Url, ClientError> {
        corral_proto::validate::check_host_name(name).map_err(ClientError::Invalid)?;
        self.segments_url(&["v1", "hosts", name, what])
    }

    /// Cordons, uncordons or drains a host; returns it as placement now sees it.
    ///
    /// # Errors
    /// An invalid host name (nothing is sent); 404 for a host that never registered.
    pub async fn host_action(&self, name: &str, action: corral_proto::api::HostAction) -> Result<Host, ClientError> {
        self.send(self.http.post(self.host_url(name, "action")?).json(&action))
            .await
    }

    /// Sets (a value) or removes (`None`) a host's labels.
    ///
    /// # Errors
    /// Invalid names or labels (nothing is sent); 404 for a host that never registered.
    pub async fn label_host(&self, name: &str, changes: &corral_proto::api::LabelChanges) -> Result<Host, ClientError> {
        corral_proto::validate::validate_label_changes(name, changes)
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.send(self.http.put(self.host_url(name, "labels")?).json(changes))
            .await
    }

    /// # Errors
    /// 404 when absent.
    pub async fn delete(&self, kind: Kind, name: &str, dry_run: bool) -> Result<Deleted, ClientError> {
        let url = self.object_url(Self::collection(kind), name)?;
        self.send(self.http.delete(format!("{url}?dry_run={dry_run}"))).await
    }

    /// The controller's version (from `/healthz`).
    ///
    /// # Errors
    /// Transport, or an answer without a version.
    pub async fn server_version(&self) -> Result<String, ClientError> {
        let h: Health = self.send(self.http.get(format!("{}/healthz", self.base))).await?;
        Ok(h.version)
    }

    /// Starts, stops, restarts or signals a program: one atomic change on the controller.
    ///
    /// # Errors
    /// 404 when absent, 422 for a signal that is not one, transport.
    pub async fn act(&self, name: &str, action: &ProgramAction) -> Result<ApplyResult<Program>, ClientError> {
        let url = format!("{}/action", self.object_url("programs", name)?);
        self.send(self.http.post(url).json(action)).await
    }

    /// A program's kept revisions, newest first.
    ///
    /// # Errors
    /// 404 when the program does not exist.
    pub async fn revisions(&self, name: &str) -> Result<Vec<corral_proto::api::Revision>, ClientError> {
        let url = format!("{}/revisions", self.object_url("programs", name)?);
        self.send(self.http.get(url)).await
    }

    /// Applies a kept revision's spec again (the one before the current by default).
    ///
    /// # Errors
    /// 404 when there is no such revision; 422 when it no longer validates or breaks the
    /// policy.
    pub async fn rollback(&self, name: &str, generation: Option<u64>) -> Result<ApplyResult<Program>, ClientError> {
        let url = format!("{}/rollback", self.object_url("programs", name)?);
        self.send(self.http.post(url).json(&corral_proto::api::Rollback { generation }))
            .await
    }

    /// The logs of a program's processes, read by the agents of its hosts.
    ///
    /// # Errors
    /// 404 when the program (or it on `query.host`) does not exist; 422 for a bad query.
    pub async fn logs(
        &self,
        name: &str,
        query: &corral_proto::logs::LogsQuery,
    ) -> Result<corral_proto::logs::Logs, ClientError> {
        let url = format!("{}/logs", self.object_url("programs", name)?);
        self.send(self.http.post(url).json(query)).await
    }

    /// Reads a program, changes its spec with `f`, and writes it back on the same
    /// `resourceVersion`, retrying a few times if someone else wrote in between.
    ///
    /// # Errors
    /// Whatever the last attempt met.
    pub async fn update_program(
        &self,
        name: &str,
        f: impl Fn(&mut Program),
    ) -> Result<ApplyResult<Resource>, ClientError> {
        let mut attempt = 0;
        loop {
            let mut p = self.program(name).await?;
            p.status = None;
            f(&mut p);
            match self.apply(&Resource::Program(p), false).await {
                Err(e) if e.status() == Some(409) && attempt < 5 => attempt += 1,
                other => return other,
            }
        }
    }
}
