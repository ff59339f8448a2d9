//! Putting the server together: the arbiters (agent runs and tools each get their own
//! thread, so no agent or tool can stall a socket), the catalog, the registry, the HTTP
//! workers, and the orderly stop (runs end, sessions close with 1001, then the listener).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};
use agentcast_actors::agents::llm::Llm;
use agentcast_actors::builtin;
use agentcast_actors::catalog::CatalogBuilder;
use agentcast_actors::metrics::Metrics;
use agentcast_actors::published_run::{MintRunToken, WebhookAgents};
use agentcast_actors::redis::RedisConfig;
use agentcast_actors::registry::{ConnectionRegistry, RegistrySettings};
use agentcast_actors::{Agent, Tool};

use agentcast_actors::router::{Router, Shutdown};
use agentcast_actors::session::SessionSettings;

use crate::auth::Signer;
use crate::config::Config;
use crate::keys::KeyStore;
use crate::limits::{self, ConnectionCounter};
use crate::routes::{self, AppState};
use crate::{auth, origins, socket};

/// Commands one connection may send per second, and in a burst.
const COMMANDS_PER_SEC: u32 = 50;
const COMMAND_BURST: u32 = 100;

/// A server that is bound and serving, not yet stopped.
pub struct Started {
    addrs: Vec<SocketAddr>,
    server: actix_web::dev::Server,
    state: web::Data<AppState>,
    drain: Duration,
    arbiters: Vec<Arbiter>,
}

