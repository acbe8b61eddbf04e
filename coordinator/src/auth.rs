//! Least privilege on the bus: what each role may publish and subscribe to,
//! as NATS permissions, so that users need not write subject lists by hand.
//!
//! | role | may |
//! |---|---|
//! | `coordinator` | everything a coordinator does: serve run, status, list and control requests, send commands, keep the run store and read the registry |
//! | `worker` (of some flows) | receive those flows' commands and inquiries only, answer coordinators, register only those flows, announce itself |
//! | `client` (of some flows) | start runs of those flows, read runs (`status`, `list`, events) |
//! | `viewer` | read runs and the registry; start, cancel or register nothing |
//! | `operator` | a viewer that may also cancel, resume and roll back runs, and apply flow files |
//!
//! Each user gets its own reply-subject prefix (`_INBOX_{user}`): nobody can
//! read another's replies. Components are told theirs with `--inbox-prefix`
//! or `NATS_INBOX_PREFIX`.
//!
//! ```
//! use orchestrix_coordinator::auth::{Role, permissions};
//! let p = permissions(Role::Worker, "orchestrix", &["payment-flow".into()], "_INBOX_pay");
//! assert!(p.subscribe.contains(&"orchestrix.step.payment-flow.>".to_string()));
//! assert!(!p.subscribe.iter().any(|s| s.contains("other-flow")));
//! ```

use std::fmt::Write as _;

/// A role on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// `orchestrix serve`.
    Coordinator,
    /// A worker of some flows.
    Worker,
    /// A service that starts runs of some flows and reads runs.
    Client,
    /// Reads runs and the registry.
    Viewer,
    /// A viewer that may act on runs and apply flow files.
    Operator,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "coordinator" => Role::Coordinator,
            "worker" => Role::Worker,
            "client" => Role::Client,
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            other => {
                return Err(format!(
                    "`{other}` is not a role (coordinator, worker, client, viewer, operator)"
                ));
            }
        })
    }
}

/// Subjects a role may publish and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Permissions {
    /// May publish to.
    pub publish: Vec<String>,
    /// May subscribe to.
    pub subscribe: Vec<String>,
    /// May answer the requests it receives (its reply subjects are the
    /// requesters', which it cannot know in advance).
    pub allow_responses: bool,
}

