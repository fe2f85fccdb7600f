//! The HTTP+JSON API under `/v1`, bearer-token protected; `/healthz` is open.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use corral_proto::api::{ApplyResult, AuditEntry, Deleted, ErrorBody, Health, Outcome, ProgramAction, Role};
use corral_proto::resource::{Group, Host, Kind, Program, Resource};
use corral_proto::{ValidationErrors, parse_json, validate_group, validate_program};
use prometheus_client::registry::Registry;
use serde::Deserialize;

use crate::leader::ApiSide;
use crate::metrics::ControllerMetrics;
use crate::status::{
    AGENT_AWAY_FOR_LOGS, fleet_status, host_readiness, log_hosts, placement_candidates, program_status,
};
use crate::store::{Applied, Author, Object, Store, StoreError};
use crate::tokens::Token;
use corral_proto::fleet::FleetStatus;

/// The `{name}` path segment, refused with 400 unless `check` accepts it (names become etcd
/// key segments and file names: `..`, `/` or `?` never get that far).
async fn checked_name<S: Send + Sync>(
    parts: &mut axum::http::request::Parts,
    state: &S,
    check: fn(&str) -> Result<(), String>,
    what: &str,
) -> Result<String, ApiError> {
    let Path(name) = Path::<String>::from_request_parts(parts, state)
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    check(&name).map_err(|why| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("invalid {what} in the request path"),
        details: vec![format!("metadata.name: {why}")],
    })?;
    Ok(name)
}

/// A program or group name from the request path.
pub struct Name(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Name, ApiError> {
        checked_name(parts, state, corral_proto::validate::check_name, "name")
            .await
            .map(Name)
    }
}

/// A host name from the request path.
pub struct HostName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for HostName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<HostName, ApiError> {
        checked_name(parts, state, corral_proto::validate::check_host_name, "host name")
            .await
            .map(HostName)
    }
}

/// The largest request body the API reads: many times the largest object
/// ([`corral_proto::validate::MAX_OBJECT_BYTES`]), far below etcd's request limit.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A request body as text; one past [`MAX_BODY_BYTES`] is refused with 413 and the limit.
pub struct Body(pub String);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Body, ApiError> {
        String::from_request(req, state).await.map(Body).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request is larger than the API accepts ({MAX_BODY_BYTES} bytes; one object may have {} bytes)",
                        corral_proto::validate::MAX_OBJECT_BYTES
                    ),
                )
            } else {
                ApiError::new(e.status(), e.body_text())
            }
        })
    }
}

/// Shared by every request.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub tokens: Arc<Vec<Token>>,
    pub leader: ApiSide,
    pub metrics: ControllerMetrics,
    /// What specs may ask of hosts (`--policy-file`); the default allows anything.
    pub policy: Arc<crate::policy::Policy>,
    registry: Arc<Registry>,
}

impl AppState {
    /// State with a fresh metrics registry.
    pub fn new(store: Store, tokens: Vec<Token>, leader: ApiSide) -> AppState {
        let mut registry = Registry::default();
        let metrics = ControllerMetrics::register(&mut registry);
        AppState {
            store,
            tokens: Arc::new(tokens),
            leader,
            metrics,
            policy: Arc::new(crate::policy::Policy::default()),
            registry: Arc::new(registry),
        }
    }

    /// This state, enforcing `policy` at apply.
    pub fn with_policy(mut self, policy: crate::policy::Policy) -> AppState {
        self.policy = Arc::new(policy);
        self
    }
}

/// An error answer: `{"error": "...", "details": [...]}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    details: Vec<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            details: Vec::new(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = match &e {
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Etcd(_) | StoreError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // etcd away: one line a user can act on, not the transport's chain.
        let message = match &e {
            StoreError::Etcd(etcd) if corral_etcd::Etcd::is_unavailable(etcd) => format!(
                "etcd is unreachable ({}); the controller keeps retrying",
                corral_etcd::Etcd::short_reason(etcd)
            ),
            StoreError::Timeout(what) => format!("etcd did not answer in time ({what}); the controller keeps retrying"),
            _ => e.to_string(),
        };
        ApiError::new(status, message)
    }
}

