//! The server's settings: every one is a `serve` flag and an `AGENTCAST_*` environment
//! variable of the same name (PROTOCOL.md §9). `Config::default()` is what `agentcast serve`
//! runs with when nothing is set, so tests and the binary share one set of defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use agentcast_actors::agents::llm::{LlmSettings, FAULT_TOOLS};
use agentcast_actors::catalog::Toolbox;

use crate::auth::Signer;
use crate::keys::KeySettings;
use crate::origins::{BadOrigin, OriginPolicy};

/// The secret used when none is configured. Dev mode only: the server then refuses to bind
/// anything but a loopback address, so tokens signed with this well-known value cannot reach
/// a network.
pub const DEV_SECRET: &str = "agentcast-dev-mode-secret-do-not-use-in-production";

/// Shortest HS256 secret accepted, in bytes: RFC 7518 §3.2 asks for a key at least as long
/// as the hash (256 bits). A short secret can be found by brute force from any one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// Every setting of a server: each a flag of `agentcast serve` and an `AGENTCAST_*` variable
/// (PROTOCOL.md section 9, the README's Configuration). `Config::default()` is the flags'
/// defaults; [`Config::from_command_line`] reads them as `agentcast serve` does.
#[derive(Clone, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "AGENTCAST_BIND", default_value = "127.0.0.1:8080")]
    pub bind: String,

    /// HS256 secret that signs user tokens, at least 32 bytes. Without it (and without a
    /// public key) the server runs in dev mode:
    /// loopback only, a well-known secret, and `POST /v1/dev/token` hands out tokens.
    #[arg(long, env = "AGENTCAST_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// HS256 secrets that still verify tokens but sign none, comma-separated: the old secret
    /// after a rotation, until the tokens signed with it have expired.
    #[arg(
        long,
        env = "AGENTCAST_JWT_PREVIOUS_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub jwt_previous_secrets: Vec<String>,

    /// A PEM file with a public key (RSA of 2048 bits or more for RS256, EC P-256 for ES256,
    /// Ed25519 for EdDSA) that verifies tokens; repeat the flag for several (comma-separated
    /// in the environment variable). Reloaded on SIGHUP and when the file changes.
    #[arg(
        long = "jwt-public-key",
        env = "AGENTCAST_JWT_PUBLIC_KEY",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    pub jwt_public_keys: Vec<PathBuf>,

    /// A JWKS file (`{"keys":[...]}`) of public keys that verify tokens; a token's `kid` picks
    /// its key. Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "AGENTCAST_JWKS_FILE", value_name = "FILE")]
    pub jwks_file: Option<PathBuf>,

    /// How often the key files are checked for a change (modification time or size).
    #[arg(long, env = "AGENTCAST_JWT_KEY_CHECK_MS", default_value_t = 60_000)]
    pub jwt_key_check_ms: u64,

    /// When set, tokens must carry this `iss` (and the tokens the server signs carry it).
    #[arg(long, env = "AGENTCAST_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, tokens must name this in `aud` (and the tokens the server signs carry it).
    /// When not set, a token with an `aud` is refused: it was meant for another service.
    #[arg(long, env = "AGENTCAST_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// A run still going after this long ends with status `timed_out`.
    #[arg(long, env = "AGENTCAST_RUN_TIMEOUT_MS", default_value_t = 300_000)]
    pub run_timeout_ms: u64,

    /// A question a run asks its user (PROTOCOL.md §12) expires, unanswered, after this long.
    /// Time spent waiting for an answer does not count toward `--run-timeout-ms`.
    #[arg(
        long,
        env = "AGENTCAST_INTERRUPT_TIMEOUT_MS",
        default_value_t = 600_000
    )]
    pub interrupt_timeout_ms: u64,

    /// Runs one user may have running at once.
    #[arg(long, env = "AGENTCAST_MAX_RUNS_PER_USER", default_value_t = 16)]
    pub max_runs_per_user: usize,

    /// Run events kept per user for resume.
    #[arg(long, env = "AGENTCAST_REPLAY_CAPACITY", default_value_t = 10_000)]
    pub replay_capacity: usize,

    /// Bytes of run events kept for resume per user (the newest win; at least the last
    /// event is always kept).
    #[arg(
        long,
        env = "AGENTCAST_REPLAY_USER_MAX_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    pub replay_user_max_bytes: usize,

    /// Bytes of run events kept for resume over all users. Past it, idle users' histories
    /// go first (oldest first), then the oldest events of the user holding the most.
    #[arg(
        long,
        env = "AGENTCAST_REPLAY_MAX_BYTES",
        default_value_t = 1024 * 1024 * 1024
    )]
    pub replay_max_bytes: usize,

    /// Oldest event kept for resume; a user with no connection and no run is forgotten
    /// after this.
    #[arg(long, env = "AGENTCAST_REPLAY_TTL_SECS", default_value_t = 600)]
    pub replay_ttl_secs: u64,

    /// Frames queued per connection before it counts as a slow consumer.
    #[arg(long, env = "AGENTCAST_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// How long a slow consumer has to read its close frame before its TCP connection is reset.
    #[arg(
        long,
        env = "AGENTCAST_SLOW_CONSUMER_GRACE_MS",
        default_value_t = 5_000
    )]
    pub slow_consumer_grace_ms: u64,

    /// Largest frame (or fragmented message) a client may send.
    #[arg(long, env = "AGENTCAST_MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,

    /// Redis shared by several agentcast nodes that serve as one (PROTOCOL.md section 10):
    /// `redis://HOST:PORT[/DB]`. Unset: routing and replay stay in this process.
    #[arg(long, env = "AGENTCAST_REDIS_URL")]
    pub redis_url: Option<String>,

    /// This node's name in logs, `/metrics` and run records (with `--redis-url`). Default:
    /// host name, process id and a random suffix.
    #[arg(long, env = "AGENTCAST_NODE_ID")]
    pub node_id: Option<String>,

    /// A node silent on Redis for this long is taken for lost: a surviving node ends its
    /// runs with `node_lost` (with `--redis-url`).
    #[arg(long, env = "AGENTCAST_NODE_TIMEOUT_MS", default_value_t = 10_000)]
    pub node_timeout_ms: u64,

    /// Events of this node's runs that may wait for an unreachable Redis; past it, runs end
    /// `failed` with code `unavailable` (with `--redis-url`).
    #[arg(long, env = "AGENTCAST_REDIS_MAX_PENDING", default_value_t = 50_000)]
    pub redis_max_pending: usize,

    /// Interval of server pings and `heartbeat` frames.
    #[arg(
        long,
        env = "AGENTCAST_HEARTBEAT_INTERVAL_MS",
        default_value_t = 10_000
    )]
    pub heartbeat_interval_ms: u64,

    /// A connection that sends nothing (not even a pong) for this long is closed.
    #[arg(long, env = "AGENTCAST_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,

    /// HTTP worker threads (each runs its share of the WebSocket sessions); 0 means one per core.
    #[arg(long, env = "AGENTCAST_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// On SIGTERM/SIGINT, how long running runs get to finish before they are cancelled.
    #[arg(long, env = "AGENTCAST_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,

    /// Runs one user may start per minute (in bursts of as many); more is `rate_limited`.
    #[arg(long, env = "AGENTCAST_RUNS_PER_MINUTE", default_value_t = 120)]
    pub runs_per_minute: u32,

    /// Connections (WebSocket and SSE) one user may hold at once; more are closed with 1008.
    #[arg(long, env = "AGENTCAST_MAX_CONNECTIONS_PER_USER", default_value_t = 32)]
    pub max_connections_per_user: usize,

    /// Web pages (origins like `https://app.example.com`, comma-separated) that may open
    /// `GET /v1/ws` and `GET /v1/events` in a browser, besides the server's own origin (and,
    /// in dev mode, loopback pages). `*` allows every page: then any site a user visits can
    /// open a stream with a token it got hold of.
    #[arg(
        long,
        env = "AGENTCAST_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGINS"
    )]
    pub allowed_origins: Vec<String>,

    /// An agent outside the server (PROTOCOL.md section 11) that users start like the server's
    /// own: on `start_run` the server POSTs the run to URL, which then publishes its events.
    /// Repeatable; the variable is a comma-separated list.
    #[arg(
        long = "webhook-agent",
        env = "AGENTCAST_WEBHOOK_AGENTS",
        value_delimiter = ',',
        value_name = "NAME=URL"
    )]
    pub webhook_agents: Vec<String>,

    /// A published run with no batch of events for this long ends `timed_out`.
    #[arg(long, env = "AGENTCAST_PUBLISH_IDLE_MS", default_value_t = 60_000)]
    pub publish_idle_ms: u64,

    /// Runs one publisher may have running at once, over all its users (per node): a
    /// publisher can create runs for any user id, and each holds memory until it ends.
    #[arg(long, env = "AGENTCAST_MAX_RUNS_PER_PUBLISHER", default_value_t = 1000)]
    pub max_runs_per_publisher: usize,

    /// Largest body of a publisher's request (a batch of events), in bytes.
    #[arg(long, env = "AGENTCAST_PUBLISH_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub publish_max_body_bytes: usize,

    /// This server's URL as webhook agents reach it (their `events_url`); by default
    /// `http://` and the address it is bound to.
    #[arg(long, env = "AGENTCAST_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Connections the server accepts at once, over all workers.
    #[arg(long, env = "AGENTCAST_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// An OpenAI-compatible Chat Completions server (PROTOCOL.md section 14), e.g.
    /// `http://127.0.0.1:11434/v1` for Ollama: the agent `llm` is offered only when this is set.
    #[arg(long, env = "AGENTCAST_LLM_BASE_URL", value_name = "URL")]
    pub llm_base_url: Option<String>,

    /// The model the `llm` agent asks (the request's `model`), e.g. `qwen3:0.6b`.
    #[arg(long, env = "AGENTCAST_LLM_MODEL")]
    pub llm_model: Option<String>,

    /// Sent to the model server as `Authorization: Bearer`; never logged.
    #[arg(long, env = "AGENTCAST_LLM_API_KEY", hide_env_values = true)]
    pub llm_api_key: Option<String>,

    /// The tools the model may call, comma-separated. Default: every tool but the fault
    /// tools (`fail`, `panic`).
    #[arg(
        long,
        env = "AGENTCAST_LLM_TOOLS",
        value_delimiter = ',',
        value_name = "TOOLS"
    )]
    pub llm_tools: Vec<String>,

    /// Model calls one `llm` run makes at most (each tool round is one more).
    #[arg(long, env = "AGENTCAST_LLM_MAX_STEPS", default_value_t = 8)]
    pub llm_max_steps: u32,

    /// Tools the user must approve (PROTOCOL.md section 12) before the model's call runs,
    /// comma-separated.
    #[arg(
        long,
        env = "AGENTCAST_LLM_APPROVE_TOOLS",
        value_delimiter = ',',
        value_name = "TOOLS"
    )]
    pub llm_approve_tools: Vec<String>,

    /// A model call that sends nothing (no response head, no byte of its stream) for this
    /// long ends the run `failed` (`llm_error`). Loading a model can take a while.
    #[arg(long, env = "AGENTCAST_LLM_IDLE_TIMEOUT_MS", default_value_t = 120_000)]
    pub llm_idle_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:8080".into(),
            jwt_secret: None,
            jwt_previous_secrets: Vec::new(),
            jwt_public_keys: Vec::new(),
            jwks_file: None,
            jwt_key_check_ms: 60_000,
            jwt_issuer: None,
            jwt_audience: None,
            run_timeout_ms: 300_000,
            interrupt_timeout_ms: 600_000,
            max_runs_per_user: 16,
            replay_capacity: 10_000,
            replay_ttl_secs: 600,
            replay_user_max_bytes: 16 * 1024 * 1024,
            replay_max_bytes: 1024 * 1024 * 1024,
            outbound_queue: 1024,
            slow_consumer_grace_ms: 5_000,
            max_frame_bytes: 65_536,
            redis_url: None,
            node_id: None,
            node_timeout_ms: 10_000,
            redis_max_pending: 50_000,
            heartbeat_interval_ms: 10_000,
            idle_timeout_ms: 30_000,
            workers: 0,
            drain_secs: 30,
            runs_per_minute: 120,
            max_connections_per_user: 32,
            allowed_origins: Vec::new(),
            webhook_agents: Vec::new(),
            publish_idle_ms: 60_000,
            max_runs_per_publisher: 1000,
            publish_max_body_bytes: 1024 * 1024,
            public_url: None,
            max_connections: 100_000,
            llm_base_url: None,
            llm_model: None,
            llm_api_key: None,
            llm_tools: Vec::new(),
            llm_max_steps: 8,
            llm_approve_tools: Vec::new(),
            llm_idle_timeout_ms: 120_000,
        }
    }
}

