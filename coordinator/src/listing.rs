//! What the registry holds, as the CLI (`orchestrix flows`) and the run
//! browser show it.

use orchestrix_worker::registry::{Registry, RegistryError, serves, unserved_steps};
use serde::Serialize;

/// One registered version of a flow, and who serves it now.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowVersionListing {
    /// The flow's name.
    pub flow: String,
    /// The version (label or hash).
    pub version: String,
    /// When it was first registered (Unix ms).
    pub registered_at_ms: u64,
    /// The worker that registered it.
    pub registered_by: String,
    /// Its steps and their policies.
    pub steps: Vec<crate::StepDef>,
    /// Runs with one concurrency key that may run at once (`None`: 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_per_key: Option<u32>,
    /// The JSON Schema run inputs must match, if the flow publishes one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<serde_json::Value>,
    /// Live workers that serve it.
    pub workers: Vec<String>,
    /// Steps no live worker serves.
    pub unserved: Vec<String>,
    /// The version new runs of the flow take now.
    pub new_runs: bool,
}

/// Every registered version of every flow, with the live workers serving it,
/// the steps nobody serves, and which version new runs take (as coordinators
/// choose: the newest fully served one, else the newest).
pub async fn flow_versions(registry: &Registry) -> Result<Vec<FlowVersionListing>, RegistryError> {
    let workers = registry.presences().await?;
    let mut out: Vec<FlowVersionListing> = registry
        .registrations()
        .await?
        .into_iter()
        .map(|r| FlowVersionListing {
            workers: workers
                .iter()
                .filter(|p| serves(p, &r.flow.name, &r.version))
                .map(|p| p.worker.clone())
                .collect(),
            unserved: unserved_steps(&r.flow, &r.version, &workers)
                .iter()
                .map(|s| s.to_string())
                .collect(),
            flow: r.flow.name.to_string(),
            version: r.version.to_string(),
            registered_at_ms: r.registered_at_ms,
            registered_by: r.registered_by,
            concurrency_per_key: r.flow.concurrency_per_key,
            input_schema: r.flow.input_schema.as_deref().and_then(|s| serde_json::from_str(s).ok()),
            steps: r.flow.steps,
            new_runs: false,
        })
        .collect();
    out.sort_by(|a, b| (&a.flow, a.registered_at_ms).cmp(&(&b.flow, b.registered_at_ms)));
    // As coordinators choose: the newest served version, else the newest.
    let mut i = 0;
    while i < out.len() {
        let j = out[i..].iter().position(|v| v.flow != out[i].flow).map_or(out.len(), |k| i + k);
        let group = &mut out[i..j];
        let pick = group.iter().rposition(|v| v.unserved.is_empty()).unwrap_or(group.len() - 1);
        group[pick].new_runs = true;
        i = j;
    }
    Ok(out)
}