impl From<ValidationErrors> for ApiError {
    fn from(e: ValidationErrors) -> ApiError {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            message: format!("{} is invalid", e.resource),
            details: e.errors.iter().map(ToString::to_string).collect(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
                details: self.details,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// `?dry_run=true`
#[derive(Debug, Default, Deserialize)]
pub struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

fn apply_result<T>(a: Applied<T>, dry_run: bool) -> ApplyResult<T> {
    let result = match (a.created, a.changed) {
        (true, _) => Outcome::Created,
        (false, true) => Outcome::Configured,
        (false, false) => Outcome::Unchanged,
    };
    ApplyResult {
        result,
        dry_run,
        object: a.object,
    }
}

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/programs", get(list_programs).post(apply_any))
        .route(
            "/programs/{name}",
            get(get_program).put(put_program).delete(delete_program),
        )
        .route("/programs/{name}/action", axum::routing::post(program_action))
        .route("/programs/{name}/revisions", get(program_revisions))
        .route("/programs/{name}/rollback", axum::routing::post(program_rollback))
        .route("/programs/{name}/logs", axum::routing::post(program_logs))
        .route("/groups", get(list_groups).post(apply_any))
        .route("/groups/{name}", get(get_group).put(put_group).delete(delete_group))
        .route("/hosts", get(list_hosts))
        .route("/hosts/{name}/action", axum::routing::post(host_action))
        .route("/hosts/{name}/labels", axum::routing::put(host_labels))
        .route("/status", get(status))
        .route("/history", get(history))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(health))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts every request by its route pattern (never the raw path: names stay out of labels).
async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let route = format!("{} {route}", req.method());
    let started = Instant::now();
    let resp = next.run(req).await;
    state.metrics.request(&route, resp.status().as_u16(), started.elapsed());
    resp
}

/// `/metrics`: open like `/healthz`, so Prometheus needs no token. It shows program and host
/// names and counts, never specs. The fleet's numbers come from the leader's index (a scrape
/// reads nothing from etcd), so only the leading replica exports them.
async fn metrics(State(state): State<AppState>) -> Response {
    state.metrics.set_leader(state.leader.is_leader());
    match state.leader.numbers().await {
        Some((status, hosts)) => state.metrics.set_fleet(&status, &hosts),
        None => state.metrics.clear_fleet(),
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The role a request needs: reading (and any dry run) is for every token, the actions
/// (start, stop, restart, signal) for operators, applying and deleting specs for admins.
pub fn needed_role(method: &axum::http::Method, path: &str, dry_run: bool) -> Role {
    use axum::http::Method;
    if method == Method::GET || method == Method::HEAD || (method == Method::POST && path.ends_with("/logs")) {
        // Reading logs writes nothing but its own short-lived requests.
        Role::ReadOnly
    } else if method == Method::POST && (path.ends_with("/action") || path.ends_with("/rollback")) {
        // Actions have no dry run: `?dry_run=true` on one changes nothing here.
        Role::Operator
    } else if dry_run && {
        // Inside the `/v1` router the path comes without it.
        let path = path.strip_prefix("/v1").unwrap_or(path);
        path.starts_with("/programs") || path.starts_with("/groups")
    } {
        // Only specs have a dry run.
        Role::ReadOnly
    } else {
        Role::Admin
    }
}

/// What a refused request would have done, for the 403's message.
fn refused_what(path: &str) -> &'static str {
    let path = path.strip_prefix("/v1").unwrap_or(path);
    if path.starts_with("/hosts/") && path.ends_with("/labels") {
        "label hosts"
    } else if path.starts_with("/hosts/") {
        "cordon, uncordon or drain hosts"
    } else if path.ends_with("/rollback") {
        "undo rollouts"
    } else if path.ends_with("/action") {
        "start, stop, restart, signal, pause or resume programs"
    } else {
        "apply or delete specs"
    }
}

/// Finds the bearer token's owner, refuses what its role may not do (403, naming the role
/// needed), and hands the owner to the handler (the audit records it).
async fn auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| {
            // Every token is compared, so timing tells nothing about which one nearly matched.
            state.tokens.iter().fold(None, |found, known| {
                let same = constant_time_eq(known.secret.as_bytes(), t.as_bytes());
                if same { Some(known) } else { found }
            })
        });
    let Some(token) = token else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid bearer token").into_response();
    };
    let dry_run = Query::<DryRun>::try_from_uri(req.uri()).is_ok_and(|q| q.dry_run);
    let needed = needed_role(req.method(), req.uri().path(), dry_run);
    if token.role < needed {
        let what = refused_what(req.uri().path());
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} is {}: it may not {what} (that needs role {needed})",
                token.name, token.role
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(Author {
        name: token.name.clone(),
        role: token.role,
    });
    next.run(req).await
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        ok: true,
        leader: state.leader.is_leader(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

fn parse_body(body: &str) -> Result<Resource, ApiError> {
    parse_json(body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the resource: {e}")))
}

/// A program may be in at most one native group.
async fn check_native_groups(store: &Store, g: &Group) -> Result<(), ApiError> {
    if !g.spec.native {
        return Ok(());
    }
    let others: Vec<Group> = store.list().await?;
    let mine: BTreeSet<&String> = g.spec.programs.iter().collect();
    for other in others
        .iter()
        .filter(|o| o.spec.native && o.metadata.name != g.metadata.name)
    {
        if let Some(p) = other.spec.programs.iter().find(|p| mine.contains(p)) {
            return Err(ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("Group {:?} is invalid", g.metadata.name),
                details: vec![format!(
                    "spec.programs: {p:?} is already in native group {:?}",
                    other.metadata.name
                )],
            });
        }
    }
    Ok(())
}

async fn apply_resource(
    state: &AppState,
    r: Resource,
    dry_run: bool,
    by: &Author,
) -> Result<serde_json::Value, ApiError> {
    let value = match r {
        Resource::Program(p) => {
            let p = validate_program(p)?.into_inner();
            let refused = state.policy.check(&p.spec);
            if !refused.is_empty() {
                return Err(ValidationErrors {
                    resource: format!("Program {:?}", p.metadata.name),
                    errors: refused,
                }
                .into());
            }
            if p.spec.depends_on.as_ref().is_none_or(Vec::is_empty) {
                serde_json::to_value(apply_result(state.store.apply(p, dry_run, by).await?, dry_run))
            } else {
                serde_json::to_value(apply_result(apply_ordered(state, p, dry_run, by).await?, dry_run))
            }
        }
        Resource::Group(g) => {
            let g = validate_group(g)?.into_inner();
            check_native_groups(&state.store, &g).await?;
            serde_json::to_value(apply_result(state.store.apply(g, dry_run, by).await?, dry_run))
        }
        Resource::Host(_) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "Hosts register themselves; they cannot be applied",
            ));
        }
    };
    value.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Applies a program with `depends_on`, refusing one that would close a dependency cycle
