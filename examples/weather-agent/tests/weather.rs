//! The example crate's server, over a real socket: its own agent runs its own tool, and the
//! fault tools it left out are not there.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn config() -> agentcast::Config {
    agentcast::Config {
        bind: "127.0.0.1:0".into(),
        ..agentcast::Config::default()
    }
}

async fn next_json(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("no frame within 10 s")
            .expect("the connection ended")
            .expect("a WebSocket error");
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).expect("a JSON frame");
            if v["type"] != "heartbeat" {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn the_weather_agent_calls_its_forecast_tool() {
    let server = weather_agent::server(config())
        .spawn()
        .expect("the server starts");
    let url = format!("{}?token={}", server.ws_url(), server.token("alice"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("connects");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");

    let start = json!({"type": "start_run", "agent": "weather", "input": {"city": "Lisbon"}, "request_id": "1"});
    ws.send(Message::text(start.to_string())).await.unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let mut types = Vec::new();
    let end = loop {
        let event = next_json(&mut ws).await;
        types.push(event["type"].as_str().unwrap_or("").to_string());
        if event["type"] == "agent_completed" {
            break event;
        }
    };
    assert_eq!(
        types,
        [
            "agent_started",
            "agent_thinking",
            "tool_executing",
            "tool_progress",
            "tool_completed",
            "partial_result",
            "agent_completed"
        ]
    );
    assert_eq!(end["data"]["status"], "succeeded");
    assert!(
        end["data"]["result"]
            .as_str()
            .unwrap()
            .starts_with("Lisbon: "),
        "{end}"
    );

    // Bad input is refused before a run exists, and the fault tools were left out.
    for (input, words) in [
        (json!({"city": ""}), "weather takes"),
        (json!({"steps": [{"tool": "panic"}]}), "no tool named"),
    ] {
        let agent = if words == "weather takes" {
            "weather"
        } else {
            "scripted"
        };
        let start = json!({"type": "start_run", "agent": agent, "input": input, "request_id": "2"});
        ws.send(Message::text(start.to_string())).await.unwrap();
        let refused = next_json(&mut ws).await;
        assert_eq!(refused["code"], "invalid_field", "{refused}");
        assert!(
            refused["message"].as_str().unwrap().contains(words),
            "{refused}"
        );
    }
}
