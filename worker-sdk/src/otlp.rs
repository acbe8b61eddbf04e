//! OTLP/HTTP span export with the protobuf written straight from the SDK's
//! span data.
//!
//! `opentelemetry-otlp` first converts every span into the generated
//! protobuf structs (a `String` for every attribute key and string value,
//! a `Vec` for every id) and then encodes them with `prost`, which sizes
//! each nested message again at every level above it. Profiled in the saga
//! bench, that was about a quarter of a traced process's instructions:
//! 13,000 – 18,000 a span. Here a span is sized and written in place, with
//! no allocation but the request body, and the resource is encoded once.
//! The bytes decode to exactly what the SDK's exporter sends (a test
//! decodes both and compares).
//!
//! Only plain OTLP/HTTP with protobuf bodies takes this path: gRPC, JSON,
//! compression, TLS and client certificates stay with `opentelemetry-otlp`
//! (see [`Plain::from_env`]), and `ORCHESTRIX_OTLP_EXPORTER=sdk` sends
//! everything there.

use std::borrow::Cow;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};

/// Default endpoint of OTLP/HTTP traces.
const DEFAULT_ENDPOINT: &str = "http://localhost:4318/v1/traces";
/// Default export timeout (the OTLP exporter specification's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of an export the collector asked to be sent again, or that did
/// not reach it.
const RETRIES: u32 = 3;

/// Who sends the spans (the OTLP exporter specification asks for one).
const AGENT: &str = concat!("orchestrix-otlp/", env!("CARGO_PKG_VERSION"));

/// Longest wait a collector's `Retry-After` may ask for (what
/// `opentelemetry-otlp` allows too); the export's timeout bounds it anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Where and how the spans go.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Plain {
    pub(crate) endpoint: String,
    /// Valid headers only, each name once (the last value given wins).
    pub(crate) headers: HeaderMap,
    pub(crate) timeout: Duration,
}

impl Plain {
    /// The export the `OTEL_EXPORTER_OTLP_*` variables describe (`endpoint`:
    /// the full traces URL given in code, which wins), when it is one this
    /// exporter sends. `None`: the SDK's exporter is used.
    pub(crate) fn from_env(endpoint: Option<&str>) -> Option<Plain> {
        Plain::from_vars(endpoint, |name| std::env::var(name).ok())
    }

