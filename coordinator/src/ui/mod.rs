//! The run browser: a JSON API over a cluster's runs and flows, their events
//! live as server-sent events, and a page that shows them (`orchestrix ui`).
//!
//! It is a client of the cluster like any other (it asks coordinators over
//! NATS, reads the flow registry, listens to run events), so it can run
//! anywhere, as often as wanted, and holds no state of its own.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the list of runs (filter by status and flow, newest first, live) |
//! | `GET /runs/{id}` | one run: its steps, attempts, errors, rollback, operator actions, live |
//! | `GET /api/runs?status=&flow=&limit=&cursor=` | `{runs, nextCursor}`: a page of reports |
//! | `GET /api/runs/{id}` | `{run, traceUrl}`: the run's report |
//! | `GET /api/flows` | every registered version of every flow, with its workers |
//! | `GET /api/events[?run=ID]` | run events as server-sent events (`event: run`, JSON data) |
//! | `POST /api/runs/{id}/{cancel,resume,rollback}` | operator actions, only with `--allow-actions` |
//!
//! It listens on loopback unless told otherwise; on any other address it
//! requires a bearer token (`Authorization: Bearer …`, or `?token=` once
//! in a browser, which then keeps it in a cookie).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use orchestrix_client::{Client, ClientError, Rejection};
use orchestrix_proto::{ListFilter, RunId, RunStatus};
use orchestrix_worker::registry::Registry;
use serde::Deserialize;
use serde_json::json;

/// The port `orchestrix ui` listens on by default (on 127.0.0.1).
pub const DEFAULT_PORT: u16 = 8233;

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// How the run browser serves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct UiOptions {
    /// Where to listen (default `127.0.0.1:8233`).
    pub listen: SocketAddr,
    /// The bearer token every request must carry; required when `listen` is
    /// not a loopback address.
    pub token: Option<String>,
    /// Whether `POST /api/runs/{id}/{action}` is served (off by default: a
    /// browser is then a read-only window).
    pub allow_actions: bool,
    /// A link to each run's trace, `{run_id}` replaced (e.g. a Jaeger search
    /// by the `orchestrix.run_id` tag).
    pub trace_url: Option<String>,
}

impl Default for UiOptions {
    fn default() -> Self {
        UiOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            token: None,
            allow_actions: false,
            trace_url: None,
        }
    }
}

impl UiOptions {
    /// Listen here.
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The checks [`serve`] makes before it listens: a token long enough,
    /// and one at all for an address beyond loopback. For a caller that
    /// wants to refuse bad options before it starts anything else.
    pub fn check(&self) -> Result<(), UiError> {
        if self.token.as_deref().is_some_and(|t| t.trim().len() < MIN_TOKEN_LEN) {
            return Err(UiError::WeakToken);
        }
        if !self.listen.ip().is_loopback() && self.token.is_none() {
            return Err(UiError::TokenRequired(self.listen));
        }
        Ok(())
    }

    /// Require this bearer token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Serve operator actions.
    #[must_use]
    pub fn allow_actions(mut self, allow: bool) -> Self {
        self.allow_actions = allow;
        self
    }

    /// Link runs to their traces with this template (`{run_id}`).
    #[must_use]
    pub fn trace_url(mut self, template: impl Into<String>) -> Self {
        self.trace_url = Some(template.into());
        self
    }
}

/// The run browser could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UiError {
    /// Listening beyond loopback without a token would show every run's
    /// input and errors to anyone who can reach the port.
    #[error(
        "{0} is not a loopback address: give the browser a token to listen there (ORCHESTRIX_UI_TOKEN, `orchestrix ui --token` or `orchestrix serve --http-token`)"
    )]
    TokenRequired(SocketAddr),
    /// A short token is guessed.
    #[error(
        "the token is too short: use at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 16`)"
    )]
    WeakToken,
    /// The address cannot be listened on.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running run browser.
#[derive(Debug)]
pub struct UiServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl UiServer {
    /// Where it listens (with the port chosen, if 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs until the server stops (it only stops on an I/O error).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for UiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Ui {
    client: Client,
    registry: Option<Registry>,
    options: UiOptions,
    journal: std::sync::Mutex<Journal>,
}

/// The events this browser has seen, per run, for the runs' timelines (a
/// run's report has its steps' outcomes, not each attempt's): the newest
/// `JOURNAL_RUNS` runs, since the browser started.
#[derive(Default)]
struct Journal {
    runs: std::collections::HashMap<RunId, Vec<serde_json::Value>>,
    order: std::collections::VecDeque<RunId>,
}

const JOURNAL_RUNS: usize = 2_000;
/// More events than any sane run has: a runaway run cannot fill memory.
const JOURNAL_EVENTS_PER_RUN: usize = 1_000;

impl Journal {
    fn note(&mut self, ev: &orchestrix_proto::RunEvent) {
        let id = RunId::from(ev.run_id);
        let line = json!({ "atMs": ev.at_ms, "text": crate::nats::describe(&ev.event) });
        if !self.runs.contains_key(&id) {
            if self.order.len() >= JOURNAL_RUNS
                && let Some(old) = self.order.pop_front()
            {
                self.runs.remove(&old);
            }
            self.order.push_back(id);
        }
        let lines = self.runs.entry(id).or_default();
        if lines.len() < JOURNAL_EVENTS_PER_RUN {
            lines.push(line);
        }
    }
}

