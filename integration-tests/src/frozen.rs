//! A soak scenario at production shape: a NATS node frozen under the
//! coordinators of the runs. A trial starts a 3-node cluster, coordinators
//! of flow `pay` on the node to freeze (they also presume each other dead)
//! and a bystander coordinator of another flow elsewhere (it fences the
//! first while the node is frozen, and does not claim their runs), 3 worker
//! replicas on the other nodes, then starts runs every 150 ms and freezes
//! the node (SIGSTOP, 8 s) until a coordinator was fenced. Every run must
//! end, and no step's action may run twice; a finding panics with the run's
//! story (ledger, coordinator logs).
//!
//! The `freeze` binary runs it (`target/debug/freeze --trials 30
//! [--coordinators 2]`). It is not in the test suite yet: it still finds a
//! step started twice in about one trial of twenty (docs/reliability.md).

// A harness whose findings are panics (with the run's story): unwrapping
// what the harness itself set up is the same kind of failure, said at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures::{FutureExt as _, StreamExt};
use orchestrix::{Client, RunOptions, RunStatus, StepContext, Worker, WorkerError};
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;

use crate::{ChildProcess, Ledger, NatsCluster, built};

const SECS: Duration = Duration::from_secs(1);

/// One trial (see the module docs).
pub async fn trial(on_frozen_node: u32) {
    let cluster = NatsCluster::start_monitored(3);
    // The node to freeze leads nothing: not JetStream's meta group (frozen,
    // it would stall every JetStream request until a new one is elected),
    // and, further down, no stream either.
    let deadline = tokio::time::Instant::now() + 60 * SECS;
    let meta = loop {
        if let Some(leader) = cluster.meta_leader(0).await {
            break leader;
        }
        assert!(tokio::time::Instant::now() < deadline, "no JetStream meta leader");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let frozen = (0..3).find(|i| meta != format!("n{i}")).unwrap();
    let [a, b] = [(frozen + 1) % 3, (frozen + 2) % 3];
    let toml = "[[flow]]\nname = \"pay\"\n[[flow.step]]\nname = \"charge\"\ncompensable = true\n[[flow.step]]\nname = \"notify\"\ncompensable = true\n";
    let flows = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(flows.path(), toml).unwrap();
    let on_frozen = cluster.nodes[frozen].url();
    let others = format!("{},{}", cluster.nodes[a].url(), cluster.nodes[b].url());

    let ledger = Ledger::default();
    let mut workers = Vec::new();
    for i in 0..3 {
        let deadline = tokio::time::Instant::now() + 60 * SECS;
        let worker = loop {
            let shape = PayReplica {
                charge: Duration::from_millis(1_500),
                notify: SECS,
                heartbeat: Duration::from_millis(200),
                undo_notify: true,
            };
            let started = shape.start(NatsOptions::new(others.clone()), &ledger, i).await;
            match started {
                Ok(w) => break w,
                // The registry's bucket needs JetStream's meta leader.
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        workers.push(worker);
    }
    // Coordinators of `pay` on the node to freeze, and a bystander
    // elsewhere that serves another flow: it stays in touch during the
    // freeze, presumes the others dead and fences their journals, but does
    // not claim their runs (not its flow). So they come back to find their
    // own runs unheld while their actors still wait on a step.
    let bystander = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bystander.path(), "[[flow]]\nname = \"other\"\n[[flow.step]]\nname = \"x\"\n")
        .unwrap();
    let serve = |nats: &str, flows: &std::path::Path| {
        let flows = flows.to_str().unwrap();
        let args = [
            "--nats",
            nats,
            "serve",
            "--store",
            "jetstream",
            "--replicas",
            "3",
            "--flows",
            flows,
            "--ack-timeout",
            "1s",
            "--heartbeat-timeout",
            "2s",
        ];
        ChildProcess::spawn_capturing_stderr(
            &built("orchestrix"),
            &args,
            &[("RUST_LOG", "info,orchestrix_coordinator::actor=trace")],
            &[],
        )
    };
    let elsewhere = cluster.nodes[a].url();
    let conn = NatsOptions::new(others.clone()).connect().await.unwrap();
    let c = Client::new(conn.clone(), Subjects::default()).request_timeout(3 * SECS);
    let js = async_nats::jetstream::new(conn.clone());
    // The bystander first: it makes the buckets, the others find them.
    let mut coordinators = vec![serve(&elsewhere, bystander.path())];
    heartbeats(&js, 1, &coordinators).await;
    for _ in 0..on_frozen_node {
        coordinators.push(serve(&on_frozen, flows.path()));
    }
    heartbeats(&js, 1 + on_frozen_node as usize, &coordinators).await;
    // Every stream led from elsewhere than the node to freeze, so that while it is
    // frozen the rest of the cluster keeps serving them all (heartbeats
    // expire, the bystander fences) rather than electing new leaders first.
    leaders_off(&js, &conn, frozen).await;
    // Rounds of runs started every 150 ms, so that a freeze finds them at
    // every point, each round ending in a freeze, until a freeze got the
    // coordinators fenced (whether the cluster lets the bystander act
    // while a node is frozen is up to the cluster: some rounds it cannot).
    let fences = || {
        coordinators
            .iter()
            .flat_map(|p| p.stderr_lines())
            .filter(|l| l.contains("took this coordinator's runs over"))
            .count()
    };
    let mut ids = Vec::new();
    let mut retried = Vec::new();
    let mut freezes = 0;
    for i in 0..64u32 {
        let deadline = tokio::time::Instant::now() + 30 * SECS;
        ids.push(loop {
            match c.start("pay", &i, RunOptions::new().key(format!("frozen-{i}"))).await {
                Ok(id) => break id,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{e}");
                    retried.push(format!("frozen-{i}: {e}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        if i % 12 == 8 {
            if freezes == 6 || fences() > 0 {
                break;
            }
            let pid = cluster.nodes[frozen].pid().unwrap().to_string();
            std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            tokio::time::sleep(8 * SECS).await;
            std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
            freezes += 1;
        }
    }
    // What happened to a run: the starts that were sent again, the ledger,
    // and what the coordinators said about it (and about fences).
    let story = |id: orchestrix::RunId| {
        let run = id.to_string();
        let logs: Vec<String> = coordinators
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.stderr_lines().into_iter().map(move |l| format!("c{i}: {l}")))
            .filter(|l| {
                l.contains(&run)
                    || l.contains("took this")
                    || l.contains("fence")
                    || l.contains("DIAG")
            })
            .collect();
        format!("starts sent again: {retried:?}\nledger: {:#?}\n{logs:#?}", ledger.about(id))
    };
    for id in &ids {
        let r = match tokio::time::timeout(120 * SECS, c.wait(*id)).await.unwrap() {
            Ok(r) => r,
            Err(e) => {
                // Where the store has it, if anywhere.
                let i = ids.iter().position(|x| x == id).unwrap();
                let key: String =
                    format!("frozen-{i}").bytes().map(|b| format!("{b:02x}")).collect();
                let mut found = Vec::new();
                for (bucket, k) in [
                    ("orchestrix_runs", id.to_string()),
                    ("orchestrix_history", id.to_string()),
                    ("orchestrix_keys", key),
                ] {
                    let kv = js.get_key_value(bucket).await.unwrap();
                    let entry = kv.entry(&k).await;
                    found.push(format!(
                        "{bucket}: {:?}",
                        entry.map(|e| e.map(|e| (e.operation, e.revision, e.created)))
                    ));
                }
                let all: Vec<String> = coordinators
                    .iter()
                    .enumerate()
                    .flat_map(|(i, p)| {
                        p.stderr_lines().into_iter().map(move |l| format!("c{i}: {l}"))
                    })
                    .filter(|l| !l.contains("letting go first"))
                    .collect();
                finding(format!("{id}: {e}\n{}\n{found:#?}\n{all:#?}", story(*id)))
            }
        };
        assert!(r.status.is_terminal(), "{r}");
        let charged = ledger.count(&format!("charge {id}"));
        let notified = ledger.count(&format!("notify {id}"));
        if charged > 1 || notified > 1 {
            finding(format!("charge ran {charged}, notify {notified} times\n{r}\n{}", story(*id)));
        }
        if r.status == RunStatus::Completed {
            assert_eq!((charged, notified), (1, 1), "{r}");
        }
    }
    // Late duplicates would come within a few takeover scans.
    tokio::time::sleep(3 * SECS).await;
    for id in &ids {
        if ledger.count(&format!("charge {id}")) > 1 || ledger.count(&format!("notify {id}")) > 1 {
            finding(format!("a step ran twice, late\n{}", story(*id)));
        }
    }
    let logs: Vec<String> = coordinators.iter().flat_map(|p| p.stderr_lines()).collect();
    let said = |what: &str| logs.iter().filter(|l| l.contains(what)).count();
    let fenced = said("took this coordinator's runs over");
    eprintln!(
        "freezes: {freezes}, runs: {}, fenced: {fenced}, actors let go: {}, resumed: {}",
        ids.len(),
        said("letting go"),
        said("resuming a run"),
    );
    // The fault did what it is here for.
    assert!(fenced >= 1, "no coordinator was fenced: {logs:#?}");
    drop(coordinators);
    for w in workers {
        w.shutdown().await;
    }
}

/// Waits until `n` coordinators have a heartbeat.
async fn heartbeats(js: &async_nats::jetstream::Context, n: usize, coordinators: &[ChildProcess]) {
    // Making the buckets on a fresh cluster may take a while (a coordinator
    // tries again for up to 2 min).
    let deadline = tokio::time::Instant::now() + 150 * SECS;
    loop {
        let beats = match js.get_key_value("orchestrix_coordinators").await {
            Ok(kv) => match kv.keys().await {
                Ok(keys) => keys.filter_map(|k| async { k.ok() }).count().await,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if beats >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{beats} of {n} coordinators up: {:?}",
            coordinators.iter().map(|p| p.stderr_lines()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Moves the leader of every stream off server `node` (JetStream's
/// leader step-down, with another server preferred).
async fn leaders_off(js: &async_nats::jetstream::Context, conn: &async_nats::Client, node: usize) {
    let (node, preferred) = (format!("n{node}"), format!("n{}", (node + 1) % 3));
    use futures::StreamExt;
    let names: Vec<String> = js.stream_names().filter_map(|n| async { n.ok() }).collect().await;
    let deadline = tokio::time::Instant::now() + 60 * SECS;
    for name in names {
        loop {
            let mut stream = js.get_stream(&name).await.unwrap();
            let info = stream.info().await.unwrap();
            let cluster = info.cluster.as_ref().expect("a clustered stream");
            let leader = cluster.leader.clone().unwrap_or_default();
            let current = cluster.replicas.iter().all(|r| r.current);
            if !leader.is_empty() && leader != node && current {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} stays led by {leader}");
            if leader == node {
                let body = format!("{{\"placement\":{{\"preferred\":\"{preferred}\"}}}}");
                let _ = conn
                    .request(format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"), body.into())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A finding: kept in `target/frozen-findings/` (a CI log may cut a long
/// story short), then the trial fails with it.
fn finding(story: String) -> ! {
    let dir = crate::target_dir().join("frozen-findings");
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let path = dir.join(format!("{at}.txt"));
    let kept = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &story));
    match kept {
        Ok(()) => panic!("{story}\n(kept in {})", path.display()),
        Err(_) => panic!("{story}"),
    }
}

/// A replica of a worker for flow `pay` (steps `charge`, `notify`, each
/// compensable), logging each call in a [`Ledger`]: `charge {run}`,
/// `charge on {replica} {run} {command}`, `refund {run}`, and the same for
/// `notify` / `unnotify`.
#[derive(Debug, Clone, Copy)]
pub struct PayReplica {
    /// How long `charge` takes.
    pub charge: Duration,
    /// How long `notify` takes.
    pub notify: Duration,
    /// The worker's heartbeat interval.
    pub heartbeat: Duration,
    /// Whether `notify` has a compensation (the flow's shape must agree).
    pub undo_notify: bool,
}

impl PayReplica {
    /// Starts replica number `i`.
    pub async fn start(
        self,
        nats: NatsOptions,
        ledger: &Ledger,
        i: usize,
    ) -> Result<Worker, WorkerError> {
        let (l1, l2, l3, l4) = (ledger.clone(), ledger.clone(), ledger.clone(), ledger.clone());
        let PayReplica { charge, notify, heartbeat, undo_notify } = self;
        Worker::builder()
            .nats(nats)
            .heartbeat_interval(heartbeat)
            .steps::<u32>("pay", move |f| {
                let f = f
                    .step("charge", move |ctx: StepContext<u32>| {
                        l1.log(format!("charge {}", ctx.run_id()));
                        l1.log(format!("charge on {i} {} {}", ctx.run_id(), ctx.command_id()));
                        tokio::time::sleep(charge).map(Ok)
                    })
                    .compensate("charge", move |ctx| {
                        l2.log(format!("refund {}", ctx.run_id()));
                        async { Ok(()) }
                    })
                    .step("notify", move |ctx| {
                        l3.log(format!("notify {}", ctx.run_id()));
                        l3.log(format!("notify on {i} {} {}", ctx.run_id(), ctx.command_id()));
                        tokio::time::sleep(notify).map(Ok)
                    });
                if undo_notify {
                    f.compensate("notify", move |ctx| {
                        l4.log(format!("unnotify {}", ctx.run_id()));
                        async { Ok(()) }
                    })
                } else {
                    f
                }
            })
            .start()
            .await
    }
}
