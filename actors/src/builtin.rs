//! What this server offers: every agent and tool, one line each. Add yours here.

use crate::agents::{echo::Echo, scripted::Scripted};
use crate::catalog::CatalogBuilder;
use crate::tools::{calculator::Calculator, clock::Clock, fault, sleep::Sleep};

pub fn catalog() -> CatalogBuilder {
    CatalogBuilder::new()
        .agent(Echo)
        .agent(Scripted)
        .tool(|| Calculator)
        .tool(|| Clock)
        .tool(|| Sleep)
        .tool(|| fault::Fail)
        .tool(|| fault::Panic)
}