    /// The same, from `var` rather than the process's environment: HTTP
    /// with protobuf bodies, uncompressed, no TLS, unless
    /// `ORCHESTRIX_OTLP_EXPORTER=sdk`.
    pub(crate) fn from_vars(
        endpoint: Option<&str>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Option<Plain> {
        let var = |name: &str| var(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        // The signal's variable, else the generic one.
        let traces_var = |suffix: &str| {
            var(&format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"))
                .or_else(|| var(&format!("OTEL_EXPORTER_OTLP_{suffix}")))
        };
        if var("ORCHESTRIX_OTLP_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("sdk")) {
            return None;
        }
        if endpoint.is_none() && traces_var("PROTOCOL").as_deref() != Some("http/protobuf") {
            return None;
        }
        let elsewhere = ["COMPRESSION", "CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"];
        if elsewhere.iter().any(|v| traces_var(v).is_some()) {
            return None;
        }
        let endpoint = match endpoint {
            Some(e) => e.to_owned(),
            None => match (
                var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
                var("OTEL_EXPORTER_OTLP_ENDPOINT"),
            ) {
                (Some(e), _) => e,
                (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
                (None, None) => DEFAULT_ENDPOINT.to_owned(),
            },
        };
        if !endpoint.starts_with("http://") {
            return None;
        }
        let headers = traces_var("HEADERS").map(|h| headers(&h)).unwrap_or_default();
        Some(Plain { endpoint, headers, timeout: timeout("TRACES", var) })
    }
}

/// The export timeout of `signal` (`TRACES`, `METRICS`) the variables give:
/// `OTEL_EXPORTER_OTLP_{signal}_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT`,
/// else 10 s, as `opentelemetry-otlp` reads them, except that 0 counts as
/// unset (as does a value that does not parse): taken literally it fails
/// every export before it is sent. Given to the SDK's exporters too, so
/// that every export reads the variables alike.
pub(crate) fn timeout(signal: &str, var: impl Fn(&str) -> Option<String>) -> Duration {
    let millis = |name: &str| var(name)?.trim().parse::<u64>().ok().filter(|&t| t > 0);
    millis(&format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT"))
        .or_else(|| millis("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis)
}

/// `key=value,key2=value2`, values percent-decoded. Pairs that are not
/// valid headers, or have no value, are left out (as `opentelemetry-otlp`
/// leaves them out): one bad pair must not fail every export.
fn headers(text: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    for pair in text.split(',') {
        let Some((k, v)) = pair.split_once('=') else { continue };
        let value = percent_decode(v.trim());
        if value.is_empty() {
            continue;
        }
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.trim()), HeaderValue::try_from(value)) {
            map.insert(k, v);
        }
    }
    map
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The span exporter.
#[derive(Debug)]
pub(crate) struct HttpExporter {
    plain: Plain,
    client: reqwest::blocking::Client,
    /// The resource, as the `resource` field of a `ResourceSpans`.
    resource: Vec<u8>,
    resource_schema: String,
}

impl HttpExporter {
    pub(crate) fn new(plain: Plain) -> Result<Self, String> {
        // Built on a thread of its own: the blocking client starts (and its
        // builder drops) a runtime, which must not happen on a thread that
        // runs async code, as `init` callers' do.
        let timeout = plain.timeout;
        let client = std::thread::spawn(move || {
            reqwest::blocking::Client::builder().timeout(timeout).build()
        })
        .join()
        .map_err(|_| "the HTTP client could not be made".to_owned())?
        .map_err(|e| format!("cannot make the HTTP client: {e}"))?;
        let mut exporter =
            HttpExporter { plain, client, resource: Vec::new(), resource_schema: String::new() };
        exporter.set_resource(&Resource::builder_empty().build());
        Ok(exporter)
    }

    /// Posts one request body, trying again (with backoff) when the
    /// collector says it is busy or cannot be reached. The whole export,
    /// tries and waits, ends within the timeout.
    fn post(&self, body: Vec<u8>) -> OTelSdkResult {
        // Shared by the tries rather than copied for each.
        let body = bytes::Bytes::from(body);
        let give_up = Instant::now() + self.plain.timeout;
        let mut pause = Duration::from_millis(100);
        let mut headers = self.plain.headers.clone();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        headers.entry(USER_AGENT).or_insert(HeaderValue::from_static(AGENT));
        let gave_up = || {
            OTelSdkError::InternalFailure(format!(
                "no collector at {} took the spans within {:?}",
                self.plain.endpoint, self.plain.timeout
            ))
        };
        for attempt in 0..=RETRIES {
            let left = give_up.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(gave_up());
            }
            let sent = self
                .client
                .post(&self.plain.endpoint)
                .headers(headers.clone())
                .timeout(left)
                .body(body.clone())
                .send();
            let asked_wait = match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if matches!(r.status().as_u16(), 429 | 502 | 503 | 504) => {
                    if attempt == RETRIES {
                        return Err(OTelSdkError::InternalFailure(format!(
                            "the collector answered {} to every try",
                            r.status()
                        )));
                    }
                    r.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
                }
                Ok(r) => {
                    return Err(OTelSdkError::InternalFailure(format!(
                        "the collector refused the spans: {}",
                        r.status()
                    )));
                }
                Err(e) if attempt == RETRIES => {
                    return Err(OTelSdkError::InternalFailure(format!(
                        "cannot send the spans to {}: {e}",
                        self.plain.endpoint
                    )));
                }
                Err(_) => None,
            };
            let wait = asked_wait.unwrap_or(pause);
            if wait >= give_up.saturating_duration_since(Instant::now()) {
                return Err(gave_up());
            }
            std::thread::sleep(wait);
            pause *= 2;
        }
        Ok(())
    }
}

impl SpanExporter for HttpExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        self.post(request(&batch, &self.resource, &self.resource_schema))
    }

    fn set_resource(&mut self, resource: &Resource) {
        let attributes: Vec<KeyValue> =
            resource.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())).collect();
        let mut w = Writer(Vec::new());
        w.message(1, attributes_len(1, &attributes));
        w.attributes(1, &attributes);
        self.resource = w.0;
        self.resource_schema = resource.schema_url().unwrap_or_default().to_owned();
    }
}