/// Secrets are shown as `[hidden]`: a configuration may end up in a log.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "[hidden]");
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("jwt_secret", &hidden(&self.jwt_secret))
            .field("jwt_previous_secrets", &self.jwt_previous_secrets.len())
            .field("jwt_public_keys", &self.jwt_public_keys)
            .field("jwks_file", &self.jwks_file)
            .field("jwt_key_check_ms", &self.jwt_key_check_ms)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("run_timeout_ms", &self.run_timeout_ms)
            .field("interrupt_timeout_ms", &self.interrupt_timeout_ms)
            .field("max_runs_per_user", &self.max_runs_per_user)
            .field("replay_capacity", &self.replay_capacity)
            .field("replay_user_max_bytes", &self.replay_user_max_bytes)
            .field("replay_max_bytes", &self.replay_max_bytes)
            .field("replay_ttl_secs", &self.replay_ttl_secs)
            .field("outbound_queue", &self.outbound_queue)
            .field("slow_consumer_grace_ms", &self.slow_consumer_grace_ms)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "[hidden]"))
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("workers", &self.workers)
            .field("drain_secs", &self.drain_secs)
            .field("runs_per_minute", &self.runs_per_minute)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("allowed_origins", &self.allowed_origins)
            .field("webhook_agents", &self.webhook_agents)
            .field("publish_idle_ms", &self.publish_idle_ms)
            .field("max_runs_per_publisher", &self.max_runs_per_publisher)
            .field("publish_max_body_bytes", &self.publish_max_body_bytes)
            .field("public_url", &self.public_url)
            .field("max_connections", &self.max_connections)
            .field("llm_base_url", &self.llm_base_url)
            .field("llm_model", &self.llm_model)
            .field("llm_api_key", &hidden(&self.llm_api_key))
            .field("llm_tools", &self.llm_tools)
            .field("llm_max_steps", &self.llm_max_steps)
            .field("llm_approve_tools", &self.llm_approve_tools)
            .field("llm_idle_timeout_ms", &self.llm_idle_timeout_ms)
            .finish()
    }
}

