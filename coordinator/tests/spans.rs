//! The span tree of runs: asserted with a capturing subscriber on the test's
//! own thread (the paused-time actix system runs everything there).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::paused;
use orchestrix_coordinator::{RunStatus, create};
use orchestrix_worker::StepError;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

#[derive(Default, Clone)]
struct Fields(HashMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// A span still open: its fields and its parent's id.
type OpenSpan = (Fields, Option<u64>);
/// A closed span: its name, its parent's name, its fields.
type ClosedSpan = (String, Option<String>, Fields);

#[derive(Default, Clone)]
struct Capture {
    open: Arc<Mutex<HashMap<u64, OpenSpan>>>,
    closed: Arc<Mutex<Vec<ClosedSpan>>>,
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        self.open.lock().unwrap().insert(id.into_u64(), (f, attrs.parent().map(Id::into_u64)));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some((f, _)) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(f);
        }
    }
    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        let open = self.open.lock().unwrap();
        let Some((f, parent)) = open.get(&id.into_u64()).cloned() else { return };
        let name = |f: &Fields| f.0.get("otel.name").cloned().unwrap_or_default();
        let parent = parent.and_then(|p| open.get(&p).map(|(pf, _)| name(pf)));
        self.closed.lock().unwrap().push((name(&f), parent, f));
    }
}

#[test]
fn a_failed_run_reads_as_a_tree_of_attempts_and_compensations() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        paused(|| async {
            let flow = create::<()>("payment-flow")
                .step_with(
                    "reserve-stock",
                    |_| async { Ok(()) },
                    |o| o.compensate(|_| async { Ok(()) }),
                )
                .step_with(
                    "process-payment",
                    |_| async { Err::<(), _>(StepError::retryable("declined")) },
                    |o| o.retries(1).retry_delay(Duration::from_millis(10)),
                );
            let report = flow.run(()).await.unwrap();
            assert_eq!(report.status, RunStatus::Failed);
        })
    });
    let closed = capture.closed.lock().unwrap().clone();
    let tree: Vec<(String, Option<String>, Option<String>)> = closed
        .iter()
        .map(|(n, p, f)| (n.clone(), p.clone(), f.0.get("otel.status_code").cloned()))
        .collect();
    let run = "payment-flow run".to_owned();
    let err = Some("ERROR".to_owned());
    assert_eq!(
        tree,
        [
            ("reserve-stock attempt 1".into(), Some(run.clone()), None),
            ("process-payment attempt 1".into(), Some(run.clone()), err.clone()),
            ("process-payment attempt 2".into(), Some(run.clone()), err.clone()),
            ("compensate reserve-stock".into(), Some(run.clone()), None),
            (run.clone(), None, err),
        ]
    );
    let attempt2 = &closed[2].2.0;
    assert_eq!(attempt2["orchestrix.step"], "process-payment");
    assert_eq!(attempt2["orchestrix.attempt"], "2");
    assert_eq!(attempt2["orchestrix.kind"], "execute");
    assert_eq!(attempt2["otel.status_message"], "declined");
    assert!(!attempt2.contains_key("messaging.system"), "in-process attempts are not messaging");
    let run_fields = &closed[4].2.0;
    assert_eq!(run_fields["orchestrix.flow"], "payment-flow");
    assert_eq!(run_fields["otel.status_message"], "declined");
}
