//! Reading the effects files workers append to (`$CONFORMANCE_EFFECTS`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;

use crate::flow::{Effect, EffectEvent, EffectKind};

/// The effects of one or more files, in the order they were written (by
/// `atMs`, then by position in the file).
#[derive(Debug, Clone, Default)]
pub struct Effects(pub Vec<Effect>);

/// Lines of a file that are not effects, with the reason.
#[derive(Debug, Clone, Default)]
pub struct BadLines(pub Vec<String>);

impl Effects {
    /// Reads every complete line of `paths` (a missing file holds none).
    /// Lines that do not parse are returned apart.
    pub async fn read(paths: &[PathBuf]) -> (Effects, BadLines) {
        let mut effects = Vec::new();
        let mut bad = Vec::new();
        for path in paths {
            let text = match tokio::fs::read_to_string(path).await {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    bad.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            // A last line without its newline is still being written.
            let complete = match text.rfind('\n') {
                Some(i) => &text[..=i],
                None => "",
            };
            for line in complete.lines().filter(|l| !l.trim().is_empty()) {
                match serde_json::from_str::<Effect>(line) {
                    Ok(e) => effects.push(e),
                    Err(e) => bad.push(format!("{}: {line:?}: {e}", file_name(path))),
                }
            }
        }
        effects.sort_by_key(|e| e.at_ms);
        (Effects(effects), BadLines(bad))
    }

    /// The effects of one run.
    pub fn of_run(&self, run: Uuid) -> Effects {
        Effects(
            self.0
                .iter()
                .filter(|e| Uuid::parse_str(&e.run_id).is_ok_and(|r| r == run))
                .cloned()
                .collect(),
        )
    }

    /// The effects of `step` of `kind`, with `event`.
    pub fn of(&self, step: &str, kind: EffectKind, event: EffectEvent) -> Vec<&Effect> {
        self.0.iter().filter(|e| e.step == step && e.kind == kind && e.event == event).collect()
    }

    /// How many effects of `step` of `kind` with `event`.
    pub fn count(&self, step: &str, kind: EffectKind, event: EffectEvent) -> usize {
        self.of(step, kind, event).len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One short line per effect, for failure messages.
    pub fn summary(&self) -> String {
        let items: Vec<String> = self
            .0
            .iter()
            .map(|e| {
                let kind = match e.kind {
                    EffectKind::Execute => "exec",
                    EffectKind::Compensate => "comp",
                };
                let event = match e.event {
                    EffectEvent::Start => "start",
                    EffectEvent::End => "end",
                    EffectEvent::Stopped => "stopped",
                };
                format!("{} {kind}#{} {event}@{}", e.step, e.attempt, e.at_ms % 100_000)
            })
            .collect();
        format!("[{}]", items.join(", "))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Reads `paths` until the effects of `run` satisfy `done`, for at most
/// `within`; returns the last reading either way.
pub async fn wait_for(
    paths: &[PathBuf],
    run: Uuid,
    within: Duration,
    mut done: impl FnMut(&Effects) -> bool,
) -> Effects {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (all, _) = Effects::read(paths).await;
        let mine = all.of_run(run);
        if done(&mine) || tokio::time::Instant::now() >= deadline {
            return mine;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