/// The permissions of `role` under subject `prefix`, for `flows` (workers
/// and clients), with `inbox` as its reply-subject prefix.
pub fn permissions(role: Role, prefix: &str, flows: &[String], inbox: &str) -> Permissions {
    let p = prefix;
    let b = prefix.replace('.', "_");
    let inbox = format!("{inbox}.>");
    let js_info = |bucket: &str| format!("$JS.API.STREAM.INFO.KV_{b}_{bucket}");
    // Reading a bucket: its info, single keys, and watching or listing it.
    let read = |bucket: &str| {
        vec![
            js_info(bucket),
            format!("$JS.API.DIRECT.GET.KV_{b}_{bucket}.>"),
            format!("$JS.API.CONSUMER.CREATE.KV_{b}_{bucket}"),
            format!("$JS.API.CONSUMER.CREATE.KV_{b}_{bucket}.>"),
            format!("$JS.API.CONSUMER.DELETE.KV_{b}_{bucket}.>"),
            format!("$JS.FC.KV_{b}_{bucket}.>"),
        ]
    };
    let registry_read: Vec<String> = [read("flows"), read("workers")].concat();
    let mut out = Permissions::default();
    match role {
        Role::Coordinator => {
            out.publish = vec![
                format!("{p}.step.>"),
                format!("{p}.inquire.>"),
                format!("{p}.events.>"),
                format!("{p}.status.peers"),
                "$JS.API.INFO".into(),
            ];
            // The JetStream API of its own buckets only: another prefix's
            // (another tenant's) streams stay out of reach.
            for bucket in [
                "runs",
                "history",
                "keys",
                "coordinators",
                "quarantine",
                "slots",
                "flows",
                "workers",
            ] {
                let stream = format!("KV_{b}_{bucket}");
                out.publish.extend([
                    format!("$JS.API.STREAM.*.{stream}"),
                    format!("$JS.API.STREAM.MSG.*.{stream}"),
                    format!("$JS.API.DIRECT.GET.{stream}"),
                    format!("$JS.API.DIRECT.GET.{stream}.>"),
                    format!("$JS.API.CONSUMER.*.{stream}"),
                    format!("$JS.API.CONSUMER.*.{stream}.>"),
                    format!("$JS.FC.{stream}.>"),
                ]);
            }
            for bucket in ["runs", "history", "keys", "coordinators", "quarantine", "slots"] {
                out.publish.push(format!("$KV.{b}_{bucket}.>"));
            }
            // The run journal (a plain stream): appends, fences, reading a
            // dead coordinator's subject back, purging.
            let journal = format!("{b}_journal");
            out.publish.extend([
                format!("{journal}.>"),
                format!("$JS.API.STREAM.*.{journal}"),
                format!("$JS.API.STREAM.MSG.*.{journal}"),
                format!("$JS.API.CONSUMER.*.{journal}"),
                format!("$JS.API.CONSUMER.*.{journal}.>"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{journal}.>"),
                format!("$JS.FC.{journal}.>"),
            ]);
            out.subscribe = vec![
                format!("{p}.run.*"),
                format!("{p}.status"),
                format!("{p}.status.peers"),
                format!("{p}.list"),
                format!("{p}.control"),
                format!("{p}.reply.*"),
                inbox.clone(),
            ];
            out.allow_responses = true;
        }
        Role::Worker => {
            out.publish = vec![
                format!("{p}.reply.*"),
                format!("$KV.{b}_workers.>"),
                js_info("flows"),
                js_info("workers"),
            ];
            out.subscribe = vec![inbox.clone()];
            for f in flows {
                out.publish.push(format!("$KV.{b}_flows.{f}.>"));
                out.publish.push(format!("$JS.API.DIRECT.GET.KV_{b}_flows.$KV.{b}_flows.{f}.>"));
                out.subscribe.push(format!("{p}.step.{f}.>"));
                out.subscribe.push(format!("{p}.inquire.{f}.>"));
            }
        }
        Role::Client => {
            out.publish = vec![format!("{p}.status"), format!("{p}.list")];
            out.publish.extend(flows.iter().map(|f| format!("{p}.run.{f}")));
            out.subscribe = vec![inbox.clone(), format!("{p}.events.>")];
        }
        Role::Viewer | Role::Operator => {
            out.publish = vec![format!("{p}.status"), format!("{p}.list")];
            out.publish.extend(registry_read);
            out.subscribe = vec![inbox.clone(), format!("{p}.events.>")];
            if role == Role::Operator {
                out.publish.push(format!("{p}.control"));
                out.publish.push(format!("$KV.{b}_flows.>"));
            }
        }
    }
    // Its own inbox: a round trip to it tells that the server has processed
    // everything sent before (how components check their permissions).
    out.publish.push(inbox);
    out
}

/// One user of a nats-server `authorization` block.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct User {
    /// User name (also its inbox prefix: `_INBOX_{name}`).
    pub name: String,
    /// Password, as written in the config: a literal in quotes, or a
    /// variable (`$PAY_WORKER_PASSWORD`, read from the environment).
    pub password: String,
    /// Its role.
    pub role: Role,
    /// Flows, for workers and clients.
    pub flows: Vec<String>,
}

impl User {
    /// A user whose password comes from the environment variable
    /// `{NAME}_PASSWORD` (upper case, `-` as `_`).
    pub fn new(name: &str, role: Role, flows: Vec<String>) -> Self {
        let var = format!("{}_PASSWORD", name.to_uppercase().replace(['-', '.'], "_"));
        User { name: name.into(), password: format!("${var}"), role, flows }
    }

    /// The same user with a literal password.
    pub fn password(mut self, password: &str) -> Self {
        self.password = format!("\"{}\"", password.replace('\\', "\\\\").replace('"', "\\\""));
        self
    }

    /// Its reply-subject prefix.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX_{}", self.name)
    }
}

