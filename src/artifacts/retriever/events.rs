//! Following the source's event log: the events after the cursor (re-reading a little below
//! it), the event waiting time, then each artifact they name brought to its current state.

use std::collections::HashSet;
use std::time::Duration;

use tracing::info;

use super::{Retriever, SourceError};

/// Events re-read below the cursor, so an event whose id committed late is still seen.
const EVENT_LOOKBACK: i64 = 64;
const EVENT_BATCH: i64 = 500;

impl Retriever {
    /// Reads the events after the cursor and deploys or undeploys what those of this node's
    /// labels name; after an outage, reconciles first.
    pub(super) async fn poll_events(&mut self) -> Result<(), SourceError> {
        let events = self
            .source
            .events_after((self.cursor - EVENT_LOOKBACK).max(0), EVENT_BATCH)
            .await?;
        if !self.available {
            info!("artifact source is back; reconciling");
            self.available = true;
            self.last_error = None;
            self.reconcile().await?;
        }
        let mine: HashSet<&String> = self.config.gateway_labels.iter().collect();
        let mut ids: Vec<String> = Vec::new();
        for e in events {
            if !self.seen.insert(e.id) {
                continue;
            }
            self.cursor = self.cursor.max(e.id);
            if mine.contains(&e.label) && !ids.contains(&e.artifact_id) {
                ids.push(e.artifact_id);
            }
        }
        let floor = self.cursor - EVENT_LOOKBACK;
        self.seen = self.seen.split_off(&floor);
        if ids.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(self.config.event_waiting_time)).await;
        for id in ids {
            // A new event supersedes an operator's undeploy and a given-up retry.
            self.held_off.remove(&id);
            self.failures.remove(&id);
            self.sync_one(&id).await?;
        }
        Ok(())
    }

    /// Brings one artifact to its current state for this node's labels.
    pub(super) async fn sync_one(&mut self, id: &str) -> Result<(), SourceError> {
        let meta = match self.source.get(id, &self.config.gateway_labels).await {
            Ok(m) => m,
            Err(SourceError::Artifact { problem, .. }) => {
                self.fail(id, 0, problem);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let wanted = meta.filter(|m| !m.removed).map(|mut m| {
            m.labels.retain(|l| self.config.gateway_labels.contains(l));
            m
        });
        match wanted {
            Some(m) if !m.labels.is_empty() => {
                if self.needs_deploy(&m) {
                    self.deploy(m).await?;
                }
            }
            _ => {
                if self.deployed.contains_key(id) {
                    self.undeploy(id).await;
                }
            }
        }
        Ok(())
    }
}