/// Serves the run browser for the cluster `client` talks to; `registry`
/// (the cluster's flow registry, if it has one) answers `/api/flows`.
pub async fn serve(
    client: Client,
    registry: Option<Registry>,
    options: UiOptions,
) -> Result<UiServer, UiError> {
    options.check()?;
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| UiError::Listen { addr: options.listen, source })?;
    let addr =
        listener.local_addr().map_err(|source| UiError::Listen { addr: options.listen, source })?;
    // Listening before serving: an event of a run shown later is not missed.
    let events = client.watch_all().await.ok();
    let ui = Arc::new(Ui { client, registry, options, journal: Default::default() });
    let app = router(ui.clone());
    let task = tokio::spawn(async move {
        let journal = async {
            if let Some(mut events) = events.map(|e| e.boxed()) {
                while let Some(ev) = events.next().await {
                    ui.journal.lock().unwrap_or_else(|p| p.into_inner()).note(&ev);
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            served = axum::serve(listener, app) => if let Err(e) = served {
                tracing::error!(error = %e, "the run browser stopped");
            },
            () = journal => {}
        }
    });
    Ok(UiServer { addr, task })
}

fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(page_list))
        .route("/runs/{id}", get(page_run))
        .route("/assets/app.js", get(asset_js))
        .route("/assets/style.css", get(asset_css))
        .route("/api/runs", get(api_runs))
        .route("/api/runs/{id}", get(api_run))
        .route("/api/runs/{id}/{action}", post(api_action))
        .route("/api/flows", get(api_flows))
        .route("/api/events", get(api_events))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(ui.clone(), guard))
        .with_state(ui)
}

/// The token check, and headers every answer carries.
async fn guard(State(ui): State<Arc<Ui>>, req: Request, next: Next) -> Response {
    let h = req.headers();
    // Without a token, loopback is the only protection: a page elsewhere
    // must not reach it through a name that resolves to 127.0.0.1 (DNS
    // rebinding), so the Host must be a loopback one.
    if ui.options.token.is_none() && !h.get(header::HOST).is_some_and(loopback_host) {
        return error(StatusCode::FORBIDDEN, "forbidden", "this host name is not served");
    }
    // Actions only from this browser's own pages, as JSON: another site's
    // form or script cannot send them (no CORS is ever granted).
    if req.method() == axum::http::Method::POST {
        let json_body = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let same_origin = match h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            None => true,
            Some(origin) => {
                let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
                origin.split_once("://").is_some_and(|(_, o)| o == host)
            }
        };
        if !json_body || !same_origin {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "actions are taken from this browser's pages, as JSON, only",
            );
        }
    }
    let mut set_cookie = None;
    if let Some(token) = ui.options.token.as_deref() {
        let given = bearer(h).or_else(|| cookie(h, "orchestrix_token")).map(str::to_owned);
        let from_query = req.uri().query().and_then(|q| query_param(q, "token"));
        let ok = given.as_deref().is_some_and(|g| same_secret(g, token))
            || from_query.as_deref().is_some_and(|q| same_secret(q, token));
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "a bearer token is required", "kind": "unauthorized" })),
            )
                .into_response();
        }
        if from_query.is_some() {
            // Lax: a link followed from elsewhere opens the page; actions
            // are guarded by the origin check above.
            let cookie = format!("orchestrix_token={token}; Path=/; HttpOnly; SameSite=Lax");
            // A page opened with the token in its URL is sent on without
            // it, so it leaves the address bar and the history.
            if req.method() == axum::http::Method::GET && !req.uri().path().starts_with("/api/") {
                let path = req.uri().path().to_owned();
                let mut res = axum::response::Redirect::to(&path).into_response();
                if let Ok(c) = HeaderValue::from_str(&cookie) {
                    res.headers_mut().insert(header::SET_COOKIE, c);
                }
                return res;
            }
            set_cookie = Some(cookie);
        }
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    // Pages run only their own script, and are never framed elsewhere.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, c);
    }
    res
}

/// Whether a Host header names this machine (`127.0.0.1`, `[::1]`,
/// `localhost`, with any port).
fn loopback_host(v: &HeaderValue) -> bool {
    let Ok(host) = v.to_str() else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(given: &str, token: &str) -> bool {
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

const PAGE: &str = include_str!("page.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// The same page shell for every view: the script renders the view its
/// path names, with text only (never markup from the data).
fn page(title: &str, view: &str) -> Response {
    let html = PAGE.replace("{{title}}", title).replace("{{view}}", view);
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such page or route")
}

async fn page_list() -> Response {
    page("Runs", "list")
}

async fn page_run() -> Response {
    page("Run", "run")
}

async fn asset_js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS).into_response()
}

async fn asset_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS).into_response()
}