/// What is wrong with a configuration; the server refuses to start with any of these.
#[derive(Debug)]
pub enum ConfigError {
    BadBind(String),
    DevModeNotLoopback(SocketAddr),
    EmptySecret,
    /// A secret shorter than [`MIN_SECRET_BYTES`]: the flag and the secret's length.
    ShortSecret(&'static str, usize),
    /// `--jwt-previous-secrets` without a key of the server's own.
    PreviousSecretsAlone,
    /// A flag set to the empty string.
    Empty(&'static str),
    BadOrigin(BadOrigin),
    BadRedisUrl(String),
    BadNodeId,
    NodeTimeoutTooShort,
    Zero(&'static str),
    /// A `--webhook-agent` that is not `NAME=URL` with an http(s) URL: the entry and why.
    BadWebhookAgent(String, &'static str),
    /// `--webhook-agent` on a server that cannot sign its per-run tokens.
    WebhookWithoutSecret,
    BadPublicUrl(String),
    /// `--llm-base-url` that is not an http:// or https:// URL: the value and why.
    BadLlmBaseUrl(String, String),
    /// An `--llm-*` flag without `--llm-base-url`.
    LlmFlagAlone(&'static str),
    /// `--llm-base-url` without `--llm-model`.
    NoLlmModel,
    /// A tool named by `--llm-tools` or `--llm-approve-tools` that the model cannot call.
    UnknownLlmTool(&'static str, String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::BadBind(s) => {
                write!(f, "--bind {s:?} is not an address like 127.0.0.1:8080")
            }
            ConfigError::DevModeNotLoopback(a) => write!(
                f,
                "no --jwt-secret and no public key: dev mode serves loopback only, and {a} is \
                 not loopback; set AGENTCAST_JWT_SECRET (or a public key) or bind 127.0.0.1"
            ),
            ConfigError::EmptySecret => write!(f, "--jwt-secret is empty"),
            ConfigError::ShortSecret(flag, len) => write!(
                f,
                "{flag} has a secret of {len} bytes: it must be at least {MIN_SECRET_BYTES} \
                 (random bytes, e.g. `openssl rand -base64 48`)"
            ),
            ConfigError::PreviousSecretsAlone => write!(
                f,
                "--jwt-previous-secrets only verify tokens: set --jwt-secret, --jwt-public-key \
                 or --jwks-file too"
            ),
            ConfigError::Empty(name) => write!(f, "--{name} is empty"),
            ConfigError::BadOrigin(e) => write!(f, "{e}"),
            ConfigError::BadRedisUrl(why) => write!(
                f,
                "--redis-url is not a Redis URL like redis://127.0.0.1:6379/0: {why}"
            ),
            ConfigError::BadNodeId => write!(
                f,
                "--node-id must be 1 to 128 characters, with no white space or control characters"
            ),
            ConfigError::NodeTimeoutTooShort => write!(
                f,
                "--node-timeout-ms must be at least 100: nodes beat four times per timeout, and a \
                 shorter one takes live nodes for lost"
            ),
            ConfigError::Zero(name) => write!(f, "--{name} must be greater than 0"),
            ConfigError::BadWebhookAgent(entry, why) => {
                write!(f, "--webhook-agent {entry:?}: {why}")
            }
            ConfigError::WebhookWithoutSecret => write!(
                f,
                "--webhook-agent needs --jwt-secret (or dev mode): the server signs each \
                 webhook run's publisher token"
            ),
            ConfigError::BadPublicUrl(url) => write!(
                f,
                "--public-url {url:?} must be an http:// or https:// URL without a path, query \
                 or trailing slash, e.g. https://agentcast.example.com"
            ),
            ConfigError::BadLlmBaseUrl(url, why) => write!(
                f,
                "--llm-base-url {url:?} is not a URL like http://127.0.0.1:11434/v1: {why}"
            ),
            ConfigError::NoLlmModel => {
                write!(f, "--llm-base-url needs --llm-model (the model to ask)")
            }
            ConfigError::LlmFlagAlone(flag) => write!(
                f,
                "--{flag} configures the llm agent, which needs --llm-base-url"
            ),
            ConfigError::UnknownLlmTool(flag, tool) => write!(
                f,
                "--{flag} names {tool:?}, which is not a tool the model may call"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Checks the settings together and resolves the listen address.
    pub fn validate(&self) -> Result<SocketAddr, ConfigError> {
        let addr: SocketAddr = self
            .bind
            .parse()
            .map_err(|_| ConfigError::BadBind(self.bind.clone()))?;
        match &self.jwt_secret {
            Some(s) if s.is_empty() => return Err(ConfigError::EmptySecret),
            Some(_) => {}
            None if self.dev_mode() && !addr.ip().is_loopback() => {
                return Err(ConfigError::DevModeNotLoopback(addr))
            }
            None => {}
        }
        if let Some(len) = self
            .jwt_secret
            .as_ref()
            .map(String::len)
            .filter(|len| *len < MIN_SECRET_BYTES)
        {
            return Err(ConfigError::ShortSecret("--jwt-secret", len));
        }
        if self.jwt_previous_secrets.iter().any(String::is_empty) {
            return Err(ConfigError::Empty("jwt-previous-secrets"));
        }
        if let Some(short) = self
            .jwt_previous_secrets
            .iter()
            .find(|s| s.len() < MIN_SECRET_BYTES)
        {
            return Err(ConfigError::ShortSecret(
                "--jwt-previous-secrets",
                short.len(),
            ));
        }
        if !self.jwt_previous_secrets.is_empty() && self.dev_mode() {
            return Err(ConfigError::PreviousSecretsAlone);
        }
        for (name, v) in [
            ("jwt-issuer", &self.jwt_issuer),
            ("jwt-audience", &self.jwt_audience),
        ] {
            if v.as_deref().is_some_and(str::is_empty) {
                return Err(ConfigError::Empty(name));
            }
        }
        self.origin_policy().map_err(ConfigError::BadOrigin)?;
        if !self.webhook_urls()?.is_empty() && self.signer().is_none() {
            return Err(ConfigError::WebhookWithoutSecret);
        }
        if let Some(url) = &self.public_url {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if !rest.is_some_and(|host| !host.is_empty() && !host.contains(['/', '?', '#'])) {
                return Err(ConfigError::BadPublicUrl(url.clone()));
            }
        }
        if let Some(url) = &self.redis_url {
            agentcast_actors::redis::check_url(url).map_err(ConfigError::BadRedisUrl)?;
        }
        if self.node_timeout_ms < 100 {
            return Err(ConfigError::NodeTimeoutTooShort);
        }
        if let Some(id) = &self.node_id {
            let printable = id.chars().all(|c| !c.is_whitespace() && !c.is_control());
            if id.is_empty() || id.chars().count() > 128 || !printable {
                return Err(ConfigError::BadNodeId);
            }
        }
        self.validate_llm()?;
        for (name, v) in [
            ("run-timeout-ms", self.run_timeout_ms),
            ("interrupt-timeout-ms", self.interrupt_timeout_ms),
            ("node-timeout-ms", self.node_timeout_ms),
            ("redis-max-pending", self.redis_max_pending as u64),
            ("max-runs-per-user", self.max_runs_per_user as u64),
            ("replay-capacity", self.replay_capacity as u64),
            ("replay-ttl-secs", self.replay_ttl_secs),
            ("replay-user-max-bytes", self.replay_user_max_bytes as u64),
            ("replay-max-bytes", self.replay_max_bytes as u64),
            ("outbound-queue", self.outbound_queue as u64),
            ("max-frame-bytes", self.max_frame_bytes as u64),
            ("heartbeat-interval-ms", self.heartbeat_interval_ms),
            ("idle-timeout-ms", self.idle_timeout_ms),
            ("max-connections", self.max_connections as u64),
            ("jwt-key-check-ms", self.jwt_key_check_ms),
            ("runs-per-minute", self.runs_per_minute as u64),
            ("publish-idle-ms", self.publish_idle_ms),
            ("max-runs-per-publisher", self.max_runs_per_publisher as u64),
            ("publish-max-body-bytes", self.publish_max_body_bytes as u64),
            ("llm-max-steps", self.llm_max_steps as u64),
            ("llm-idle-timeout-ms", self.llm_idle_timeout_ms),
            (
                "max-connections-per-user",
                self.max_connections_per_user as u64,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(addr)
    }

    /// True when no key is configured (no secret, no public key): tokens are signed and
    /// checked with [`DEV_SECRET`].
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_keys.is_empty() && self.jwks_file.is_none()
    }

    /// The secret the server signs tokens with: `--jwt-secret`, or [`DEV_SECRET`] in dev mode.
    pub fn signing_secret(&self) -> Option<&str> {
        match &self.jwt_secret {
            Some(s) => Some(s),
            None if self.dev_mode() => Some(DEV_SECRET),
            None => None,
        }
    }

    /// What tokens are checked against: the signing secret, then the previous ones.
    pub fn key_settings(&self) -> KeySettings {
        KeySettings {
            secrets: self
                .signing_secret()
                .into_iter()
                .map(str::to_string)
                .chain(self.jwt_previous_secrets.iter().cloned())
                .collect(),
            public_key_files: self.jwt_public_keys.clone(),
            jwks_file: self.jwks_file.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
        }
    }

    /// Which pages may open streams (see [`crate::origins`]).
    pub fn origin_policy(&self) -> Result<OriginPolicy, BadOrigin> {
        OriginPolicy::new(&self.allowed_origins, self.dev_mode())
    }

    /// Signs tokens the server accepts; None when the server holds no secret to sign with.
    pub fn signer(&self) -> Option<Signer> {
        self.signing_secret().map(|secret| {
            Signer::new(
                secret,
                self.jwt_issuer.as_deref(),
                self.jwt_audience.as_deref(),
            )
        })
    }

    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }

    /// This node's id: `--node-id`, or host name, process id and a random suffix.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".into());
            format!(
                "{host}-{}-{}",
                std::process::id(),
                agentcast_actors::ids::random_id("", 6)
            )
        })
    }

    /// The configuration of the command line and `AGENTCAST_*` variables, as
    /// `agentcast serve` reads it (and exits with its usage on an error), for a crate that
    /// runs its own server.
    pub fn from_command_line() -> Config {
        #[derive(clap::Parser)]
        #[command(about = "an agentcast server", version)]
        struct Command {
            #[command(flatten)]
            config: Config,
        }
        <Command as clap::Parser>::parse().config
    }

    pub fn run_timeout(&self) -> Duration {
        Duration::from_millis(self.run_timeout_ms)
    }

    /// The webhook agents, by name: their URLs.
    pub fn webhook_urls(&self) -> Result<std::collections::HashMap<String, String>, ConfigError> {
        let mut urls = std::collections::HashMap::new();
        for entry in &self.webhook_agents {
            let bad = |why| ConfigError::BadWebhookAgent(entry.clone(), why);
            let (name, url) = entry
                .split_once('=')
                .ok_or_else(|| bad("it must be NAME=URL"))?;
            agentcast_actors::publish::check_agent_name(name)
                .map_err(|_| bad("NAME must be 1 to 64 printable characters"))?;
            let host = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if host.is_none_or(str::is_empty) {
                return Err(bad("URL must be http://... or https://..."));
            }
            if urls.insert(name.to_string(), url.to_string()).is_some() {
                return Err(bad("NAME is given twice"));
            }
        }
        Ok(urls)
    }

    /// The `llm` agent's flags on their own (the tools they name are checked against the
    /// catalog by [`Config::check_llm_tools`]).
    fn validate_llm(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.llm_base_url else {
            let alone = [
                ("llm-model", self.llm_model.is_some()),
                ("llm-api-key", self.llm_api_key.is_some()),
                ("llm-tools", !self.llm_tools.is_empty()),
                ("llm-approve-tools", !self.llm_approve_tools.is_empty()),
            ];
            return match alone.into_iter().find(|(_, set)| *set) {
                Some((flag, _)) => Err(ConfigError::LlmFlagAlone(flag)),
                None => Ok(()),
            };
        };
        check_base_url(url).map_err(|why| ConfigError::BadLlmBaseUrl(url.clone(), why))?;
        match &self.llm_model {
            None => return Err(ConfigError::NoLlmModel),
            Some(m) if m.is_empty() => return Err(ConfigError::Empty("llm-model")),
            Some(_) => {}
        }
        if self.llm_api_key.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::Empty("llm-api-key"));
        }
        Ok(())
    }

    /// The `llm` agent's settings, when `--llm-base-url` is set.
    pub fn llm_settings(&self) -> Option<LlmSettings> {
        let base_url = self.llm_base_url.clone()?;
        let names = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect()
        };
        let tools = names(&self.llm_tools);
        Some(LlmSettings {
            base_url,
            model: self.llm_model.clone().unwrap_or_default(),
            api_key: self.llm_api_key.clone(),
            tools: (!tools.is_empty()).then_some(tools),
            max_steps: self.llm_max_steps,
            approve_tools: names(&self.llm_approve_tools),
            idle_timeout: Duration::from_millis(self.llm_idle_timeout_ms),
        })
    }