/// Builds and binds the server. Must run inside an actix `System`.
pub async fn start(config: Config, offered: CatalogBuilder) -> io::Result<Started> {
    let bind = config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    if config.dev_mode() {
        log::warn!(
            "DEV MODE: no --jwt-secret, tokens are signed with a well-known secret and \
             POST /v1/dev/token hands them out to anyone. Serving loopback only. \
             Set AGENTCAST_JWT_SECRET for anything else."
        );
    }
    let keys = Arc::new(
        KeyStore::load(config.key_settings())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("key file {e}")))?,
    );
    if keys.has_files() {
        // Registered before the server answers anything, so that a SIGHUP sent once it is up
        // is never the default action (which ends the process).
        let hangup = match actix_web::rt::signal::unix::signal(
            actix_web::rt::signal::unix::SignalKind::hangup(),
        ) {
            Ok(h) => Some(h),
            Err(e) => {
                log::warn!(
                    "cannot watch SIGHUP ({e}); key files are reloaded when they change only"
                );
                None
            }
        };
        let every = Duration::from_millis(config.jwt_key_check_ms);
        actix_web::rt::spawn(crate::keys::watch(keys.clone(), every, hangup));
    }
    let agents = Arbiter::new();
    let tools = Arbiter::new();
    let mut offered = offered;
    if let Some(llm) = config.llm_settings() {
        log::info!(
            "agent llm: model {:?} at {}, {} model calls per run at most",
            llm.model,
            llm.base_url,
            llm.max_steps
        );
        offered = offered.agent(Llm::new(llm));
    }
    let catalog = Arc::new(offered.start(&tools.handle()));
    config
        .check_llm_tools(catalog.tools())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let settings = RegistrySettings {
        replay_capacity: config.replay_capacity,
        replay_ttl: Duration::from_secs(config.replay_ttl_secs),
        replay_user_max_bytes: config.replay_user_max_bytes,
        replay_max_bytes: config.replay_max_bytes,
        max_runs_per_user: config.max_runs_per_user,
        run_timeout: config.run_timeout(),
        interrupt_timeout: config.interrupt_timeout(),
        publish_idle: Duration::from_millis(config.publish_idle_ms),
        max_runs_per_publisher: config.max_runs_per_publisher,
        webhooks: webhook_agents(&config, &catalog)?,
        slow_consumer_grace: Duration::from_millis(config.slow_consumer_grace_ms),
        shutdown_wait: Duration::from_secs(10),
        runs_per_minute: config.runs_per_minute,
        max_connections_per_user: config.max_connections_per_user,
    };
    let webhook_base = settings.webhooks.base_url.clone();
    let mut webhook_names: Vec<String> = settings.webhooks.urls.keys().cloned().collect();
    webhook_names.sort();
    let registry = match &config.redis_url {
        None => {
            ConnectionRegistry::new(settings, metrics.clone(), catalog.clone(), agents.handle())
                .start()
        }
        Some(url) => {
            let node_id = config.node_id();
            crate::logging::set_node(&node_id);
            metrics.node_info.with_label_values(&[&node_id]).set(1);
            log::info!("node {node_id}: events go through Redis (section 10)");
            let redis = RedisConfig {
                url: url.clone(),
                node_id: node_id.into(),
                process: agentcast_actors::ids::random_id("", 12).into(),
                node_timeout: Duration::from_millis(config.node_timeout_ms),
                log_capacity: config.replay_capacity,
                log_max_bytes: config.replay_user_max_bytes,
                log_ttl: Duration::from_secs(config.replay_ttl_secs),
                // A run's record must outlive the longest quiet spell between two of its
                // events: its running time, or one question waiting to expire.
                run_timeout: config.run_timeout() + config.interrupt_timeout(),
                max_pending: config.redis_max_pending,
            };
            ConnectionRegistry::start_shared(
                settings,
                metrics.clone(),
                catalog.clone(),
                agents.handle(),
                redis,
            )
            .map_err(|e| io::Error::other(e.to_string()))?
        }
    };
    let state = web::Data::new(AppState {
        router: Router::new(registry),
        catalog,
        sessions: SessionSettings {
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
            outbound_queue: config.outbound_queue,
            max_frame_bytes: config.max_frame_bytes,
            commands_per_sec: COMMANDS_PER_SEC,
            command_burst: COMMAND_BURST,
            metrics: metrics.clone(),
        },
        metrics,
        keys,
        signer: config.signer(),
        origins: config
            .origin_policy()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?,
        draining: AtomicBool::new(false),
        webhook_agents: webhook_names,
        publish_max_body: config.publish_max_body_bytes,
    });
    let connections = ConnectionCounter::new(config.max_connections, state.metrics.clone());
    let dev_mode = config.dev_mode();
    let workers = config.worker_count();
    let max_body = config.max_frame_bytes;
    let app_state = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .wrap(actix_web::middleware::from_fn(
                routes::refuse_while_draining,
            ))
            .wrap(actix_web::middleware::from_fn(origins::check_origin))
            .wrap(actix_web::middleware::from_fn(limits::refuse_oversized))
            .wrap(actix_web::middleware::from_fn(limits::refuse_when_full))
            .configure(|cfg| routes::configure(cfg, dev_mode, max_body))
    })
    .workers(workers)
    // Ours (the guards counted in on_connect) is the limit that answers; actix's, per worker,
    // only bounds the over-limit connections that linger.
    .max_connections(limits::actix_max_connections(
        config.max_connections,
        workers,
    ))
    .on_connect(socket::on_connect_counted(connections))
    // Notice at once when a client goes away mid-response (an SSE stream otherwise only
    // learns it at its next write).
    .h1_allow_half_closed(false)
    .disable_signals()
    .shutdown_timeout(5)
    .bind(bind)?;
    let addrs = server.addrs();
    if let Some(first) = addrs.first() {
        let base = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{first}"));
        // Set once, here; a second set cannot happen.
        let _ = webhook_base.set(base);
    }
    // Tools parse "listening on [ADDR" to find the port of a server bound to :0.
    log::info!(
        "agentcast listening on {addrs:?}: {workers} workers, run timeout {} ms, {} runs and {} \
         connections per user, {} run starts per minute, replay {} events / {} bytes per user / {} s, {} bytes in all, outbound queue {}, \
         slow-consumer grace {} ms, max frame {} bytes, heartbeat {} ms, idle timeout {} ms, drain {} s, \
         {} connections at most, {}",
        config.run_timeout_ms,
        config.max_runs_per_user,
        config.max_connections_per_user,
        config.runs_per_minute,
        config.replay_capacity,
        config.replay_user_max_bytes,
        config.replay_ttl_secs,
        config.replay_max_bytes,
        config.outbound_queue,
        config.slow_consumer_grace_ms,
        config.max_frame_bytes,
        config.heartbeat_interval_ms,
        config.idle_timeout_ms,
        config.drain_secs,
        config.max_connections,
        describe_keys(&config),
    );
    Ok(Started {
        addrs,
        server: server.run(),
        state,
        drain: Duration::from_secs(config.drain_secs),
        arbiters: vec![agents, tools],
    })
}