/// A JSON error with a kind a script can branch on.
fn error(status: StatusCode, kind: &str, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string(), "kind": kind }))).into_response()
}

fn client_error(e: ClientError) -> Response {
    let status = match e.rejection() {
        Some(Rejection::UnknownRun | Rejection::UnknownFlow | Rejection::UnknownVersion) => {
            StatusCode::NOT_FOUND
        }
        Some(Rejection::BadRequest | Rejection::BadInput) => StatusCode::BAD_REQUEST,
        Some(Rejection::Refused) => StatusCode::CONFLICT,
        _ => match e {
            ClientError::NoCoordinator { .. } | ClientError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_GATEWAY,
        },
    };
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::CONFLICT => "refused",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "error",
    };
    error(status, kind, e)
}

/// A run id from a path or query that is not one.
struct BadId(orchestrix_proto::IdError);

impl IntoResponse for BadId {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, "bad_request", self.0)
    }
}

fn run_id(text: &str) -> Result<RunId, BadId> {
    text.parse().map_err(BadId)
}

type Params = Query<std::collections::HashMap<String, String>>;

async fn api_runs(State(ui): State<Arc<Ui>>, Query(q): Params) -> Response {
    let status = match q.get("status").map(String::as_str).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<RunStatus>() {
            Ok(s) => Some(s),
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e),
        },
    };
    let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if (1..=500).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "limit is a number from 1 to 500",
            );
        }
    };
    let flow = q.get("flow").filter(|f| !f.is_empty()).cloned();
    let mut filter = ListFilter::new(status, flow, limit);
    if let Some(c) = q.get("cursor").filter(|c| !c.is_empty()) {
        match run_id(c) {
            Ok(id) => filter = filter.before(id),
            Err(r) => return r.into_response(),
        }
    }
    match ui.client.list(filter).await {
        Ok(runs) => {
            let next = (runs.len() == limit).then(|| runs.last().map(|r| r.run_id)).flatten();
            Json(json!({ "runs": runs, "nextCursor": next })).into_response()
        }
        Err(e) => client_error(e),
    }
}

async fn api_run(State(ui): State<Arc<Ui>>, Path(id): Path<String>) -> Response {
    let id = match run_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match ui.client.status(id).await {
        Ok(run) => {
            let trace =
                ui.options.trace_url.as_ref().map(|t| t.replace("{run_id}", &id.to_string()));
            let events = ui
                .journal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .runs
                .get(&id)
                .cloned()
                .unwrap_or_default();
            Json(json!({
                "run": run,
                "events": events,
                "traceUrl": trace,
                "actions": ui.options.allow_actions,
            }))
            .into_response()
        }
        Err(e) => client_error(e),
    }
}

#[derive(Deserialize, Default)]
struct ActionBody {
    by: Option<String>,
    reason: Option<String>,
}

async fn api_action(
    State(ui): State<Arc<Ui>>,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Response {
    if !ui.options.allow_actions {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "operator actions are off (`orchestrix ui --allow-actions`, or `orchestrix serve --http-allow-actions`)",
        );
    }
    let id = match run_id(&id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let body: ActionBody = if body.is_empty() {
        ActionBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                let why = format!("the body is not {{\"by\", \"reason\"}} JSON: {e}");
                return error(StatusCode::BAD_REQUEST, "bad_request", why);
            }
        }
    };
    let by = body.by.filter(|b| !b.trim().is_empty()).unwrap_or_else(|| "ui".to_owned());
    let done = match action.as_str() {
        "cancel" => ui.client.cancel(id, &by, body.reason.as_deref()).await,
        "resume" => ui.client.resume(id, &by).await,
        "rollback" => ui.client.rollback(id, &by).await,
        other => {
            let why = format!("no action `{other}` (cancel, resume, rollback)");
            return error(StatusCode::NOT_FOUND, "not_found", why);
        }
    };
    match done {
        Ok(()) => Json(json!({ "ok": true })).into_response(),
        Err(e) => client_error(e),
    }
}

async fn api_flows(State(ui): State<Arc<Ui>>) -> Response {
    let Some(registry) = &ui.registry else {
        return Json(json!({ "flows": [] })).into_response();
    };
    match crate::listing::flow_versions(registry).await {
        Ok(flows) => {
            let flows = crate::nats::camel_case(serde_json::to_value(flows).unwrap_or_default());
            Json(json!({ "flows": flows })).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e),
    }
}

async fn api_events(State(ui): State<Arc<Ui>>, Query(q): Params) -> Response {
    let events = match q.get("run").map(String::as_str).filter(|r| !r.is_empty()) {
        Some(r) => match run_id(r) {
            Ok(id) => ui.client.watch(id).await.map(|s| s.boxed()),
            Err(r) => return r.into_response(),
        },
        None => ui.client.watch_all().await.map(|s| s.boxed()),
    };
    let events = match events {
        Ok(s) => s,
        Err(e) => return client_error(e),
    };
    let stream = events.map(|ev| {
        let data = crate::nats::event_json(&ev).to_string();
        Ok::<_, std::convert::Infallible>(Event::default().event("run").data(data))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}
