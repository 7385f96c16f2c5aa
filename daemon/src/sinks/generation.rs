//! One generation of sink instances: build every instance of the new generation, then swap them all in.
//!
//! This is the one procedure of start-up (whose old generation is empty: every sink's worker waits for its first
//! instance) and of every reload. A [`Plan`] says, for every running sink, what the new generation does with it:
//! keep its instance, or build one from a given plugin build. [`build_and_swap`] asks the worker of every sink
//! that gets a new instance to build it on its own thread (phase one, [`build`]); only when all of them did does it
//! tell them to swap (phase two: each flushes and closes its old instance, if any, and goes on from its cursor with
//! its batch settings); otherwise they discard what they built and the old generation keeps running. The first
//! generation's phase two is the start of delivery: each worker is handed its reader of the spool then, which is
//! opened only once phase one succeeded (see `Sinks::prepare`).
//!
//! A plan is made from the old generation and what the new one should be. A configuration reload
//! ([`super::Sinks::reconfigure`]) adds the workers of new sinks before it plans (their first instance is a step
//! like any other), gives every sink whose configuration changed an instance built from the new configuration,
//! keeps the instance of every other sink, and stops removed sinks after the swap.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use trail_plugin_api::SinkError;

use super::Handle;
use super::loader::Plugin;
use super::worker::Control;
use crate::config::SinkConfig;

/// How long a reload waits for a sink's worker to build its new instance.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the new generation does with one running sink.
pub(super) enum Step {
    /// The sink keeps its instance.
    Keep,
    /// The sink gets a new instance of this build, with its new configuration when it changed.
    Build(Arc<Plugin>, Option<Box<SinkConfig>>),
}

/// What the new generation does with each running sink (in the order of the sinks), and how long a worker may
/// take to build its instance.
pub(super) struct Plan {
    steps: Vec<Step>,
    wait: Option<Duration>,
}

impl Plan {
    /// The first generation: every sink gets an instance of its plugin; the old generation is empty. Start-up
    /// waits as long as the plugins take to build them.
    pub(super) fn first(handles: &[Handle], plugins: &HashMap<String, Arc<Plugin>>) -> Plan {
        Plan {
            steps: handles
                .iter()
                .map(|h| Step::Build(plugins[&h.config.plugin].clone(), None))
                .collect(),
            wait: None,
        }
    }

    /// A reload's plan: one step per sink, in the order of the sinks.
    pub(super) fn of(steps: Vec<Step>) -> Plan {
        Plan {
            steps,
            wait: Some(PREPARE_TIMEOUT),
        }
    }

    /// A new build of one plugin: the sinks that use the plugin get an instance of it, the others keep theirs.
    pub(super) fn new_build(handles: &[Handle], plugin: &Arc<Plugin>) -> Plan {
        Plan {
            steps: handles
                .iter()
                .map(|h| match h.config.plugin == plugin.name {
                    true => Step::Build(plugin.clone(), None),
                    false => Step::Keep,
                })
                .collect(),
            wait: Some(PREPARE_TIMEOUT),
        }
    }
}

/// Why a sink got no instance of the new generation.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The plugin refused to build an instance from the sink's configuration.
    #[error("{0}")]
    Rejected(SinkError),
    /// The worker did not answer in time.
    #[error("did not answer within {0:?} (busy in a write?)")]
    Timeout(Duration),
    /// The worker's thread has ended.
    #[error("its worker has stopped")]
    Stopped,
}

/// A sink whose instance of the new generation could not be built.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink:?}: {error}")]
pub struct InstanceProblem {
    /// The sink.
    pub sink: String,
    /// The plugin it uses.
    pub plugin: String,
    /// What went wrong.
    pub error: InstanceError,
}

/// Builds the new generation that `plan` describes and, when every instance was built, swaps it in. Returns the
/// sinks that got a new instance, in order; or every sink that could not build one, and then nothing changed.
pub(super) fn build_and_swap(
    handles: &[Handle],
    plan: &Plan,
) -> Result<Vec<String>, Vec<InstanceProblem>> {
    build_and_swap_with(handles, plan, || ())
}

/// As [`build_and_swap`], running `before_swap` once every instance is built, just before the swap (and not at
/// all when some instance could not be built).
pub(super) fn build_and_swap_with(
    handles: &[Handle],
    plan: &Plan,
    before_swap: impl FnOnce(),
) -> Result<Vec<String>, Vec<InstanceProblem>> {
    let built = build(handles, plan)?;
    // Phase two: swap.
    before_swap();
    for h in &built {
        let _ = h.control.send(Control::Commit);
    }
    Ok(built.iter().map(|h| h.config.name.clone()).collect())
}

/// Phase one of the generation that `plan` describes: every sink that gets a new instance builds it on its own
/// thread, all at once. Returns those sinks, each holding its new instance for the swap; or, when some could not
/// build one, every such sink, and then the others have discarded theirs.
pub(super) fn build<'h>(
    handles: &'h [Handle],
    plan: &Plan,
) -> Result<Vec<&'h Handle>, Vec<InstanceProblem>> {
    let asked: Vec<_> = handles
        .iter()
        .zip(&plan.steps)
        .filter_map(|(h, step)| match step {
            Step::Keep => None,
            Step::Build(plugin, config) => {
                let (reply, answer) = mpsc::channel();
                let sent = h.control.send(Control::Prepare {
                    plugin: plugin.clone(),
                    config: config.clone(),
                    reply,
                });
                Some((h, plugin, sent.is_ok().then_some(answer)))
            }
        })
        .collect();
    let mut problems = Vec::new();
    for (h, plugin, answer) in &asked {
        let built = match (answer, plan.wait) {
            (None, _) => Err(InstanceError::Stopped),
            (Some(answer), None) => answer.recv().map_err(|_| InstanceError::Stopped),
            (Some(answer), Some(wait)) => answer.recv_timeout(wait).map_err(|e| match e {
                RecvTimeoutError::Timeout => InstanceError::Timeout(wait),
                RecvTimeoutError::Disconnected => InstanceError::Stopped,
            }),
        };
        if let Err(error) = built.and_then(|b| b.map_err(InstanceError::Rejected)) {
            problems.push(InstanceProblem {
                sink: h.config.name.clone(),
                plugin: plugin.name.clone(),
                error,
            });
        }
    }
    if !problems.is_empty() {
        for (h, _, _) in &asked {
            let _ = h.control.send(Control::Abort);
        }
        return Err(problems);
    }
    Ok(asked.into_iter().map(|(h, _, _)| h).collect())
}
