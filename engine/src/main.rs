//! `herald`: the notification engine's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald_engine::{Config, Herald, app, telemetry};

/// mimalloc instead of glibc's allocator: the engine allocates and frees small buffers across
/// threads (tokio workers, SQLite worker threads), where glibc's arenas spend a fifth of the CPU
/// (`herald bench`: 2,824 → 3,480–3,719 notifications/s, see docs/performance.md, *What
/// changed*). The crate's `override` feature makes `malloc` and `free` mimalloc's too, so SQLite's
/// own allocations (C code, which the global allocator does not reach) leave glibc as well.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Herald: a notification engine on NATS JetStream.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (values from `HERALD_*` variables win).
    #[arg(short, long, env = "HERALD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the delivery engine until SIGINT/SIGTERM.
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective configuration (secrets omitted, the routing rules in force included)
    /// and exit.
    Config,
    /// Measure end-to-end throughput and latency against instant sinks.
    Bench(herald_engine::bench::BenchArgs),
    /// Manage API keys (applies pending migrations first).
    #[command(subcommand)]
    Apikey(herald_engine::apikey::ApiKeyCommand),
    /// Send one notification through a running Herald's API and print its answer; `--wait` for
    /// the outcome (exit 0 sent, 1 error, 3 not sent, 4 still pending).
    Send(Box<herald_engine::send_cli::SendArgs>),
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let mut loaded = Config::load(cli.config.as_deref()).context("cannot load configuration")?;
    if matches!(cli.command, Command::Bench(_)) {
        // The bench prints its own progress; the engine's info logs would drown it.
        loaded.config.log.level = "warn".into();
    }
    telemetry::init(&loaded.config.log);
    // Every command, `herald config` too: a misspelt key is what that one is run to find.
    loaded.log_warnings();
    let config = loaded.config;
    disable_transparent_huge_pages();
    match cli.command {
        Command::Send(args) => return herald_engine::send_cli::run(*args, &config).await,
        Command::Serve => serve(config).await?,
        Command::Migrate => {
            app::migrate(&config).await?;
            tracing::info!(database = %app::redact(&config.database.url), "migrations applied");
        }
        Command::Bench(args) => {
            herald_engine::bench::run(args, config).await?;
        }
        Command::Apikey(command) => {
            let db = app::migrate(&config).await?;
            herald_engine::apikey::run(&db, command).await?;
        }
        Command::Config => println!("{}", toml::to_string_pretty(&config.shown()?)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// Transparent huge pages off for this process (and for the `nats-server` that `herald bench`
/// starts, which inherits it), as Redis does. mimalloc asks for huge pages on its arenas
/// (`MADV_HUGEPAGE`), so the first touch of any 2 MiB of them faulted in a whole huge page, zeroed
/// (and, where the kernel's THP defrag setting is `madvise`, Debian's default, compacted for
/// first): the kernel's page zeroing was 17.6% of all CPU samples of a `herald bench` run. Without
/// them, 7 interleaved pairs on SQLite ran 16–36% faster, with half the system time and a fifth
/// less memory (docs/performance.md, *What changed*).
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(err) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(error = %err, "cannot turn transparent huge pages off for this process");
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let herald = Herald::start(config).await?;
    let base = format!("http://{}", herald.http_addr());
    tracing::info!("Herald is running");
    println!("Herald is running:");
    println!("  Dashboard    {base}/");
    println!("  API          {base}/api/v1");
    println!("  Swagger UI   {base}/api/docs");
    println!("  OpenAPI spec {base}/api/openapi.json");
    println!("  Health       {base}/health");
    println!("  Metrics      {base}/metrics");
    tokio::select! {
        () = shutdown_signal() => {}
        () = herald.engine_stopped() => {
            // Nothing delivers any more; serving HTTP on would accept sends that wait until a
            // restart. Unacked commands are redelivered, leases age out.
            tracing::error!("the delivery engine stopped; exiting for a restart");
            anyhow::bail!(
                "the delivery engine stopped (its supervisor failed, see the log above); \
                 restart herald"
            );
        }
    }
    tracing::info!("shutting down");
    tokio::select! {
        result = herald.shutdown() => result,
        () = shutdown_signal() => {
            // The handler installed for the first signal keeps the default action (exit) from
            // the second: without this, Ctrl-C would do nothing until the grace period ends.
            // Exited here, not returned from: dropping the runtime would wait for its tasks.
            tracing::warn!(
                "a second signal during the shutdown: exiting at once; deliveries in flight are \
                 abandoned, and their commands redelivered (sent again if they went out)"
            );
            std::process::exit(1)
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