/// Why a set of users cannot go in one config: a name given twice, or two
/// names that read their password from the same variable (`a-b`, `a_b`).
pub fn check_users(users: &[User]) -> Result<(), String> {
    let mut names = std::collections::HashMap::new();
    let mut vars = std::collections::HashMap::new();
    for u in users {
        if names.insert(u.name.as_str(), ()).is_some() {
            return Err(format!("user `{}` is granted twice: give each user one role", u.name));
        }
        if let Some(other) = vars.insert(u.password.clone(), u.name.as_str())
            && u.password.starts_with('$')
        {
            return Err(format!(
                "users `{other}` and `{}` would share the password variable {}: rename one",
                u.name, u.password
            ));
        }
    }
    Ok(())
}

/// Writes a development CA and a server certificate it signs, valid for
/// `hosts` (names or IP addresses), as `ca.pem`, `server.pem` and
/// `server-key.pem` in `dir`. For trying TLS locally, not for production.
#[cfg(feature = "cli")]
pub fn dev_certificates(
    dir: &std::path::Path,
    hosts: &[String],
) -> Result<Vec<std::path::PathBuf>, std::io::Error> {
    let fail = |e: rcgen::Error| std::io::Error::other(e.to_string());
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "orchestrix development CA");
    let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
    let ca = ca_params.self_signed(&ca_key).map_err(fail)?;
    let params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(fail)?;
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(fail)?;
    std::fs::create_dir_all(dir)?;
    let paths = [dir.join("ca.pem"), dir.join("server.pem"), dir.join("server-key.pem")];
    std::fs::write(&paths[0], ca.pem())?;
    std::fs::write(&paths[1], cert.pem())?;
    std::fs::write(&paths[2], key.serialize_pem())?;
    Ok(paths.to_vec())
}

/// A nats-server `authorization { users = [...] }` block for `users` under
/// subject `prefix`.
pub fn server_config(prefix: &str, users: &[User]) -> String {
    let list =
        |items: &[String]| items.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let mut out = String::from("authorization {\n  users = [\n");
    for u in users {
        let perm = permissions(u.role, prefix, &u.flows, &u.inbox_prefix());
        let _ = writeln!(out, "    {{");
        let _ = writeln!(out, "      user: \"{}\", password: {}", u.name, u.password);
        let _ = writeln!(out, "      permissions: {{");
        let _ = writeln!(out, "        publish: {{ allow: [{}] }}", list(&perm.publish));
        let _ = writeln!(out, "        subscribe: {{ allow: [{}] }}", list(&perm.subscribe));
        if perm.allow_responses {
            let _ = writeln!(out, "        allow_responses: true");
        }
        let _ = writeln!(out, "      }}");
        let _ = writeln!(out, "    }}");
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_only_what_it_needs() {
        let fa = vec!["fa".to_string()];
        let w = permissions(Role::Worker, "shop", &fa, "_INBOX_w");
        assert!(w.subscribe.contains(&"shop.step.fa.>".into()));
        assert!(!w.subscribe.iter().any(|s| s.starts_with("shop.run") || s == "shop.>"));
        assert!(w.publish.contains(&"$KV.shop_flows.fa.>".into()));
        assert!(!w.publish.iter().any(|s| s.starts_with("$KV.shop_runs")));
        let c = permissions(Role::Client, "shop", &fa, "_INBOX_c");
        assert_eq!(c.publish, ["shop.status", "shop.list", "shop.run.fa", "_INBOX_c.>"]);
        assert!(!c.subscribe.iter().any(|s| s.contains(".step.")));
        let v = permissions(Role::Viewer, "shop", &[], "_INBOX_v");
        assert!(!v.publish.iter().any(|s| s.contains(".run.") || s.ends_with(".control")));
        let o = permissions(Role::Operator, "shop", &[], "_INBOX_o");
        assert!(o.publish.contains(&"shop.control".into()));
        let config = server_config("shop", &[User::new("pay-worker", Role::Worker, fa)]);
        assert!(config.contains("password: $PAY_WORKER_PASSWORD"), "{config}");
        assert!(config.contains("\"_INBOX_pay-worker.>\""), "{config}");
    }
}