/// The keys in force, for the start-up line (never a secret itself).
/// The webhook agents of `--webhook-agent`, with the signer of their per-run tokens.
fn webhook_agents(
    config: &Config,
    catalog: &agentcast_actors::catalog::Catalog,
) -> io::Result<WebhookAgents> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let urls = config.webhook_urls().map_err(|e| invalid(e.to_string()))?;
    if let Some(name) = urls.keys().find(|name| catalog.agent(name).is_some()) {
        return Err(invalid(format!(
            "--webhook-agent {name}: the server already has an agent of that name"
        )));
    }
    let mint = config.signer().map(|signer| {
        let mint: MintRunToken = Arc::new(move |run_id: &str, valid_for: Duration| {
            let exp = crate::auth::now_unix() + valid_for.as_secs() + 1;
            signer.sign_publisher(&format!("run:{run_id}"), exp, Some(run_id))
        });
        mint
    });
    Ok(WebhookAgents {
        urls,
        mint,
        base_url: Default::default(),
    })
}

fn describe_keys(config: &Config) -> String {
    if config.dev_mode() {
        return "DEV MODE".into();
    }
    let mut parts = Vec::new();
    if config.jwt_secret.is_some() {
        parts.push("HS256 secret set".to_string());
    }
    if !config.jwt_previous_secrets.is_empty() {
        parts.push(format!(
            "{} previous secrets",
            config.jwt_previous_secrets.len()
        ));
    }
    if !config.jwt_public_keys.is_empty() {
        parts.push(format!("public keys {:?}", config.jwt_public_keys));
    }
    if let Some(jwks) = &config.jwks_file {
        parts.push(format!("JWKS {}", jwks.display()));
    }
    if let Some(iss) = &config.jwt_issuer {
        parts.push(format!("issuer {iss:?}"));
    }
    if let Some(aud) = &config.jwt_audience {
        parts.push(format!("audience {aud:?}"));
    }
    parts.join(", ")
}

impl Started {
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Serves until `stop` resolves, then stops in order: running runs get the drain time
    /// (`--drain-secs`, unless `stop` gives another) and then end with `agent_completed`,
    /// every connection gets what was queued for it and close 1001, and the listener shuts.
    pub async fn run_until(
        self,
        stop: impl Future<Output = Option<Duration>> + 'static,
    ) -> io::Result<()> {
        let handle = self.server.handle();
        let state = self.state;
        let configured_drain = self.drain;
        actix_web::rt::spawn(async move {
            let drain = stop.await.unwrap_or(configured_drain);
            log::info!("stopping: refusing new connections and runs, draining running runs");
            state
                .draining
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if state
                .router
                .shutdown
                .send(Shutdown { drain })
                .await
                .is_err()
            {
                log::error!("the registry was gone before shutdown");
            }
            handle.stop(true).await;
        });
        let result = self.server.await;
        for arbiter in self.arbiters {
            arbiter.stop();
            let _ = arbiter.join();
        }
        log::info!("stopped");
        result
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination() {
    use actix_web::rt::signal;
    match signal::unix::signal(signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            log::warn!("cannot watch SIGTERM ({e}); stopping on Ctrl-C only");
            let _ = signal::ctrl_c().await;
        }
    }
}

/// Runs the server with the built-in agents and tools in this thread until SIGINT or
/// SIGTERM: `agentcast serve`.
pub fn serve(config: Config) -> io::Result<()> {
    Server::builder(config).serve()
}

/// agentcast as a library: a server with your own agents and tools beside (or instead of)
/// the built-in ones. `agentcast serve` is `Server::builder(config).serve()`.
///
/// ```no_run
/// # use agentcast::{Agent, AgentError, AgentRun, Config, Server};
/// # struct Weather;
/// # #[agentcast::async_trait]
/// # impl Agent for Weather {
/// #     fn name(&self) -> &str { "weather" }
/// #     fn description(&self) -> &str { "" }
/// #     async fn run(self: std::sync::Arc<Self>, _: AgentRun, _: serde_json::Value) -> Result<serde_json::Value, AgentError> { Ok(serde_json::Value::Null) }
/// # }
/// Server::builder(Config::default())
///     .without_fault_tools()
///     .agent(Weather)
///     .serve()
///     .expect("the server stopped with an error");
/// ```
pub struct Server;

impl Server {
    /// A server of `config` offering the built-in agents and tools, to which
    /// [`ServerBuilder::agent`] and [`ServerBuilder::tool`] add yours.
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            builtins: true,
            fault_tools: true,
            offered: CatalogBuilder::new(),
        }
    }
}

