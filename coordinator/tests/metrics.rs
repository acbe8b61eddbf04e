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
use orchestrix_coordinator::{Hooks, StepEvent};
use orchestrix_proto::CommandKind;
use orchestrix_worker::StepError;
use uuid::Uuid;

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

/// The bucket index of each data point of a histogram, by `step` attribute,
/// with the histogram's boundaries.
fn buckets_by_step(
    exporter: &InMemoryMetricExporter,
    name: &str,
) -> (Vec<f64>, HashMap<String, usize>) {
    let mut bounds = Vec::new();
    let mut out = HashMap::new();
    for rm in exporter.get_finished_metrics().unwrap() {
        for sm in rm.scope_metrics() {
            for m in sm.metrics().filter(|m| m.name() == name) {
                assert_eq!(m.unit(), "s");
                let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() else {
                    panic!("{name} is not an f64 histogram")
                };
                for dp in h.data_points() {
                    bounds = dp.bounds().collect();
                    let step = dp
                        .attributes()
                        .find(|kv| kv.key.as_str() == "step")
                        .map(|kv| kv.value.to_string())
                        .unwrap_or_default();
                    let counts: Vec<u64> = dp.bucket_counts().collect();
                    assert_eq!(counts.iter().sum::<u64>(), 1, "{step}: one observation");
                    out.insert(step, counts.iter().position(|&c| c == 1).unwrap());
                }
            }
        }
    }
    (bounds, out)
}

#[test]
fn duration_buckets_separate_milliseconds_from_seconds() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder().with_periodic_exporter(exporter.clone()).build();
    let meter = provider.meter("test");
    let steps = [("one-ms", 1u64), ("ten-ms", 10), ("hundred-ms", 100), ("one-s", 1000)];
    paused(|| async {
        let mut flow = create::<()>("timed");
        for (name, ms) in steps {
            flow = flow.step(name, move |_| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            });
        }
        let c = Coordinator::builder().flow(&flow).hooks(RunMetrics::new(&meter)).build().unwrap();
        c.run("timed", &(), RunOptions::new()).await.unwrap();
    });
    provider.force_flush().unwrap();
    let (bounds, bucket) = buckets_by_step(&exporter, "orchestrix.step.duration");
    assert_eq!(bounds, orchestrix_coordinator::metrics::DURATION_BUCKETS.to_vec());
    let idx: Vec<usize> = steps.iter().map(|(name, _)| bucket[*name]).collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "1 ms, 10 ms, 100 ms, 1 s in buckets {idx:?}");
    // Not in an overflow bucket: each under a bound near its duration.
    for ((name, ms), i) in steps.iter().zip(&idx) {
        let secs = *ms as f64 / 1000.0;
        assert!(*i < bounds.len(), "{name} above every bound");
        assert!(
            bounds[*i] >= secs && bounds[*i] <= secs * 2.5,
            "{name} in bucket ≤ {}",
            bounds[*i]
        );
    }
    let (run_bounds, _) = buckets_by_step(&exporter, "orchestrix.run.duration");
    assert_eq!(run_bounds, bounds);
}

/// 1500 flows, the same step name in each, as
/// action or compensation: every flow's counts are its own. (One attribute
/// set per flow and instrument: the SDK's own cardinality limit is 2000.)
#[test]
fn many_flows_with_the_same_step_are_counted_apart() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder().with_periodic_exporter(exporter.clone()).build();
    let meter = provider.meter("test");
    let m = RunMetrics::new(&meter);
    let names: Vec<String> = (0..1500).map(|i| format!("flow-{i}")).collect();
    let kinds = |i: usize| {
        if i.is_multiple_of(2) {
            (CommandKind::Execute, CommandKind::Compensate)
        } else {
            (CommandKind::Compensate, CommandKind::Execute)
        }
    };
    // Twice over: the second pass finds each flow's counts again.
    for _ in 0..2 {
        for (i, flow) in names.iter().enumerate() {
            let ev = |kind| StepEvent {
                run_id: Uuid::nil().into(),
                flow,
                step: "charge",
                kind,
                attempt: 1,
                group: None,
            };
            let (retried, paused) = kinds(i);
            for _ in 0..=(i % 3) {
                m.on_run_start(Uuid::nil(), flow);
                m.on_step_retry(&ev(retried), "x", Duration::ZERO);
            }
            m.on_run_paused(&ev(paused), "x");
        }
    }
    provider.force_flush().unwrap();
    let got = read(&exporter);
    let get = |name: &str, attrs: String| got.get(&(name.to_owned(), attrs)).copied();
    for (i, flow) in names.iter().enumerate() {
        let n = 2 * ((i % 3) as i64 + 1);
        let (retried, paused) = kinds(i);
        assert_eq!(get("orchestrix.runs.started", format!("flow={flow}")), Some(n), "{flow}");
        let attrs = format!("flow={flow},kind={},outcome=retried,step=charge", retried.as_str());
        assert_eq!(get("orchestrix.step.attempts", attrs), Some(n), "{flow}");
        let attrs = format!("flow={flow},kind={},step=charge", paused.as_str());
        assert_eq!(get("orchestrix.runs.paused", attrs), Some(2), "{flow}");
    }
}