/// through it. The check and the write are one decision: the write goes through only if no
/// program changed since the programs were read (two programs of a cycle applied at once
/// cannot both pass), and is tried again on a fresh read otherwise.
async fn apply_ordered(state: &AppState, p: Program, dry_run: bool, by: &Author) -> Result<Applied<Program>, ApiError> {
    let mut attempt = 0u32;
    loop {
        let (stored, read) = state.store.list_at::<Program>().await?;
        let mut graph: BTreeMap<String, Vec<String>> = stored
            .into_iter()
            .map(|o| (o.metadata.name, o.spec.depends_on.unwrap_or_default()))
            .collect();
        graph.insert(p.metadata.name.clone(), p.spec.depends_on.clone().unwrap_or_default());
        if let Some(cycle) = corral_proto::fleet::dependency_cycle_through(&graph, &p.metadata.name) {
            return Err(ValidationErrors {
                resource: format!("Program {:?}", p.metadata.name),
                errors: vec![corral_proto::FieldError {
                    path: "spec.depends_on".into(),
                    message: format!("{} is a cycle: none of them could ever start", cycle.join(" -> ")),
                }],
            }
            .into());
        }
        match state.store.apply_unchanged_since(p.clone(), dry_run, by, read).await {
            Err(StoreError::Conflict(_)) if attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(u64::from(attempt) * 5)).await;
            }
            other => return Ok(other?),
        }
    }
}

async fn apply_any(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Query(q): Query<DryRun>,
    Body(body): Body,
) -> ApiResult<serde_json::Value> {
    let r = parse_body(&body)?;
    Ok(Json(apply_resource(&state, r, q.dry_run, &by).await?))
}

