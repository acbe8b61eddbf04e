//! A NATS node frozen for seconds under two coordinators, at production
//! shape: 3 nodes, the coordinators of the runs on the frozen node (each
//! presumes the other dead when it comes back), a bystander coordinator
//! elsewhere that fences them meanwhile, 3 worker replicas. Every run ends
//! and no step runs twice (see `orchestrix_integration_tests::frozen`;
//! `target/debug/freeze --trials N` runs it many times).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_under_two_coordinators_starts_no_step_twice() {
    orchestrix_integration_tests::frozen::trial(2).await;
}
