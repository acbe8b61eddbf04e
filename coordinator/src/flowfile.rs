//! Flow files: flows declared in TOML, for a coordinator whose steps run in workers.
//!
//! ```toml
//! [[flow]]
//! name = "payment-flow"
//!
//! [[flow.step]]
//! name = "reserve-stock"
//! compensable = true
//!
//! [[flow.step]]
//! name = "process-payment"
//! retries = 3
//! retry_delay_ms = 1000
//! timeout_ms = 5000
//!
//! [[flow.step]]
//! name = "send-email"
//! ```
//!
//! Flow keys: `name`, `version` (a label; default: a hash of the definition),
//! `concurrency_per_key` (runs with one concurrency key at once; default 1),
//! `input_schema` (a JSON Schema as JSON text that run inputs must match).
//! Step keys: `retries`, `retry_delay_ms`, `backoff`, `max_delay_ms`, `jitter`,
//! `max_duration_ms`, `timeout_ms`, `compensable`, `compensation_retries`,
//! `compensation_retry_delay_ms`, `compensation_backoff`, `compensation_timeout_ms`,
//! `on_unknown` (`"maybe_done"`, the default, or `"retry"`), `on_exhausted` and
//! `compensation_on_exhausted` (`"rollback"`, the default, or `"pause"`),
//! `pause_timeout_ms`, `group` (a parallel group: consecutive steps with the
//! same `group` run at the same time and are compensated at the same time),
//! `max_in_flight` (attempts of the step in flight at once, across all runs).
//! Unknown keys are errors, so a typo never silently changes a policy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{FlowDef, FlowError, RetryPolicy, StepDef};