async fn put_named(
    state: &AppState,
    by: &Author,
    kind: Kind,
    name: &str,
    dry_run: bool,
    body: &str,
) -> ApiResult<serde_json::Value> {
    let r = parse_body(body)?;
    if r.kind() != kind || r.metadata().name != name {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body is {} {:?}, the path names {kind} {name:?}",
                r.kind(),
                r.metadata().name
            ),
        ));
    }
    Ok(Json(apply_resource(state, r, dry_run, by).await?))
}

async fn put_program(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Name(name): Name,
    Query(q): Query<DryRun>,
    Body(body): Body,
) -> ApiResult<serde_json::Value> {
    put_named(&state, &by, Kind::Program, &name, q.dry_run, &body).await
}

async fn put_group(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Name(name): Name,
    Query(q): Query<DryRun>,
    Body(body): Body,
) -> ApiResult<serde_json::Value> {
    put_named(&state, &by, Kind::Group, &name, q.dry_run, &body).await
}

/// Fills each program's `status` from the agents' reports.
async fn with_status(store: &Store, programs: Vec<Program>) -> Result<Vec<Program>, ApiError> {
    let hosts = store.hosts().await?;
    let reports = store.reports().await?;
    with_status_from(store, programs, &hosts, &reports).await
}

/// Fills in each program's `status` from `reports` (at least those of its hosts).
async fn with_status_from(
    store: &Store,
    mut programs: Vec<Program>,
    hosts: &[Host],
    reports: &BTreeMap<(String, String), corral_proto::fleet::ProgramHostStatus>,
) -> Result<Vec<Program>, ApiError> {
    let paused = store.paused().await?;
    let rollouts = store.rollout_states().await?;
    let readiness = host_readiness(hosts, &store.alive().await?);
    for p in &mut programs {
        let assigned: BTreeSet<String> = hosts
            .iter()
            .filter(|h| {
                p.placed_on(
                    h,
                    reports.contains_key(&(h.metadata.name.clone(), p.metadata.name.clone())),
                )
            })
            .map(|h| h.metadata.name.clone())
            .collect();
        let mut view = program_status(p, &assigned, reports, &readiness);
        view.paused = paused.contains(&p.metadata.name);
        if let Some(r) = rollouts.get(&p.metadata.name) {
            view.last_good = r.last_good;
            view.reverted = r.reverted.clone();
        }
        p.status = Some(view);
    }
    Ok(programs)
}

async fn list_programs(State(state): State<AppState>) -> ApiResult<Vec<Program>> {
    let programs = state.store.list::<Program>().await?;
    Ok(Json(with_status(&state.store, programs).await?))
}

async fn get_one<T: Object>(store: &Store, name: &str) -> Result<T, ApiError> {
    store.get::<T>(name).await?.ok_or_else(|| {
        ApiError::from(StoreError::NotFound {
            kind: T::KIND,
            name: name.to_string(),
        })
    })
}

/// One program with its `status` filled in, from its own hosts' reports only (`rollout
/// status` and `apply --wait` ask every second: never every program's reports).
async fn program_with_status(store: &Store, name: &str) -> Result<Program, ApiError> {
    let p = get_one::<Program>(store, name).await?;
    let hosts = store.hosts().await?;
    let candidates: Vec<String> = placement_candidates(&p, &hosts)
        .into_iter()
        .map(|h| h.metadata.name.clone())
        .collect();
    let reports = store.reports_of(name, &candidates).await?;
    with_status_from(store, vec![p], &hosts, &reports)
        .await?
        .pop()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not found"))
}

async fn get_program(State(state): State<AppState>, Name(name): Name) -> ApiResult<Program> {
    Ok(Json(program_with_status(&state.store, &name).await?))
}

/// `POST /v1/programs/NAME/action`: start, stop, restart or signal, as one atomic change of
/// the stored spec (restart markers and signal ids are made here, once for every client).
async fn program_action(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Name(name): Name,
    Body(body): Body,
) -> ApiResult<ApplyResult<Program>> {
    let action: ProgramAction = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the action ({{\"action\": \"start|stop|restart|signal\", \"signal\": ...}}): {e}"),
        )
    })?;
    if let Some(paused) = action.control() {
        state.store.set_paused(&name, paused, &by).await?;
        return Ok(Json(ApplyResult {
            result: Outcome::Configured,
            dry_run: false,
            object: program_with_status(&state.store, &name).await?,
        }));
    }
    let marker = {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("{}.{:06}", d.as_secs(), d.subsec_micros())
    };
    let applied = state
        .store
        .update::<Program>(&name, &by, action.verb(), |p| action.apply_to(&mut p.spec, &marker))
        .await?;
    Ok(Json(apply_result(applied, false)))
}