    /// Every tool `--llm-tools` and `--llm-approve-tools` name must be one the model can call:
    /// a typo would otherwise silently offer nothing, or run a tool unasked.
    pub fn check_llm_tools(&self, toolbox: &Toolbox) -> Result<(), ConfigError> {
        let Some(settings) = self.llm_settings() else {
            return Ok(());
        };
        for tool in settings.tools.iter().flatten() {
            if !toolbox.contains(tool) {
                return Err(ConfigError::UnknownLlmTool("llm-tools", tool.clone()));
            }
        }
        let offered = |tool: &str| match &settings.tools {
            Some(names) => names.iter().any(|n| n == tool),
            None => !FAULT_TOOLS.contains(&tool),
        };
        for tool in &settings.approve_tools {
            if !toolbox.contains(tool) || !offered(tool) {
                return Err(ConfigError::UnknownLlmTool(
                    "llm-approve-tools",
                    tool.clone(),
                ));
            }
        }
        Ok(())
    }

    pub fn interrupt_timeout(&self) -> Duration {
        Duration::from_millis(self.interrupt_timeout_ms)
    }
}

/// An http:// or https:// URL with a host, and nothing after the path (the agent appends
/// `/chat/completions`).
fn check_base_url(url: &str) -> Result<(), String> {
    let uri: awc::http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("it must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("it has no host".into());
    }
    // A key in the URL would be logged with it (the start-up line names the URL).
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("it must not hold credentials: give the key with --llm-api-key".into());
    }
    if uri.query().is_some() || url.contains('#') {
        return Err("it must not have a query or a fragment".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["agentcast"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all) {
            Ok(cli) => cli.config,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn previous_secrets_are_comma_separated() {
        let c = parse(&["--jwt-secret", "s", "--jwt-previous-secrets", "a,b"]);
        assert_eq!(c.jwt_previous_secrets, vec!["a", "b"]);
        let settings = c.key_settings();
        assert_eq!(settings.secrets, vec!["s", "a", "b"]);
    }

    const LONG: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn secrets_of_fewer_than_32_bytes_are_refused() {
        let short = &LONG[..31];
        for args in [
            vec!["--jwt-secret", short],
            vec!["--jwt-secret", LONG, "--jwt-previous-secrets", short],
            vec![
                "--jwt-secret",
                LONG,
                "--jwt-previous-secrets",
                &format!("{LONG},{short}"),
            ],
        ] {
            let e = parse(&args).validate().expect_err("a short secret");
            assert!(
                matches!(e, ConfigError::ShortSecret(_, 31)),
                "{args:?}: {e}"
            );
            assert!(e.to_string().contains("at least 32"), "{e}");
        }
        assert!(parse(&["--jwt-secret", LONG]).validate().is_ok());
        // Bytes, not characters: 16 two-byte characters are 32 bytes.
        assert!(parse(&["--jwt-secret", &"é".repeat(16)]).validate().is_ok());
        // Dev mode has no secret to check.
        assert!(parse(&[]).validate().is_ok());
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let c = parse(&[
            "--jwt-secret",
            "hunter2-secret",
            "--jwt-previous-secrets",
            "old-one",
        ]);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("old-one"),
            "{shown}"
        );
    }

    #[test]
    fn empty_issuer_or_audience_is_refused() {
        for flag in ["--jwt-issuer", "--jwt-audience"] {
            let c = parse(&["--jwt-secret", LONG, flag, ""]);
            assert!(
                matches!(c.validate(), Err(ConfigError::Empty(_))),
                "{flag} \"\""
            );
        }
    }

    #[test]
    fn llm_flags_are_checked() {
        let ok = parse(&[
            "--llm-base-url",
            "http://127.0.0.1:11434/v1",
            "--llm-model",
            "m",
        ]);
        assert!(ok.validate().is_ok());
        assert_eq!(ok.llm_settings().map(|s| s.max_steps), Some(8));
        assert!(parse(&[]).llm_settings().is_none());
        for (args, want) in [
            (
                vec!["--llm-base-url", "ftp://x/v1", "--llm-model", "m"],
                "http://",
            ),
            (
                vec!["--llm-base-url", "localhost:11434", "--llm-model", "m"],
                "--llm-base-url",
            ),
            (
                vec!["--llm-base-url", "http://x/v1?a=1", "--llm-model", "m"],
                "query",
            ),
            (vec!["--llm-base-url", "http://x/v1"], "--llm-model"),
            (
                vec!["--llm-base-url", "https://u:sk@x/v1", "--llm-model", "m"],
                "credentials",
            ),
            (vec!["--llm-model", "m"], "needs --llm-base-url"),
            (vec!["--llm-approve-tools", "clock"], "needs --llm-base-url"),
            (
                vec![
                    "--llm-base-url",
                    "http://x/v1",
                    "--llm-model",
                    "m",
                    "--llm-max-steps",
                    "0",
                ],
                "--llm-max-steps must be greater than 0",
            ),
            (
                vec![
                    "--llm-base-url",
                    "http://x/v1",
                    "--llm-model",
                    "m",
                    "--llm-api-key",
                    "",
                ],
                "--llm-api-key is empty",
            ),
        ] {
            let e = parse(&args).validate().expect_err("a bad llm flag");
            assert!(e.to_string().contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn the_llm_api_key_is_not_in_debug_output() {
        let c = parse(&[
            "--llm-base-url",
            "http://127.0.0.1:1/v1",
            "--llm-model",
            "m",
            "--llm-api-key",
            "sk-hunter2",
        ]);
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{:?}", c.llm_settings()).contains("hunter2"));
    }
}