/// What a server will offer; see [`Server::builder`].
pub struct ServerBuilder {
    config: Config,
    builtins: bool,
    fault_tools: bool,
    offered: CatalogBuilder,
}

impl ServerBuilder {
    /// Offers an agent; one of the same name as a built-in replaces it.
    pub fn agent(mut self, agent: impl Agent) -> Self {
        self.offered = self.offered.agent(agent);
        self
    }

    /// Offers a tool; `make` builds a fresh instance at start and after every panic of it.
    pub fn tool<T, F>(mut self, make: F) -> Self
    where
        T: Tool,
        F: Fn() -> T + Send + Sync + 'static,
    {
        self.offered = self.offered.tool(make);
        self
    }

    /// Leaves out the tools that exist for fault tests (`fail`, `panic`).
    pub fn without_fault_tools(mut self) -> Self {
        self.fault_tools = false;
        self
    }

    /// Leaves out every built-in agent and tool: the server offers only yours (and `llm`,
    /// when `--llm-base-url` configures it).
    pub fn without_builtins(mut self) -> Self {
        self.builtins = false;
        self
    }

    fn catalog(self) -> (Config, CatalogBuilder) {
        let mut offered = CatalogBuilder::new();
        if self.builtins {
            offered = builtin::catalog();
            if self.fault_tools {
                offered = builtin::fault_tools(offered);
            }
        }
        (self.config, offered.extend(self.offered))
    }

    /// Runs the server in this thread until SIGINT or SIGTERM, then stops in order.
    pub fn serve(self) -> io::Result<()> {
        let (config, offered) = self.catalog();
        actix::System::new().block_on(async move {
            let stop = async {
                termination().await;
                None
            };
            start(config, offered).await?.run_until(stop).await
        })
    }

    /// Starts the server on a thread of its own and returns once it listens.
    pub fn spawn(self) -> io::Result<RunningServer> {
        let (config, offered) = self.catalog();
        spawn_with(config, offered)
    }
}

/// A server on its own thread, for tests and embedding.
pub struct RunningServer {
    addr: SocketAddr,
    signer: Option<Signer>,
    /// Carries the drain time to stop with (`None`: the configured one).
    stop: Option<tokio::sync::oneshot::Sender<Option<Duration>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts a server with the built-in agents and tools on a thread of its own and returns once
/// it is listening.
pub fn spawn(config: Config) -> io::Result<RunningServer> {
    Server::builder(config).spawn()
}

fn spawn_with(config: Config, offered: CatalogBuilder) -> io::Result<RunningServer> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let signer = config.signer();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Option<Duration>>();
    let thread = std::thread::Builder::new()
        .name("agentcast-server".into())
        .spawn(move || {
            actix::System::new().block_on(async move {
                match start(config, offered).await {
                    Ok(started) => {
                        let _ = ready_tx.send(Ok(started.addrs()[0]));
                        if let Err(e) = started
                            .run_until(async move {
                                // A dropped handle stops without draining.
                                stop_rx.await.unwrap_or(Some(Duration::ZERO))
                            })
                            .await
                        {
                            log::error!("server ended with {e}");
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
        })?;
    match ready_rx.recv() {
        Ok(Ok(addr)) => Ok(RunningServer {
            addr,
            signer,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(io::Error::other("the server thread ended before listening")),
    }
}

impl RunningServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// A token for `user`, valid for an hour; None when the server holds no secret to sign
    /// with (only public keys are configured).
    pub fn try_token(&self, user: &str) -> Option<String> {
        self.signer
            .as_ref()
            .map(|s| s.sign(user, auth::now_unix() + 3600))
    }

    /// A token for `user`, valid for an hour.
    ///
    /// # Panics
    /// When the server holds no secret to sign with (see [`RunningServer::try_token`]).
    pub fn token(&self, user: &str) -> String {
        match self.try_token(user) {
            Some(token) => token,
            None => panic!("this server verifies public-key tokens only: it cannot sign one"),
        }
    }

    /// Stops in order, as on SIGTERM (see [`Started::run_until`]), and waits for the server
    /// thread.
    pub fn stop(mut self) {
        self.shut(None);
    }

    fn shut(&mut self, drain: Option<Duration>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(drain);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Dropping a running server stops it without a drain: running runs are cancelled at once
/// (still with their `agent_completed`). `stop` drains.
impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shut(Some(Duration::ZERO));
    }
}