/// `GET /v1/programs/NAME/revisions`: the kept generations, newest first.
async fn program_revisions(
    State(state): State<AppState>,
    Name(name): Name,
) -> ApiResult<Vec<corral_proto::api::Revision>> {
    get_one::<Program>(&state.store, &name).await?;
    Ok(Json(state.store.revisions(&name).await?))
}

/// `POST /v1/programs/NAME/logs` (`LogsQuery` -> `Logs`): the logs of the program's
/// processes on each host it is assigned to (or on `host`), read by their agents.
async fn program_logs(
    State(state): State<AppState>,
    Name(name): Name,
    Body(body): Body,
) -> ApiResult<corral_proto::logs::Logs> {
    let query: corral_proto::logs::LogsQuery = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the logs query ({{\"bytes\": N, \"stream\": \"stdout|stderr\", \"host\": ...}}): {e}"),
        )
    })?;
    query
        .check()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    // Hosts and liveness leases only (a key per host): `logs -f` asks every second, and
    // reading every host's reports for it would cost as much as `get programs` each time.
    let p = get_one::<Program>(&state.store, &name).await?;
    let hosts = state.store.hosts().await?;
    let alive = state.store.alive().await?;
    let cordoned: Vec<String> = placement_candidates(&p, &hosts)
        .into_iter()
        .filter(|h| h.spec.cordoned)
        .map(|h| h.metadata.name.clone())
        .collect();
    let holding: BTreeSet<String> = state
        .store
        .reports_of(&name, &cordoned)
        .await?
        .into_keys()
        .map(|(h, _)| h)
        .collect();
    let targets = log_hosts(&p, &hosts, &holding, &alive, query.host.as_deref());
    if let (Some(h), true) = (&query.host, targets.is_empty()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("program {name:?} is not assigned to host {h:?}"),
        ));
    }
    let mut logs = state.store.logs(&name, &targets.ask, &query).await?;
    for h in targets.away {
        logs.errors.insert(h, AGENT_AWAY_FOR_LOGS.to_string());
    }
    Ok(Json(logs))
}

/// `POST /v1/programs/NAME/rollback`: a kept revision's spec applied again as a new
/// generation (the one before the current by default), validated and checked against the
/// policy as any apply; restart and signal markers stay as they are, so an undo restarts
/// only what its spec changes.
async fn program_rollback(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Name(name): Name,
    Body(body): Body,
) -> ApiResult<ApplyResult<Program>> {
    let want: corral_proto::api::Rollback = if body.trim().is_empty() {
        corral_proto::api::Rollback::default()
    } else {
        serde_json::from_str(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the rollback ({{\"generation\": N}}): {e}"),
            )
        })?
    };
    let current = get_one::<Program>(&state.store, &name).await?;
    let revisions = state.store.revisions(&name).await?;
    let kept = || {
        revisions
            .iter()
            .map(|r| r.generation.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let target = match want.generation {
        Some(g) => revisions.iter().find(|r| r.generation == g).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("program {name:?} has no revision {g} (kept: {})", kept()),
            )
        })?,
        None => revisions
            .iter()
            .find(|r| r.generation < current.metadata.generation)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "program {name:?} has no revision before {} to go back to",
                        current.metadata.generation
                    ),
                )
            })?,
    };
    let next = validate_program(target.applied_to(&current))?.into_inner();
    let refused = state.policy.check(&next.spec);
    if !refused.is_empty() {
        return Err(ValidationErrors {
            resource: format!("Program {name:?}"),
            errors: refused,
        }
        .into());
    }
    let applied = state.store.apply_as(next, &by, "undo").await?;
    Ok(Json(apply_result(applied, false)))
}

async fn delete_program(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Name(name): Name,
    Query(q): Query<DryRun>,
) -> ApiResult<Deleted> {
    state.store.delete::<Program>(&name, q.dry_run, &by).await?;
    Ok(Json(Deleted {
        kind: Kind::Program,
        name,
        dry_run: q.dry_run,
    }))
}

