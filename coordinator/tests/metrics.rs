//! Run and step metrics, read back from an in-memory exporter.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::paused;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use orchestrix_coordinator::metrics::RunMetrics;
use orchestrix_coordinator::{Coordinator, RunOptions, create};
use orchestrix_worker::StepError;

/// Sums of counters (and histogram counts) by name and sorted attributes.
fn read(exporter: &InMemoryMetricExporter) -> HashMap<(String, String), i64> {
    let mut out = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let mut put = |attrs: Vec<String>, v: i64| {
                    let mut attrs = attrs;
                    attrs.sort();
                    out.insert((m.name().to_owned(), attrs.join(",")), v);
                };
                let fmt = |kv: &opentelemetry::KeyValue| format!("{}={}", kv.key, kv.value);
                match m.data() {
                    AggregatedMetrics::U64(MetricData::Sum(s)) => {
                        for dp in s.data_points() {
                            put(dp.attributes().map(fmt).collect(), dp.value() as i64);
                        }
                    }
                    AggregatedMetrics::I64(MetricData::Sum(s)) => {
                        for dp in s.data_points() {
                            put(dp.attributes().map(fmt).collect(), dp.value());
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for dp in h.data_points() {
                            put(dp.attributes().map(fmt).collect(), dp.count() as i64);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

#[test]
fn runs_and_attempts_are_counted() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder().with_periodic_exporter(exporter.clone()).build();
    let meter = provider.meter("test");
    paused(|| async {
        let flow = create::<u32>("pay")
            .step_with("reserve", |_| async { Ok(()) }, |o| o.compensate(|_| async { Ok(()) }))
            .step_with(
                "charge",
                |ctx| async move {
                    if ctx.input > 1000 {
                        return Err(StepError::retryable("declined"));
                    }
                    Ok(())
                },
                |o| o.retries(2).retry_delay(Duration::from_millis(5)),
            );
        let c = Coordinator::builder().flow(&flow).hooks(RunMetrics::new(&meter)).build().unwrap();
        c.run("pay", &50u32, RunOptions::new()).await.unwrap();
        c.run("pay", &5000u32, RunOptions::new()).await.unwrap();
    });
    provider.force_flush().unwrap();
    let m = read(&exporter);
    let get = |name: &str, attrs: &str| m.get(&(name.to_owned(), attrs.to_owned())).copied();
    assert_eq!(get("orchestrix.runs.started", "flow=pay"), Some(2));
    assert_eq!(get("orchestrix.runs.in_flight", "flow=pay"), Some(0));
    assert_eq!(get("orchestrix.runs.finished", "flow=pay,status=completed"), Some(1));
    assert_eq!(get("orchestrix.runs.finished", "flow=pay,status=failed"), Some(1));
    assert_eq!(get("orchestrix.run.duration", "flow=pay,status=failed"), Some(1));
    let attempts = |step: &str, kind: &str, outcome: &str| {
        get(
            "orchestrix.step.attempts",
            &format!("flow=pay,kind={kind},outcome={outcome},step={step}"),
        )
    };
    assert_eq!(attempts("reserve", "execute", "completed"), Some(2));
    assert_eq!(attempts("charge", "execute", "completed"), Some(1));
    assert_eq!(attempts("charge", "execute", "retried"), Some(2));
    assert_eq!(attempts("charge", "execute", "failed"), Some(1));
    assert_eq!(attempts("reserve", "compensate", "completed"), Some(1));
    assert_eq!(get("orchestrix.step.duration", "flow=pay,kind=execute,step=reserve"), Some(2));
}
