//! `cargo run -p weather-agent -- [agentcast serve's flags]`: agentcast with the weather agent.

fn main() -> std::io::Result<()> {
    weather_agent::server(agentcast::Config::from_command_line()).serve()
}
