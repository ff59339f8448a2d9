//! Reading `GET /metrics` (Prometheus text) into samples.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{http_full, TIMEOUT};

/// Samples by `name{labels}` exactly as exposed.
pub struct Scrape {
    /// The whole exposition text.
    pub text: String,
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// The sample's value; 0 when absent (a labelled series not yet created counts as 0).
    pub fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    pub fn has(&self, key: &str) -> bool {
        self.samples.contains_key(key)
    }
}

/// `GET /metrics` (200, text/plain), every sample line parsed; panics on a malformed line or a
/// sample exposed twice.
pub async fn scrape(addr: SocketAddr) -> Scrape {
    let r = http_full(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(r.status, 200, "GET /metrics: {:?}", r.body);
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain"),
        "GET /metrics Content-Type {ct:?}"
    );
    let mut samples = BTreeMap::new();
    for line in r.body.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a Prometheus sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
        assert!(
            samples.insert(key.to_string(), value).is_none(),
            "sample {key} exposed twice"
        );
    }
    Scrape {
        text: r.body,
        samples,
    }
}

/// Polls /metrics (bounded) until `key` has `want`: for changes the server makes after a client
/// goes away, which no response of the server announces.
pub async fn wait_metric(addr: SocketAddr, key: &str, want: f64) -> Scrape {
    wait_metric_within(addr, key, want, TIMEOUT).await
}

/// Like [`wait_metric`] with another bound.
pub async fn wait_metric_within(
    addr: SocketAddr,
    key: &str,
    want: f64,
    bound: std::time::Duration,
) -> Scrape {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let s = scrape(addr).await;
        if s.get(key) == want {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} is {} after {bound:?}, expected {want}",
            s.get(key)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
