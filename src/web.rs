//! The web page and the JavaScript client, embedded in the binary so that
//! `cargo run --release` and a browser at http://127.0.0.1:8080 are the whole demo.

use actix_web::{web, HttpResponse};

const INDEX: &str = include_str!("../web/index.html");
const CLIENT: &str = include_str!("../web/agentcast.js");
const APP: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/",
        web::get().to(|| asset(INDEX, "text/html; charset=utf-8")),
    )
    .route(
        "/agentcast.js",
        web::get().to(|| asset(CLIENT, "text/javascript; charset=utf-8")),
    )
    .route(
        "/app.js",
        web::get().to(|| asset(APP, "text/javascript; charset=utf-8")),
    )
    .route(
        "/style.css",
        web::get().to(|| asset(STYLE, "text/css; charset=utf-8")),
    );
}

async fn asset(body: &'static str, content_type: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("Cache-Control", "no-cache"))
        .body(body)
}