/// An `ExportTraceServiceRequest` holding `spans`, grouped by scope in the
/// order scopes first appear. `resource`: the encoded `resource` field.
pub(crate) fn request(spans: &[SpanData], resource: &[u8], resource_schema: &str) -> Vec<u8> {
    let mut scopes: Vec<(&InstrumentationScope, Vec<&SpanData>)> = Vec::new();
    for s in spans {
        match scopes.iter_mut().find(|(scope, _)| **scope == s.instrumentation_scope) {
            Some((_, list)) => list.push(s),
            None => scopes.push((&s.instrumentation_scope, vec![s])),
        }
    }
    let scope_lens: Vec<(usize, Vec<usize>)> = scopes
        .iter()
        .map(|(scope, list)| {
            let spans: Vec<usize> = list.iter().map(|s| span_len(s)).collect();
            (scope_spans_len(scope, &spans), spans)
        })
        .collect();
    let resource_spans = resource.len()
        + scope_lens.iter().map(|(len, _)| delimited(2, *len)).sum::<usize>()
        + string_len(3, resource_schema);
    let mut w = Writer(Vec::with_capacity(delimited(1, resource_spans)));
    w.message(1, resource_spans);
    w.0.extend_from_slice(resource);
    for ((scope, list), (len, lens)) in scopes.iter().zip(&scope_lens) {
        w.message(2, *len);
        w.message(1, scope_len(scope));
        w.string(1, scope.name());
        w.string(2, scope.version().unwrap_or_default());
        w.attributes(3, scope.attributes());
        for (s, len) in list.iter().zip(lens) {
            w.message(2, *len);
            w.span(s);
        }
        w.string(3, scope.schema_url().unwrap_or_default());
    }
    w.string(3, resource_schema);
    w.0
}

// Sizes, in bytes, of what the writer below writes.

#[inline(always)]
fn varint_len(v: u64) -> usize {
    // Tags and most lengths take one byte; no arithmetic for those.
    if v < 0x80 { 1 } else { (64 - (v | 1).leading_zeros() as usize).div_ceil(7) }
}

#[inline(always)]
fn tag_len(field: u32) -> usize {
    varint_len(u64::from(field) << 3)
}

/// A length-delimited field of `len` bytes.
#[inline(always)]
fn delimited(field: u32, len: usize) -> usize {
    tag_len(field) + varint_len(len as u64) + len
}

/// A string field (proto3: left out when empty).
#[inline(always)]
fn string_len(field: u32, s: &str) -> usize {
    if s.is_empty() { 0 } else { delimited(field, s.len()) }
}

fn uint_len(field: u32, v: u64) -> usize {
    if v == 0 { 0 } else { tag_len(field) + varint_len(v) }
}

fn fixed64_len(field: u32, v: u64) -> usize {
    if v == 0 { 0 } else { tag_len(field) + 8 }
}

fn fixed32_len(field: u32, v: u32) -> usize {
    if v == 0 { 0 } else { tag_len(field) + 4 }
}

/// An `AnyValue` (a oneof: written whatever its value). Inlined, arrays
/// aside: it runs for every attribute of every span, twice.
#[inline(always)]
fn any_len(v: &Value) -> usize {
    match v {
        Value::Bool(_) => 2,
        Value::I64(i) => 1 + varint_len(*i as u64),
        Value::F64(_) => 9,
        Value::String(s) => delimited(1, s.as_str().len()),
        Value::Array(a) => array_any_len(a),
        _ => 0,
    }
}

#[cold]
fn array_any_len(a: &Array) -> usize {
    delimited(5, array_len(a))
}

/// An `ArrayValue`.
fn array_len(a: &Array) -> usize {
    fn each<T: Clone + Into<Value>>(items: &[T]) -> usize {
        items.iter().map(|i| delimited(1, any_len(&i.clone().into()))).sum()
    }
    match a {
        Array::Bool(v) => each(v),
        Array::I64(v) => each(v),
        Array::F64(v) => each(v),
        Array::String(v) => each(v),
        _ => 0,
    }
}

/// The usual attribute, a string under a key, when its whole `KeyValue` is
/// under 128 bytes: every tag and length in it then takes one byte, and it
/// takes `6 + key + value` (see `Writer::attributes`).
#[inline(always)]
fn short_string(kv: &KeyValue) -> Option<(&[u8], &[u8])> {
    let (k, Value::String(v)) = (kv.key.as_str(), &kv.value) else { return None };
    let v = v.as_str();
    (!k.is_empty() && 6 + k.len() + v.len() < 0x80).then_some((k.as_bytes(), v.as_bytes()))
}

#[inline(always)]
fn kv_len(kv: &KeyValue) -> usize {
    match short_string(kv) {
        Some((k, v)) => 6 + k.len() + v.len(),
        None => string_len(1, kv.key.as_str()) + delimited(2, any_len(&kv.value)),
    }
}