/// A flow file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowFileError {
    /// The file could not be read.
    #[error("cannot read flow file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid flow file: {0}")]
    Parse(#[from] toml::de::Error),
    /// A flow is invalid.
    #[error("invalid flow file: {0}")]
    Flow(#[from] FlowError),
    /// Two flows share a name.
    #[error("invalid flow file: two flows are named `{0}`")]
    DuplicateFlow(String),
    /// No flow in the file.
    #[error("invalid flow file: it declares no flow (expected [[flow]] tables)")]
    Empty,
    /// A flow-level value makes no sense for its key.
    #[error("invalid flow file: flow `{flow}`: {reason}")]
    FlowValue {
        /// The flow.
        flow: String,
        /// What is wrong.
        reason: String,
    },
    /// A value makes no sense for its key.
    #[error("invalid flow file: flow `{flow}`, step `{step}`: {reason}")]
    Value {
        /// The flow.
        flow: String,
        /// The step.
        step: String,
        /// What is wrong.
        reason: String,
    },
    /// A problem in a given file.
    #[error("{path}: {error}")]
    In {
        /// The file.
        path: PathBuf,
        /// The problem.
        #[source]
        error: Box<FlowFileError>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    flow: Vec<FlowEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowEntry {
    name: String,
    version: Option<String>,
    concurrency_per_key: Option<u32>,
    /// A JSON Schema, as JSON text, that run inputs must match.
    input_schema: Option<String>,
    #[serde(default)]
    step: Vec<StepEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepEntry {
    name: String,
    retries: Option<u32>,
    retry_delay_ms: Option<u64>,
    backoff: Option<f64>,
    max_delay_ms: Option<u64>,
    jitter: Option<f64>,
    max_duration_ms: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    compensable: bool,
    compensation_retries: Option<u32>,
    compensation_retry_delay_ms: Option<u64>,
    compensation_backoff: Option<f64>,
    compensation_max_delay_ms: Option<u64>,
    compensation_jitter: Option<f64>,
    compensation_timeout_ms: Option<u64>,
    #[serde(default)]
    on_unknown: crate::OnUnknown,
    #[serde(default)]
    on_exhausted: crate::OnExhausted,
    #[serde(default)]
    compensation_on_exhausted: crate::OnExhausted,
    pause_timeout_ms: Option<u64>,
    group: Option<String>,
    max_in_flight: Option<u32>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// More retries than this is a typo, not a policy.
const MAX_RETRIES: u32 = crate::RetryPolicy::MAX_RETRIES;

impl StepEntry {
    /// What makes no sense in this step's keys, if anything.
    fn mistake(&self) -> Option<String> {
        let zero = |key: &str, v: Option<u64>| {
            (v == Some(0))
                .then(|| format!("`{key} = 0` is no time at all; leave the key out for none"))
        };
        if let Some(m) = zero("timeout_ms", self.timeout_ms)
            .or_else(|| zero("compensation_timeout_ms", self.compensation_timeout_ms))
            .or_else(|| zero("max_duration_ms", self.max_duration_ms))
            .or_else(|| zero("pause_timeout_ms", self.pause_timeout_ms))
        {
            return Some(m);
        }
        for (key, n) in
            [("retries", self.retries), ("compensation_retries", self.compensation_retries)]
        {
            if n.is_some_and(|n| n > MAX_RETRIES) {
                return Some(format!("`{key}` is at most {MAX_RETRIES}"));
            }
        }
        if let (Some(d), Some(max)) = (self.retry_delay_ms, self.max_delay_ms)
            && d > max
        {
            return Some(format!("`retry_delay_ms = {d}` is over `max_delay_ms = {max}`"));
        }
        let comp_keys = [
            ("compensation_retries", self.compensation_retries.is_some()),
            ("compensation_retry_delay_ms", self.compensation_retry_delay_ms.is_some()),
            ("compensation_backoff", self.compensation_backoff.is_some()),
            ("compensation_max_delay_ms", self.compensation_max_delay_ms.is_some()),
            ("compensation_jitter", self.compensation_jitter.is_some()),
            ("compensation_timeout_ms", self.compensation_timeout_ms.is_some()),
        ];
        let comp_pause = (
            "compensation_on_exhausted",
            self.compensation_on_exhausted != crate::OnExhausted::Rollback,
        );
        if !self.compensable
            && let Some((key, _)) = comp_keys.iter().chain([&comp_pause]).find(|(_, set)| *set)
        {
            return Some(format!("`{key}` on a step that is not `compensable`"));
        }
        let pauses = self.on_exhausted == crate::OnExhausted::Pause
            || self.compensation_on_exhausted == crate::OnExhausted::Pause;
        if self.pause_timeout_ms.is_some() && !pauses {
            return Some(
                "`pause_timeout_ms` on a step that never pauses (set `on_exhausted = \"pause\"`)"
                    .into(),
            );
        }
        None
    }

    fn into_def(self) -> StepDef {
        let mut def = StepDef::new(&self.name);
        let mut retry = RetryPolicy::default();
        if let Some(n) = self.retries {
            retry = retry.retries(n);
        }
        if let Some(d) = self.retry_delay_ms {
            retry = retry.retry_delay(ms(d));
        }
        // Raw values: validation names a bad one rather than clamping it.
        if let Some(b) = self.backoff {
            retry.backoff = b;
        }
        if let Some(d) = self.max_delay_ms {
            retry = retry.max_delay(ms(d));
        }
        if let Some(j) = self.jitter {
            retry.jitter = j;
        }
        if let Some(d) = self.max_duration_ms {
            retry = retry.max_duration(ms(d));
        }
        let mut comp = RetryPolicy::compensation_default();
        if let Some(n) = self.compensation_retries {
            comp = comp.retries(n);
        }
        if let Some(d) = self.compensation_retry_delay_ms {
            comp = comp.retry_delay(ms(d));
        }
        if let Some(b) = self.compensation_backoff {
            comp.backoff = b;
        }
        if let Some(d) = self.compensation_max_delay_ms {
            comp.max_delay = ms(d);
        }
        if let Some(j) = self.compensation_jitter {
            comp.jitter = j;
        }
        def.retry = retry;
        def.timeout = self.timeout_ms.map(ms);
        def.compensable = self.compensable;
        def.on_unknown = self.on_unknown;
        def.on_exhausted = self.on_exhausted;
        def.compensation_on_exhausted = self.compensation_on_exhausted;
        def.pause_timeout = self.pause_timeout_ms.map(ms);
        def.group = self.group.as_deref().map(std::sync::Arc::from);
        def.max_in_flight = self.max_in_flight;
        def.compensation_retry = comp;
        def.compensation_timeout = self.compensation_timeout_ms.map(ms);
        def
    }
}

/// Parses flows from TOML text.
pub fn parse(text: &str) -> Result<Vec<FlowDef>, FlowFileError> {
    let file: File = toml::from_str(text)?;
    if file.flow.is_empty() {
        return Err(FlowFileError::Empty);
    }
    let mut flows: Vec<FlowDef> = Vec::new();
    for entry in file.flow {
        for step in &entry.step {
            if let Some(reason) = step.mistake() {
                return Err(FlowFileError::Value {
                    flow: entry.name.clone(),
                    step: step.name.clone(),
                    reason,
                });
            }
        }
        let mut def = FlowDef::new(&entry.name);
        def.version = entry.version.as_deref().map(std::sync::Arc::from);
        def.concurrency_per_key = entry.concurrency_per_key;
        if let Some(schema) = &entry.input_schema {
            let usable = serde_json::from_str::<serde_json::Value>(schema)
                .map_err(|e| e.to_string())
                .and_then(|v| jsonschema::validator_for(&v).map(|_| ()).map_err(|e| e.to_string()));
            if let Err(e) = usable {
                return Err(FlowFileError::FlowValue {
                    flow: entry.name.clone(),
                    reason: format!("input_schema is not a usable JSON Schema: {e}"),
                });
            }
            def.input_schema = Some(std::sync::Arc::from(schema.as_str()));
        }
        def.steps = entry.step.into_iter().map(StepEntry::into_def).collect();
        def.validate()?;
        if flows.iter().any(|f| f.name == def.name) {
            return Err(FlowFileError::DuplicateFlow(entry.name));
        }
        flows.push(def);
    }
    Ok(flows)
}

/// Reads and parses a flow file.
pub fn load(path: impl AsRef<Path>) -> Result<Vec<FlowDef>, FlowFileError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|source| FlowFileError::Read { path: path.to_owned(), source })?;
    parse(&text).map_err(|e| FlowFileError::In { path: path.to_owned(), error: Box::new(e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parallel_group_is_declared_by_its_steps() {
        let flows = parse(
            r#"
            [[flow]]
            name = "order"
            [[flow.step]]
            name = "warehouse-a"
            group = "reserve"
            compensable = true
            [[flow.step]]
            name = "warehouse-b"
            group = "reserve"
            compensable = true
            [[flow.step]]
            name = "ship"
            "#,
        )
        .unwrap();
        assert_eq!(flows[0].stages(), [0..2, 2..3]);
        assert_eq!(flows[0].steps[1].group.as_deref(), Some("reserve"));
        // The same definition built in code is the same version.
        let mut def = FlowDef::new("order");
        for (name, group) in
            [("warehouse-a", Some("reserve")), ("warehouse-b", Some("reserve")), ("ship", None)]
        {
            let mut s = StepDef::new(name);
            s.compensable = group.is_some();
            s.group = group.map(std::sync::Arc::from);
            def.steps.push(s);
        }
        assert_eq!(flows[0].version(), def.version());
        let split = "[[flow]]\nname = \"f\"\n[[flow.step]]\nname = \"a\"\ngroup = \"g\"\n[[flow.step]]\nname = \"b\"\n[[flow.step]]\nname = \"c\"\ngroup = \"g\"\n";
        assert!(parse(split).unwrap_err().to_string().contains("next to each other"));
    }

    #[test]
    fn limits_are_declared_by_the_flow_and_its_steps() {
        let flows = parse(
            "[[flow]]\nname = \"f\"\nconcurrency_per_key = 3\n[[flow.step]]\nname = \"a\"\nmax_in_flight = 2\n",
        )
        .unwrap();
        assert_eq!(flows[0].concurrency_per_key, Some(3));
        assert_eq!(flows[0].steps[0].max_in_flight, Some(2));
        let zero = "[[flow]]\nname = \"f\"\n[[flow.step]]\nname = \"a\"\nmax_in_flight = 0\n";
        assert!(parse(zero).unwrap_err().to_string().contains("at least 1"));
    }

    #[test]
    fn the_quick_start_flow() {
        let flows = parse(
            r#"
            [[flow]]
            name = "payment-flow"
            [[flow.step]]
            name = "reserve-stock"
            compensable = true
            compensation_retries = 5
            [[flow.step]]
            name = "process-payment"
            retries = 3
            retry_delay_ms = 1000
            backoff = 2.0
            timeout_ms = 5000
            [[flow.step]]
            name = "send-email"
            "#,
        )
        .unwrap();
        let f = &flows[0];
        assert_eq!(&*f.name, "payment-flow");
        assert_eq!(f.steps.len(), 3);
        assert!(f.steps[0].compensable);
        assert_eq!(f.steps[0].compensation_retry.retries, 5);
        assert_eq!(f.steps[1].retry.retries, 3);
        assert_eq!(f.steps[1].retry.retry_delay, Duration::from_secs(1));
        assert_eq!(f.steps[1].retry.backoff, 2.0);
        assert_eq!(f.steps[1].timeout, Some(Duration::from_secs(5)));
        assert!(!f.steps[2].compensable);
    }

    #[test]
    fn mistakes_are_named() {
        let typo = parse("[[flow]]\nname = \"f\"\n[[flow.step]]\nname = \"s\"\nretires = 3\n")
            .unwrap_err();
        assert!(typo.to_string().contains("retires"), "{typo}");
        let bad = parse("[[flow]]\nname = \"a b\"\n").unwrap_err();
        assert!(bad.to_string().contains("flow name `a b`"), "{bad}");
        let one = "[[flow]]\nname = \"f\"\n[[flow.step]]\nname = \"s\"\n";
        let dup = parse(&format!("{one}{one}")).unwrap_err();
        assert!(matches!(dup, FlowFileError::DuplicateFlow(_)));
        assert!(matches!(parse("").unwrap_err(), FlowFileError::Empty));
        let empty = parse("[[flow]]\nname = \"f\"\n").unwrap_err();
        assert!(empty.to_string().contains("no steps"), "{empty}");
        let jitter = parse(&format!("{one}jitter = 3.0\n")).unwrap_err();
        assert!(jitter.to_string().contains("jitter"), "{jitter}");
        for (extra, says) in [
            ("timeout_ms = 0\n", "timeout_ms = 0"),
            ("retries = 4000000000\n", "`retries` is at most"),
            ("retry_delay_ms = 5000\nmax_delay_ms = 100\n", "over `max_delay_ms"),
            ("compensation_retries = 3\n", "not `compensable`"),
            ("compensation_on_exhausted = \"pause\"\n", "not `compensable`"),
            ("pause_timeout_ms = 1000\n", "never pauses"),
        ] {
            let e = parse(&format!("{one}{extra}")).unwrap_err();
            assert!(e.to_string().contains(says), "{extra}: {e}");
        }
        let ok = parse(&format!(
            "{one}compensable = true\ncompensation_retries = 3\ncompensation_jitter = 0.5\n"
        ));
        assert_eq!(ok.unwrap()[0].steps[0].compensation_retry.jitter, 0.5);
        let label =
            parse("[[flow]]\nname = \"f\"\nversion = \"v 2\"\n[[flow.step]]\nname = \"s\"\n");
        assert!(label.unwrap_err().to_string().contains("version"));
        assert!(matches!(parse("flow = 3").unwrap_err(), FlowFileError::Parse(_)));
        let missing = load("/nonexistent/flows.toml").unwrap_err();
        assert!(missing.to_string().starts_with("cannot read flow file /nonexistent/flows.toml"));
        let file = std::env::temp_dir().join(format!("orchestrix-bad-{}.toml", std::process::id()));
        std::fs::write(&file, "[[flow]]\nname = \"f\"\n").unwrap();
        let named = load(&file).unwrap_err().to_string();
        let _ = std::fs::remove_file(&file);
        assert!(named.starts_with(&format!("{}: ", file.display())), "{named}");
    }

    #[test]
    fn an_input_schema_is_json_text_checked_when_read() {
        let ok = "[[flow]]\nname = \"f\"\ninput_schema = '{\"type\": \"object\", \"required\": [\"id\"]}'\n[[flow.step]]\nname = \"a\"\n";
        let flows = parse(ok).unwrap();
        assert!(flows[0].input_schema.as_deref().unwrap().contains("required"));
        let bad =
            "[[flow]]\nname = \"f\"\ninput_schema = '{\"type\": 3'\n[[flow.step]]\nname = \"a\"\n";
        let err = parse(bad).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "invalid flow file: flow `f`: input_schema is not a usable JSON Schema"
            ),
            "{err}"
        );
        let unusable = "[[flow]]\nname = \"f\"\ninput_schema = '{\"type\": \"nonsense\"}'\n[[flow.step]]\nname = \"a\"\n";
        assert!(parse(unusable).is_err());
    }
}