async fn list_groups(State(state): State<AppState>) -> ApiResult<Vec<Group>> {
    Ok(Json(state.store.list::<Group>().await?))
}

async fn get_group(State(state): State<AppState>, Name(name): Name) -> ApiResult<Group> {
    Ok(Json(get_one::<Group>(&state.store, &name).await?))
}

async fn delete_group(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    Name(name): Name,
    Query(q): Query<DryRun>,
) -> ApiResult<Deleted> {
    state.store.delete::<Group>(&name, q.dry_run, &by).await?;
    Ok(Json(Deleted {
        kind: Kind::Group,
        name,
        dry_run: q.dry_run,
    }))
}

/// The host as `GET /v1/hosts` shows it (readiness filled in).
async fn host_view(store: &Store, host: Host) -> Result<Host, ApiError> {
    let mut hosts = [host];
    with_readiness(store, &mut hosts).await?;
    let [host] = hosts;
    Ok(host)
}

/// Fills each host's readiness and its reason.
async fn with_readiness(store: &Store, hosts: &mut [Host]) -> Result<(), ApiError> {
    let readiness = host_readiness(hosts, &store.alive().await?);
    for h in hosts {
        let status = h.status.get_or_insert_with(Default::default);
        let why = readiness.get(&h.metadata.name).cloned().flatten();
        status.ready = why.is_none();
        status.reason = why;
    }
    Ok(())
}

/// `POST /v1/hosts/NAME/action`: cordon, uncordon or drain (operators).
async fn host_action(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    HostName(name): HostName,
    Body(body): Body,
) -> ApiResult<Host> {
    let action: corral_proto::api::HostAction = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the action ({{\"action\": \"cordon|uncordon|drain\"}}): {e}"),
        )
    })?;
    let host = state
        .store
        .update_host(&name, &by, action.verb(), |c| action.apply_to(c))
        .await?;
    Ok(Json(host_view(&state.store, host).await?))
}

/// `PUT /v1/hosts/NAME/labels`: sets (a value) or removes (null) labels over what the agent
/// registered (admins: labels place programs).
async fn host_labels(
    State(state): State<AppState>,
    Extension(by): Extension<Author>,
    HostName(name): HostName,
    Body(body): Body,
) -> ApiResult<Host> {
    let changes: corral_proto::api::LabelChanges = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the labels ({{\"key\": \"value\" or null to remove}}): {e}"),
        )
    })?;
    corral_proto::validate::validate_label_changes(&name, &changes)?;
    let host = state
        .store
        .update_host(&name, &by, "label", |c| c.relabel(&changes))
        .await?;
    Ok(Json(host_view(&state.store, host).await?))
}

async fn list_hosts(State(state): State<AppState>) -> ApiResult<Vec<Host>> {
    let mut hosts = state.store.hosts().await?;
    with_readiness(&state.store, &mut hosts).await?;
    Ok(Json(hosts))
}

/// `GET /v1/history?kind=program&name=NAME&limit=N`.
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    kind: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
}

/// Who changed what, newest first (the last 50 unless `limit` says otherwise).
async fn history(State(state): State<AppState>, Query(q): Query<HistoryQuery>) -> ApiResult<Vec<AuditEntry>> {
    let kind = match q.kind.as_deref() {
        None => None,
        Some("program") => Some(Kind::Program),
        Some("group") => Some(Kind::Group),
        Some("host") => Some(Kind::Host),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("kind {other:?}: program, group or host"),
            ));
        }
    };
    if let Some(name) = &q.name {
        let check = match kind {
            Some(Kind::Host) => corral_proto::validate::check_host_name,
            _ => corral_proto::validate::check_name,
        };
        check(name).map_err(|why| ApiError {
            status: StatusCode::BAD_REQUEST,
            message: "invalid name".to_string(),
            details: vec![format!("name: {why}")],
        })?;
    }
    let limit = q.limit.unwrap_or(50).clamp(1, crate::store::AUDIT_KEEP);
    Ok(Json(state.store.history(kind, q.name.as_deref(), limit).await?))
}

async fn status(State(state): State<AppState>) -> ApiResult<FleetStatus> {
    Ok(Json(fleet(&state.store, &state.policy).await?.0))
}