fn attributes_len<'a>(field: u32, kvs: impl IntoIterator<Item = &'a KeyValue>) -> usize {
    kvs.into_iter().map(|kv| delimited(field, kv_len(kv))).sum()
}

fn scope_len(scope: &InstrumentationScope) -> usize {
    string_len(1, scope.name())
        + string_len(2, scope.version().unwrap_or_default())
        + attributes_len(3, scope.attributes())
}

fn scope_spans_len(scope: &InstrumentationScope, spans: &[usize]) -> usize {
    delimited(1, scope_len(scope))
        + spans.iter().map(|len| delimited(2, *len)).sum::<usize>()
        + string_len(3, scope.schema_url().unwrap_or_default())
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn kind(k: &SpanKind) -> u64 {
    match k {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// W3C flags, plus "whether the parent is remote is known" and whether it is.
fn flags(sc: &SpanContext, parent_is_remote: bool) -> u32 {
    u32::from(sc.trace_flags().to_u8()) | 0x100 | if parent_is_remote { 0x200 } else { 0 }
}

fn trace_state(sc: &SpanContext) -> Cow<'static, str> {
    if *sc.trace_state() == TraceState::NONE {
        Cow::Borrowed("")
    } else {
        Cow::Owned(sc.trace_state().header())
    }
}

fn status(s: &Status) -> (u64, &str) {
    match s {
        Status::Unset => (0, ""),
        Status::Ok => (1, ""),
        Status::Error { description } => (2, description),
    }
}

fn status_len(s: &Status) -> usize {
    let (code, message) = status(s);
    string_len(2, message) + uint_len(3, code)
}

fn event_len(e: &opentelemetry::trace::Event) -> usize {
    fixed64_len(1, nanos(e.timestamp))
        + string_len(2, &e.name)
        + attributes_len(3, &e.attributes)
        + uint_len(4, u64::from(e.dropped_attributes_count))
}

fn link_len(l: &opentelemetry::trace::Link) -> usize {
    let sc = &l.span_context;
    delimited(1, 16)
        + delimited(2, 8)
        + string_len(3, &trace_state(sc))
        + attributes_len(4, &l.attributes)
        + uint_len(5, u64::from(l.dropped_attributes_count))
        + fixed32_len(6, flags(sc, sc.is_remote()))
}

fn span_len(s: &SpanData) -> usize {
    let sc = &s.span_context;
    let parent = if s.parent_span_id == SpanId::INVALID { 0 } else { delimited(4, 8) };
    delimited(1, 16)
        + delimited(2, 8)
        + string_len(3, &trace_state(sc))
        + parent
        + fixed32_len(16, flags(sc, s.parent_span_is_remote))
        + string_len(5, &s.name)
        + uint_len(6, kind(&s.span_kind))
        + fixed64_len(7, nanos(s.start_time))
        + fixed64_len(8, nanos(s.end_time))
        + attributes_len(9, &s.attributes)
        + uint_len(10, u64::from(s.dropped_attributes_count))
        + s.events.iter().map(|e| delimited(11, event_len(e))).sum::<usize>()
        + uint_len(12, u64::from(s.events.dropped_count))
        + s.links.iter().map(|l| delimited(13, link_len(l))).sum::<usize>()
        + uint_len(14, u64::from(s.links.dropped_count))
        + delimited(15, status_len(&s.status))
}

/// Writes protobuf fields; every `*_len` function above sizes its writer.
struct Writer(Vec<u8>);

impl Writer {
    #[inline(always)]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    #[inline(always)]
    fn tag(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// The header of a length-delimited field of `len` bytes.
    #[inline(always)]
    fn message(&mut self, field: u32, len: usize) {
        if field < 16 && len < 0x80 {
            // The usual case, in one copy: a one-byte tag and length.
            self.0.extend_from_slice(&[(field << 3 | 2) as u8, len as u8]);
        } else {
            self.tag(field, 2);
            self.varint(len as u64);
        }
    }

    #[inline(always)]
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.message(field, b.len());
        self.0.extend_from_slice(b);
    }

    #[inline(always)]
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }

    fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, 0);
            self.varint(v);
        }
    }

    fn fixed64(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, 1);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn fixed32(&mut self, field: u32, v: u32) {
        if v != 0 {
            self.tag(field, 5);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    #[inline(always)]
    fn any(&mut self, v: &Value) {
        match v {
            Value::Bool(b) => {
                self.tag(2, 0);
                self.varint(u64::from(*b));
            }
            Value::I64(i) => {
                self.tag(3, 0);
                self.varint(*i as u64);
            }
            Value::F64(f) => {
                self.tag(4, 1);
                self.0.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Value::String(s) => self.bytes(1, s.as_str().as_bytes()),
            Value::Array(a) => self.array(a),
            _ => {}
        }
    }

    #[cold]
    fn array(&mut self, a: &Array) {
        self.message(5, array_len(a));
        fn each<T: Clone + Into<Value>>(w: &mut Writer, items: &[T]) {
            for i in items {
                let v = i.clone().into();
                w.message(1, any_len(&v));
                w.any(&v);
            }
        }
        match a {
            Array::Bool(v) => each(self, v),
            Array::I64(v) => each(self, v),
            Array::F64(v) => each(self, v),
            Array::String(v) => each(self, v),
            _ => {}
        }
    }

    fn attributes<'a>(&mut self, field: u32, kvs: impl IntoIterator<Item = &'a KeyValue>) {
        for kv in kvs {
            if field < 16
                && let Some((k, v)) = short_string(kv)
            {
                // Four bytes of tags and lengths, the key, four more, the value.
                let len = 6 + k.len() + v.len();
                self.0.extend_from_slice(&[(field << 3 | 2) as u8, len as u8, 0x0a, k.len() as u8]);
                self.0.extend_from_slice(k);
                self.0.extend_from_slice(&[0x12, (2 + v.len()) as u8, 0x0a, v.len() as u8]);
                self.0.extend_from_slice(v);
                continue;
            }
            // Each size once: a span's attributes are most of its bytes.
            let (key, value) = (kv.key.as_str(), any_len(&kv.value));
            self.message(field, string_len(1, key) + delimited(2, value));
            self.string(1, key);
            self.message(2, value);
            self.any(&kv.value);
        }
    }

    fn span(&mut self, s: &SpanData) {
        let sc = &s.span_context;
        self.bytes(1, &sc.trace_id().to_bytes());
        self.bytes(2, &sc.span_id().to_bytes());
        self.string(3, &trace_state(sc));
        if s.parent_span_id != SpanId::INVALID {
            self.bytes(4, &s.parent_span_id.to_bytes());
        }
        self.string(5, &s.name);
        self.uint(6, kind(&s.span_kind));
        self.fixed64(7, nanos(s.start_time));
        self.fixed64(8, nanos(s.end_time));
        self.attributes(9, &s.attributes);
        self.uint(10, u64::from(s.dropped_attributes_count));
        for e in s.events.iter() {
            self.message(11, event_len(e));
            self.fixed64(1, nanos(e.timestamp));
            self.string(2, &e.name);
            self.attributes(3, &e.attributes);
            self.uint(4, u64::from(e.dropped_attributes_count));
        }
        self.uint(12, u64::from(s.events.dropped_count));
        for l in s.links.iter() {
            let lc = &l.span_context;
            self.message(13, link_len(l));
            self.bytes(1, &lc.trace_id().to_bytes());
            self.bytes(2, &lc.span_id().to_bytes());
            self.string(3, &trace_state(lc));
            self.attributes(4, &l.attributes);
            self.uint(5, u64::from(l.dropped_attributes_count));
            self.fixed32(6, flags(lc, lc.is_remote()));
        }
        self.uint(14, u64::from(s.links.dropped_count));
        let (code, message) = status(&s.status);
        self.message(15, status_len(&s.status));
        self.string(2, message);
        self.uint(3, code);
        // Last, as `prost` writes it (by field number), so that the bytes
        // are its bytes.
        self.fixed32(16, flags(sc, s.parent_span_is_remote));
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::trace::{
        Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
    use prost::Message as _;

    use reqwest::header::HeaderMap;

    use super::{HttpExporter, Plain, request};

    fn context(trace: u128, span: u64, sampled: bool, state: &str, remote: bool) -> SpanContext {
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let state = if state.is_empty() {
            TraceState::NONE
        } else {
            TraceState::from_key_value([("vendor", state)]).unwrap_or_default()
        };
        SpanContext::new(TraceId::from(trace), SpanId::from(span), flags, remote, state)
    }

    /// Every kind of value, the awkward ones included.
    fn attributes() -> Vec<KeyValue> {
        vec![
            KeyValue::new("orchestrix.run_id", "0190f3a2-7c1e-7d3b-9a55-3f6e1c2b4d5e"),
            KeyValue::new("empty", ""),
            KeyValue::new("", "no key"),
            KeyValue::new("unicode", "caf\u{e9} \u{1f600}"),
            KeyValue::new("zero", 0i64),
            KeyValue::new("negative", -1i64),
            KeyValue::new("big", i64::MAX),
            KeyValue::new("small", i64::MIN),
            KeyValue::new("yes", true),
            KeyValue::new("no", false),
            KeyValue::new("pi", 3.25f64),
            KeyValue::new("zero.f", 0.0f64),
            KeyValue::new("nan", f64::NAN),
            KeyValue::new(
                "strings",
                Value::Array(Array::String(vec![StringValue::from("a"), StringValue::from("")])),
            ),
            KeyValue::new("ints", Value::Array(Array::I64(vec![1, -300, 0]))),
            KeyValue::new("floats", Value::Array(Array::F64(vec![0.5]))),
            KeyValue::new("bools", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("none", Value::Array(Array::I64(vec![]))),
            KeyValue::new("long", "x".repeat(300)),
        ]
    }

    fn span(i: u64, scope: &InstrumentationScope) -> SpanData {
        let kinds = [
            SpanKind::Internal,
            SpanKind::Server,
            SpanKind::Client,
            SpanKind::Producer,
            SpanKind::Consumer,
        ];
        let statuses =
            [Status::Unset, Status::Ok, Status::error("card declined"), Status::error("")];
        let at = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789 + i);
        let mut events = SpanEvents::default();
        let mut links = SpanLinks::default();
        if i % 2 == 1 {
            events.events.push(Event::new("attempt failed", at, attributes(), 2));
            events.events.push(Event::new("", UNIX_EPOCH, vec![], 0));
            events.dropped_count = 3;
            let linked = context(7, 8, i.is_multiple_of(3), "x", true);
            links.links.push(Link::new(linked, vec![KeyValue::new("why", "retry")], 1));
            links.links.push(Link::new(context(9, 10, true, "", false), vec![], 0));
            links.dropped_count = 4;
        }
        SpanData {
            span_context: context(
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736 + u128::from(i),
                0x00f0_67aa_0ba9_02b7 + i,
                i % 4 != 3,
                if i.is_multiple_of(3) { "congo=t61rcWkgMzE" } else { "" },
                false,
            ),
            parent_span_id: if i.is_multiple_of(2) { SpanId::INVALID } else { SpanId::from(i) },
            parent_span_is_remote: i % 3 == 1,
            span_kind: kinds[i as usize % kinds.len()].clone(),
            name: Cow::Owned(format!("process-payment execute attempt {i}")),
            start_time: at,
            end_time: at + Duration::from_micros(1500 * i),
            attributes: if i == 4 { vec![] } else { attributes() },
            dropped_attributes_count: (i % 2) as u32 * 5,
            events,
            links,
            status: statuses[i as usize % statuses.len()].clone(),
            instrumentation_scope: scope.clone(),
        }
    }

    fn batch() -> Vec<SpanData> {
        let ours = InstrumentationScope::builder("orchestrix").build();
        let theirs = InstrumentationScope::builder("tracing-opentelemetry")
            .with_version("0.34.0")
            .with_schema_url("https://opentelemetry.io/schemas/1.26.0")
            .with_attributes([KeyValue::new("scope.attr", 1i64)])
            .build();
        (0..12).map(|i| span(i, if i % 3 == 2 { &theirs } else { &ours })).collect()
    }

    fn exporter(resource: &Resource) -> HttpExporter {
        let plain = Plain {
            endpoint: "http://127.0.0.1:9/v1/traces".into(),
            headers: HeaderMap::new(),
            timeout: Duration::from_secs(1),
        };
        let mut e = HttpExporter::new(plain).unwrap();
        e.set_resource(resource);
        e
    }

    /// The request is the very bytes the SDK's exporter would send: its
    /// conversion of the same spans, encoded by `prost`.
    #[test]
    fn a_request_is_the_sdk_exporters_bytes() {
        let resources = [
            Resource::builder_empty().build(),
            Resource::builder()
                .with_service_name("checkout")
                .with_attributes(attributes())
                .with_schema_url(
                    [KeyValue::new("host.name", "h1")],
                    "https://opentelemetry.io/schemas/1.21.0",
                )
                .build(),
        ];
        for resource in &resources {
            let e = exporter(resource);
            for spans in [batch(), batch()[..1].to_vec(), batch()[2..3].to_vec()] {
                let ours = request(&spans, &e.resource, &e.resource_schema);
                let expected = ExportTraceServiceRequest {
                    resource_spans: group_spans_by_resource_and_scope(
                        spans,
                        &ResourceAttributesWithSchema::from(resource),
                    ),
                };
                let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();
                // NaN is not equal to itself: compared as bytes below.
                assert_eq!(format!("{decoded:?}"), format!("{expected:?}"));
                let theirs = expected.encode_to_vec();
                let first_difference = ours.iter().zip(&theirs).position(|(a, b)| a != b);
                assert_eq!((ours.len(), first_difference), (theirs.len(), None));
            }
        }
    }

    /// Exporting to nothing listening fails (after its retries) rather
    /// than hanging, and an empty batch sends nothing.
    #[test]
    fn an_unreachable_collector_is_an_error() {
        let e = exporter(&Resource::builder_empty().build());
        assert!(futures::executor::block_on(e.export(vec![])).is_ok());
        let err = futures::executor::block_on(e.export(batch())).unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
    }

    /// A collector that answers each request with the next of `answers`
    /// (status, extra header line, delay before answering), and keeps what
    /// it was sent.
    fn collector(
        answers: &'static [(u16, &'static str, u64)],
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let serve = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, header, delay) in answers {
                let Ok((stream, _)) = listener.accept() else { break };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let decoded = ExportTraceServiceRequest::decode(body.as_slice()).is_ok();
                seen.push(format!("{head}decodes: {decoded}"));
                std::thread::sleep(Duration::from_millis(*delay));
                let answer = format!(
                    "HTTP/1.1 {status} X\r\n{header}content-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = (&stream).write_all(answer.as_bytes());
            }
            seen
        });
        (url, serve)
    }

    fn exporter_to(endpoint: String, headers: HeaderMap, timeout: Duration) -> HttpExporter {
        HttpExporter::new(Plain { endpoint, headers, timeout }).unwrap()
    }

    /// A collector that is busy gets the same request again; one that
    /// refuses it is not asked twice.
    #[test]
    fn a_busy_collector_is_asked_again_and_a_refusal_is_final() {
        let (endpoint, serve) = collector(&[(503, "", 0), (200, "", 0)]);
        let headers = super::headers("api-key=s%3Dcret");
        let e = exporter_to(endpoint, headers, Duration::from_secs(5));
        futures::executor::block_on(e.export(batch())).unwrap();
        let seen = serve.join().unwrap();
        assert_eq!(seen.len(), 2);
        for request in &seen {
            let r = request.to_ascii_lowercase();
            assert!(r.starts_with("post /v1/traces http/1.1"), "{request}");
            assert!(r.contains("content-type: application/x-protobuf"), "{request}");
            assert!(r.contains("api-key: s=cret"), "{request}");
            assert!(r.contains("user-agent: orchestrix-otlp/"), "{request}");
            assert!(r.ends_with("decodes: true"), "{request}");
        }

        let (endpoint, serve) = collector(&[(400, "", 0)]);
        let e = exporter_to(endpoint, HeaderMap::new(), Duration::from_secs(5));
        let err = futures::executor::block_on(e.export(batch())).unwrap_err();
        assert!(err.to_string().contains("400"), "{err}");
        assert_eq!(serve.join().unwrap().len(), 1);
    }

    /// A collector's `Retry-After` is waited out; one asking for longer
    /// than the export's timeout ends the export at once (not a panic, not
    /// a thread asleep for hours).
    #[test]
    fn retry_after_is_honoured_within_the_timeout() {
        let (endpoint, serve) = collector(&[(429, "retry-after: 1\r\n", 0), (200, "", 0)]);
        let e = exporter_to(endpoint, HeaderMap::new(), Duration::from_secs(5));
        let begun = std::time::Instant::now();
        futures::executor::block_on(e.export(batch())).unwrap();
        assert!(begun.elapsed() >= Duration::from_secs(1), "{:?}", begun.elapsed());
        assert_eq!(serve.join().unwrap().len(), 2);

        let (endpoint, serve) = collector(&[(429, "retry-after: 18446744073709551615\r\n", 0)]);
        let e = exporter_to(endpoint, HeaderMap::new(), Duration::from_secs(5));
        let begun = std::time::Instant::now();
        let err = futures::executor::block_on(e.export(batch())).unwrap_err();
        assert!(begun.elapsed() < Duration::from_secs(2), "{:?}", begun.elapsed());
        assert!(err.to_string().contains("within"), "{err}");
        assert_eq!(serve.join().unwrap().len(), 1);
    }

    /// Tries, waits and a slow collector together end within the timeout.
    #[test]
    fn an_export_ends_within_its_timeout() {
        // Before the bound: 1.5 s, then a second try with the whole 2 s.
        let (endpoint, serve) = collector(&[(503, "", 1500), (200, "", 5000)]);
        let e = exporter_to(endpoint, HeaderMap::new(), Duration::from_secs(2));
        let begun = std::time::Instant::now();
        assert!(futures::executor::block_on(e.export(batch())).is_err());
        assert!(begun.elapsed() < Duration::from_secs(3), "{:?}", begun.elapsed());
        drop(serve);
    }

    /// A header that cannot be sent is left out; the others go, and the
    /// export succeeds.
    #[test]
    fn a_bad_header_is_left_out() {
        let headers = super::headers("x-ok=1,x bad=2,x-newline=a%0Ab,x-empty=,=v,x-ok=3");
        assert_eq!(headers.len(), 1);
        assert_eq!(headers.get("x-ok").unwrap(), "3");
        let (endpoint, serve) = collector(&[(200, "", 0)]);
        let e = exporter_to(endpoint, headers, Duration::from_secs(5));
        futures::executor::block_on(e.export(batch())).unwrap();
        let seen = serve.join().unwrap();
        assert!(seen[0].to_ascii_lowercase().contains("x-ok: 3"), "{seen:?}");
    }

    type Vars = &'static [(&'static str, &'static str)];

    fn from(pairs: Vars) -> Option<Plain> {
        Plain::from_vars(None, |name| {
            pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
        })
    }

    /// The signal's timeout, else the generic one, else 10 s; 0 and
    /// nonsense count as unset.
    #[test]
    fn the_timeout_reads_the_signal_then_the_generic_variable() {
        let t = |pairs: Vars| {
            super::timeout("TRACES", |name| {
                pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| (*v).to_owned())
            })
        };
        let ms = Duration::from_millis;
        assert_eq!(t(&[]), ms(10_000));
        assert_eq!(t(&[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250")]), ms(250));
        assert_eq!(t(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")]), ms(2500));
        let both: Vars =
            &[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")];
        assert_eq!(t(both), ms(250));
        let zero: Vars =
            &[("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0"), ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")];
        assert_eq!(t(zero), ms(2500), "0 would fail every export");
        assert_eq!(t(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "0")]), ms(10_000));
        assert_eq!(t(&[("OTEL_EXPORTER_OTLP_TIMEOUT", " 300 ")]), ms(300));
        assert_eq!(
            t(&[("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "250")]),
            ms(10_000),
            "another signal's"
        );
    }

    /// Which exporter the variables choose, and where it sends.
    #[test]
    fn the_variables_choose_the_exporter_and_its_endpoint() {
        let http: Vars = &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")];
        assert_eq!(from(http).unwrap().endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(from(http).unwrap().timeout, Duration::from_secs(10));
        let p = from(&[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "soon"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "b=2"),
        ])
        .unwrap();
        assert_eq!(p.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(p.timeout, Duration::from_millis(2500));
        assert!(p.headers.get("a").is_none(), "the signal's headers replace the generic ones");
        assert_eq!(p.headers.get("b").unwrap(), "2");
        let p = from(&[
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:9999/custom"),
        ])
        .unwrap();
        assert_eq!(p.endpoint, "http://traces:9999/custom", "a signal's endpoint is used as is");
        let elsewhere: [Vars; 7] = [
            &[],
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("ORCHESTRIX_OTLP_EXPORTER", "sdk"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/ca.pem"),
            ],
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
            ],
        ];
        for pairs in elsewhere {
            assert!(from(pairs).is_none(), "{pairs:?} belongs to the SDK's exporter");
        }
        // An endpoint given in code: HTTP whatever the protocol variable says.
        let given = Plain::from_vars(Some("http://c:4318/v1/traces"), |_| None).unwrap();
        assert_eq!(given.endpoint, "http://c:4318/v1/traces");
    }

    #[test]
    fn headers_and_endpoints_read_as_the_variables_say() {
        let h = super::headers("api-key=s%3Dcret, x-tenant = acme ,broken,=novalue");
        assert_eq!(h.len(), 2);
        assert_eq!(h.get("api-key").unwrap(), "s=cret");
        assert_eq!(h.get("x-tenant").unwrap(), "acme");
        assert_eq!(super::percent_decode("100%25%2"), "100%%2");
        let none = |_: &str| None;
        assert!(
            Plain::from_vars(Some("https://collector:4318/v1/traces"), none).is_none(),
            "TLS stays with the SDK"
        );
    }
}
