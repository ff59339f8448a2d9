//! The agents and tools this server offers, by name. Built once at start (tool executors are
//! started then, on the tools' arbiter) and shared read-only by the registry and runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix::prelude::*;

use crate::agent::Agent;
use crate::executor::{ToolExecutor, ToolFactory};
use crate::tool::Tool;

pub struct Catalog {
    agents: BTreeMap<String, Arc<dyn Agent>>,
    tools: Arc<Toolbox>,
}

impl Catalog {
    pub fn agent(&self, name: &str) -> Option<Arc<dyn Agent>> {
        self.agents.get(name).cloned()
    }

    /// Every agent, sorted by name.
    pub fn agents(&self) -> impl Iterator<Item = &Arc<dyn Agent>> + '_ {
        self.agents.values()
    }

    pub fn tools(&self) -> &Arc<Toolbox> {
        &self.tools
    }
}

struct ToolEntry {
    description: String,
    args_schema: serde_json::Value,
    executor: Addr<ToolExecutor>,
}

/// The running tool executors.
pub struct Toolbox {
    tools: BTreeMap<String, ToolEntry>,
}

impl Toolbox {
    pub fn contains(&self, name: &str) -> bool {
        self.tools.contains_key(name)
    }

    pub(crate) fn executor(&self, name: &str) -> Option<&Addr<ToolExecutor>> {
        self.tools.get(name).map(|t| &t.executor)
    }

    /// `(name, description, args schema)` of every tool, sorted by name.
    pub fn list(&self) -> impl Iterator<Item = (&str, &str, &serde_json::Value)> + '_ {
        self.tools
            .iter()
            .map(|(n, t)| (n.as_str(), t.description.as_str(), &t.args_schema))
    }
}

/// Collects agents and tools; `start` turns it into a [`Catalog`].
#[derive(Default)]
pub struct CatalogBuilder {
    agents: Vec<Arc<dyn Agent>>,
    tools: Vec<ToolFactory>,
}

impl CatalogBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers an agent. A later agent with the same name replaces an earlier one.
    pub fn agent(mut self, agent: impl Agent) -> Self {
        self.agents.push(Arc::new(agent));
        self
    }

    /// Offers a tool; `make` builds a fresh instance at start and after every panic.
    pub fn tool<T, F>(mut self, make: F) -> Self
    where
        T: Tool,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.tools
            .push(Arc::new(move || Arc::new(make()) as Arc<dyn Tool>));
        self
    }

    /// Adds everything `other` offers, after what this one does (so it wins a name both have).
    pub fn extend(mut self, other: CatalogBuilder) -> Self {
        self.agents.extend(other.agents);
        self.tools.extend(other.tools);
        self
    }

    /// Starts one supervised executor per tool on `arbiter`.
    pub fn start(self, arbiter: &ArbiterHandle) -> Catalog {
        let tools = self
            .tools
            .into_iter()
            .map(|make| {
                let probe = make();
                let executor =
                    Supervisor::start_in_arbiter(arbiter, move |_| ToolExecutor::new(make));
                (
                    probe.name().to_string(),
                    ToolEntry {
                        description: probe.description().to_string(),
                        args_schema: probe.args_schema(),
                        executor,
                    },
                )
            })
            .collect();
        let agents = self
            .agents
            .into_iter()
            .map(|a| (a.name().to_string(), a))
            .collect();
        Catalog {
            agents,
            tools: Arc::new(Toolbox { tools }),
        }
    }
}