/// The fleet summary, and the registered host names.
async fn fleet(store: &Store, policy: &crate::policy::Policy) -> Result<(FleetStatus, BTreeSet<String>), ApiError> {
    let programs: Vec<Program> = store.list().await?;
    let hosts = store.hosts().await?;
    let readiness = host_readiness(&hosts, &store.alive().await?);
    let reports = store.reports().await?;
    let mut assigned: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in &programs {
        assigned.insert(
            p.metadata.name.clone(),
            hosts
                .iter()
                .filter(|h| {
                    p.placed_on(
                        h,
                        reports.contains_key(&(h.metadata.name.clone(), p.metadata.name.clone())),
                    )
                })
                .map(|h| h.metadata.name.clone())
                .collect(),
        );
    }
    let names = hosts.iter().map(|h| h.metadata.name.clone()).collect();
    let unschedulable = hosts
        .iter()
        .filter(|h| h.spec.cordoned || h.spec.drained)
        .map(|h| {
            let how = if h.spec.drained { "drained" } else { "cordoned" };
            (h.metadata.name.clone(), how.to_string())
        })
        .collect();
    let mut status = fleet_status(&programs, &assigned, &reports, &readiness);
    status.unschedulable = unschedulable;
    let paused = store.paused().await?;
    for p in &mut status.programs {
        p.paused = paused.contains(&p.name);
    }
    // What the leader could not do, and what this replica could not read itself.
    let mut health = store.health().await?;
    health.unreadable.extend(store.unreadable());
    status.control_plane = health.problems();
    let groups: Vec<Group> = store.list().await?;
    let known = programs.iter().map(|p| p.metadata.name.clone()).collect();
    status.warnings = corral_proto::fleet::runs_nowhere(&programs, &hosts);
    status
        .warnings
        .extend(corral_proto::fleet::missing_members(&groups, &known));
    status
        .warnings
        .extend(corral_proto::fleet::missing_dependencies(&programs));
    // Stored before the policy (or a stricter one) came in: still placed, but said.
    for p in &programs {
        for e in policy.check(&p.spec) {
            status
                .warnings
                .push(format!("program {} breaks the policy: {e}", p.metadata.name));
        }
    }
    Ok((status, names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn reading_and_dry_runs_are_for_everyone_actions_for_operators_writes_for_admins() {
        for (method, path, dry_run, role) in [
            (Method::GET, "/v1/programs", false, Role::ReadOnly),
            (Method::GET, "/v1/history", false, Role::ReadOnly),
            (Method::POST, "/v1/programs", true, Role::ReadOnly),
            (Method::PUT, "/v1/groups/g", true, Role::ReadOnly),
            (Method::DELETE, "/v1/programs/web", true, Role::ReadOnly),
            (Method::POST, "/v1/programs/web/action", false, Role::Operator),
            (Method::POST, "/v1/programs/web/action", true, Role::Operator),
            (Method::POST, "/v1/programs", false, Role::Admin),
            (Method::PUT, "/v1/programs/web", false, Role::Admin),
            (Method::DELETE, "/v1/programs/web", false, Role::Admin),
            (Method::DELETE, "/v1/groups/action", false, Role::Admin),
            (Method::POST, "/v1/hosts/h1/action", false, Role::Operator),
            (Method::PUT, "/v1/hosts/h1/labels", false, Role::Admin),
            (Method::PUT, "/v1/hosts/h1/labels", true, Role::Admin),
            (Method::POST, "/programs", true, Role::ReadOnly),
            (Method::PUT, "/hosts/h1/labels", true, Role::Admin),
            (Method::POST, "/programs/web/action", true, Role::Operator),
            (Method::POST, "/programs/web/rollback", false, Role::Operator),
            (Method::GET, "/programs/web/revisions", false, Role::ReadOnly),
        ] {
            assert_eq!(
                needed_role(&method, path, dry_run),
                role,
                "{method} {path} dry_run={dry_run}"
            );
        }
        for (path, what) in [
            ("/hosts/h1/labels", "label hosts"),
            ("/v1/hosts/h1/action", "cordon, uncordon or drain hosts"),
            ("/programs/web/rollback", "undo rollouts"),
            (
                "/programs/web/action",
                "start, stop, restart, signal, pause or resume programs",
            ),
            ("/programs", "apply or delete specs"),
        ] {
            assert_eq!(refused_what(path), what);
        }
    }
}
