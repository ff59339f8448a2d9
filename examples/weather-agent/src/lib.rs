//! A weather agent and its forecast tool, served by agentcast: the smallest real crate that
//! adds its own agent and tool to the server (`src/main.rs` runs it, `tests/` checks it over a
//! real socket).

use std::sync::Arc;

use agentcast::{
    async_trait, Agent, AgentError, AgentRun, Config, ServerBuilder, Tool, ToolCall, ToolError,
    Toolbox,
};
use serde_json::{json, Value};

/// This crate's server: agentcast with the weather agent and the forecast tool, and without
/// the tools that exist for fault tests.
pub fn server(config: Config) -> ServerBuilder {
    agentcast::Server::builder(config)
        .without_fault_tools()
        .agent(Weather)
        .tool(|| Forecast)
}

/// Answers "what is the weather in CITY": looks it up with the forecast tool and says it.
pub struct Weather;

#[async_trait]
impl Agent for Weather {
    fn name(&self) -> &str {
        "weather"
    }

    fn description(&self) -> &str {
        "Tells the weather in a city: {\"city\": \"Lisbon\"}."
    }

    fn input_schema(&self) -> Value {
        json!({"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}})
    }

    fn check_input(&self, input: &Value, _tools: &Toolbox) -> Result<(), String> {
        match input["city"].as_str() {
            Some(city) if !city.trim().is_empty() => Ok(()),
            _ => Err("weather takes {\"city\": \"NAME\"}".into()),
        }
    }

    async fn run(self: Arc<Self>, run: AgentRun, input: Value) -> Result<Value, AgentError> {
        let city = input["city"].as_str().unwrap_or_default().to_string();
        run.think(format!("I will look up the forecast for {city}."))
            .await;
        let forecast = run
            .tool("forecast", json!({ "city": city }))
            .await
            .map_err(|e| AgentError::failed(format!("no forecast: {}", e.message)))?;
        let answer = format!(
            "{city}: {}, {}°C.",
            forecast["sky"].as_str().unwrap_or("unknown"),
            forecast["high_c"]
        );
        run.partial(answer.clone()).await;
        Ok(json!(answer))
    }
}

/// A forecast, made up from the city's name so that the example needs no network: the same
/// city always gets the same weather.
pub struct Forecast;

#[async_trait]
impl Tool for Forecast {
    fn name(&self) -> &str {
        "forecast"
    }

    fn description(&self) -> &str {
        "Tomorrow's forecast for {\"city\": NAME}."
    }

    fn args_schema(&self) -> Value {
        json!({"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}})
    }

    async fn call(self: Arc<Self>, call: ToolCall, args: Value) -> Result<Value, ToolError> {
        let city = args["city"]
            .as_str()
            .ok_or_else(|| ToolError::invalid_args("forecast takes {\"city\": NAME}"))?;
        call.progress("asking the weather service", Some(0.5)).await;
        let seed: u32 = city.bytes().map(u32::from).sum();
        let sky = ["sunny", "cloudy", "rainy", "windy"][(seed % 4) as usize];
        Ok(json!({"city": city, "sky": sky, "high_c": 12 + seed % 18}))
    }
}
