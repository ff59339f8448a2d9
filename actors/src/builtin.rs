//! What this server offers: every agent and tool, one line each. Add yours here.

use crate::agents::{echo::Echo, scripted::Scripted};
use crate::catalog::CatalogBuilder;
use crate::tools::{calculator::Calculator, clock::Clock, fault, sleep::Sleep};

/// The built-in agents and tools, without the fault tools.
pub fn catalog() -> CatalogBuilder {
    CatalogBuilder::new()
        .agent(Echo)
        .agent(Scripted)
        .tool(|| Calculator)
        .tool(|| Clock)
        .tool(|| Sleep)
}

/// The tools that exist for fault tests: `fail` (returns an error) and `panic`.
pub fn fault_tools(offered: CatalogBuilder) -> CatalogBuilder {
    offered.tool(|| fault::Fail).tool(|| fault::Panic)
}
