//! The `agentcast` command: `serve` (the default), `token` and `watch` (`src/watch.rs`).

mod watch;

use std::process::ExitCode;

use agentcast::config::{DEV_SECRET, MIN_SECRET_BYTES};
use agentcast::{auth, Config};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "agentcast",
    version,
    about = "Streams what AI agents do, live, to the people chatting with them"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: `serve` with these settings.
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(Box<Config>),
    /// Print a token for USER signed with the configured secret.
    Token {
        /// The user id (the token's `sub`).
        user: String,
        /// How long the token is valid.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// A publisher's token (PROTOCOL.md section 11): USER names the publishing service,
        /// which may then publish runs for any user.
        #[arg(long)]
        publisher: bool,
        #[arg(long, env = "AGENTCAST_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
        /// The `iss` the server checks (`serve --jwt-issuer`).
        #[arg(long, env = "AGENTCAST_JWT_ISSUER")]
        jwt_issuer: Option<String>,
        /// The `aud` the server checks (`serve --jwt-audience`).
        #[arg(long, env = "AGENTCAST_JWT_AUDIENCE")]
        jwt_audience: Option<String>,
        /// Read only to tell that this configuration cannot sign (`serve --jwt-public-key`).
        #[arg(
            long = "jwt-public-key",
            env = "AGENTCAST_JWT_PUBLIC_KEY",
            value_delimiter = ',',
            value_name = "FILE",
            hide = true
        )]
        jwt_public_keys: Vec<std::path::PathBuf>,
        /// Read only to tell that this configuration cannot sign (`serve --jwks-file`).
        #[arg(long, env = "AGENTCAST_JWKS_FILE", value_name = "FILE", hide = true)]
        jwks_file: Option<std::path::PathBuf>,
    },
    /// Print a user's frames as they arrive, one JSON per line; with AGENT and INPUT, start a
    /// run and exit when it completes.
    #[command(after_help = WATCH_EXIT_CODES)]
    Watch(watch::WatchArgs),
}

const WATCH_EXIT_CODES: &str = "\
Exit status: the started run's status: 0 succeeded, 1 failed, 2 cancelled, 3 timed_out;
4 the server refused to start it; 5 no connection, or it ended before the run completed;
64 a bad command line; 130 Ctrl-C.";

fn main() -> ExitCode {
    agentcast::logging::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `watch` exits 2 for a cancelled run: its usage errors have their own code.
            let watching = std::env::args_os().nth(1).is_some_and(|a| a == "watch");
            return match e.exit_code() {
                0 => ExitCode::SUCCESS,
                _ if watching => ExitCode::from(watch::EXIT_USAGE),
                code => ExitCode::from(u8::try_from(code).unwrap_or(2)),
            };
        }
    };
    match cli.command {
        Some(Command::Watch(args)) => watch::main(args),
        Some(Command::Token {
            user,
            ttl_secs,
            publisher,
            jwt_secret,
            jwt_issuer,
            jwt_audience,
            jwt_public_keys,
            jwks_file,
        }) => {
            if let Err(e) = auth::check_user_id(&user) {
                eprintln!("agentcast: USER: {e}");
                return ExitCode::from(2);
            }
            let secret = match jwt_secret {
                Some(secret) if secret.len() < MIN_SECRET_BYTES => {
                    eprintln!(
                        "agentcast: --jwt-secret has {} bytes: it must be at least \
                         {MIN_SECRET_BYTES} (the server refuses a shorter one)",
                        secret.len()
                    );
                    return ExitCode::from(2);
                }
                Some(secret) => secret,
                None if !jwt_public_keys.is_empty() || jwks_file.is_some() => {
                    eprintln!(
                        "agentcast: cannot sign: this configuration verifies public-key tokens \
                         only (--jwt-public-key / --jwks-file) and has no --jwt-secret. Sign \
                         tokens with the private key of your identity provider, or set \
                         AGENTCAST_JWT_SECRET."
                    );
                    return ExitCode::from(2);
                }
                None => {
                    eprintln!(
                        "agentcast: no --jwt-secret; this token only works on a dev-mode server"
                    );
                    DEV_SECRET.to_string()
                }
            };
            let signer = auth::Signer::new(&secret, jwt_issuer.as_deref(), jwt_audience.as_deref());
            let exp = auth::now_unix() + ttl_secs;
            let token = if publisher {
                signer.sign_publisher(&user, exp, None)
            } else {
                signer.sign(&user, exp)
            };
            println!("{token}");
            ExitCode::SUCCESS
        }
        Some(Command::Serve(config)) => run(*config),
        None => run(cli.serve),
    }
}

/// Each connection holds two file descriptors (its socket and the duplicate kept to reset a
/// slow consumer): raise the soft open-file limit to the hard one so connections, not the
/// default 1024, set the ceiling.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                log::info!(
                    "open-file limit raised from {before} to {} (about {} connections)",
                    lim.rlim_cur,
                    lim.rlim_cur / 2
                );
            }
        }
    }
}

fn run(config: Config) -> ExitCode {
    raise_open_file_limit();
    // Panics in agents and tools are caught and reported as events; this puts the details in
    // the log instead of on bare stderr.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log::error!("panic in thread {}: {info}", thread.name().unwrap_or("?"));
    }));
    match agentcast::serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("agentcast: {e}");
            eprintln!("agentcast: {e}");
            ExitCode::FAILURE
        }
    }
}
