//! The `ms2m` operator CLI (feature `cli`): look at and act on a running
//! service from a shell: its owner and open migrations, snapshots, lag and
//! dead letters, and drive or recover migrations. It lives in the library
//! (not only in the binary) so its parts are unit-tested and its typed
//! errors ([`CliError`]) documented; library users do not compile it.
//!
//! ```text
//! ms2m status                              owner, epoch, undecided migrations, latest snapshots, lag
//! ms2m migrate --to B [--strategy ms2m]    coordinate a migration; progress on stderr, then the report
//! ms2m recover                             decide every undecided migration
//! ms2m snapshots list|inspect ID|verify    the snapshot topic (envelope and checksums, not the state)
//! ms2m dead-letters list|replay --topic T  dead letters, and putting them back into the input
//! ms2m fleet                               a partitioned service's hosts and tasks (owner, assignment)
//! ms2m drain HOST [--wait 60s]             move every task off a host (partitioned services)
//! ms2m rebalance                           spread tasks evenly over the live hosts now
//! ```
//!
//! Every command takes `--json`. Settings: see [`config`].

pub mod config;
pub mod dead_letters;
pub mod error;
pub mod fleet;
pub mod migrate;
pub mod output;
pub mod records;
pub mod snapshots;
pub mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use config::{GlobalArgs, Settings};
pub use error::CliError;

use crate::KafkaCluster;

/// `ms2m`: operate stateful ms2m services on Kafka.
#[derive(Parser, Clone, Debug, PartialEq, Eq)]
#[command(
    name = "ms2m",
    version,
    about = "Operate stateful ms2m services on Kafka: ownership, migrations, snapshots, dead letters",
    after_help = "Settings are taken from flags, then the environment (MS2M_BOOTSTRAP_SERVERS, MS2M_SERVICE, \
                  MS2M_CONFIG), then the --config file. Exit codes: 0 ok, 1 failed, 2 bad invocation or configuration."
)]
pub struct Cli {
    /// Connection and naming options.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Owner and epoch, lease, nodes named on the channel, undecided migrations, latest snapshots, lag per input partition
    Status,
    /// Coordinate a migration between two running instances, then print its report
    Migrate(migrate::MigrateArgs),
    /// Decide every migration a dead coordinator left undecided
    Recover(migrate::RecoverArgs),
    /// Stored snapshots: list, inspect, verify (envelope and checksums only:
    /// decoding the state needs the service's own code)
    #[command(subcommand)]
    Snapshots(snapshots::SnapshotsCommand),
    /// Dead-letter topics: list, replay into the input; skip a poison input record (audited)
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(dead_letters::DeadLettersCommand),
    /// A partitioned service's hosts and tasks: liveness, drains, each task's owner and assignment
    Fleet(fleet::FleetArgs),
    /// Move every task off a host of a partitioned service (its leader moves them with MS2M)
    Drain(fleet::DrainArgs),
    /// Spread a partitioned service's tasks evenly over its live hosts now
    Rebalance(fleet::RebalanceArgs),
}

/// The binary's `main`: parses the arguments, runs the command, reports a
/// failure on stderr (and, with `--json`, as `{"error": …}` on stdout
/// unless the command's own output already lists what failed), so stdout
/// always holds exactly one JSON document.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.json && !e.already_reported() {
                println!(
                    "{}",
                    serde_json::json!({ "error": e.chain(), "exit_code": e.exit_code() })
                );
            }
            eprintln!("error: {}", e.chain());
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs from the library go to stderr, `warn` and up unless `RUST_LOG` says otherwise.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one parsed command.
pub async fn run(cli: &Cli) -> Result<(), CliError> {
    let settings = Settings::resolve(&cli.global)?;
    let cluster = KafkaCluster::connect(settings.kafka_config())?;
    match &cli.command {
        Command::Status => status::run(&cluster, cli.json).await,
        Command::Migrate(args) => migrate::migrate(&cluster, args, cli.json).await,
        Command::Recover(args) => migrate::recover(&cluster, args, cli.json).await,
        Command::Snapshots(command) => snapshots::run(&cluster, command, cli.json).await,
        Command::DeadLetters(command) => dead_letters::run(&cluster, command, cli.json).await,
        Command::Fleet(args) => fleet::fleet(&cluster, args, cli.json).await,
        Command::Drain(args) => fleet::drain(&cluster, args, cli.json).await,
        Command::Rebalance(args) => fleet::rebalance(&cluster, args, cli.json).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ms2m").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_before_or_after_the_command() {
        let cli = parse(&[
            "status",
            "--json",
            "-s",
            "orders",
            "-X",
            "security.protocol=SSL",
            "-b",
            "h:9092",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.global.service.as_deref(), Some("orders"));
        assert_eq!(
            cli.global.property,
            [("security.protocol".to_string(), "SSL".to_string())]
        );
        let cli = parse(&["--service", "orders", "snapshots", "verify", "7"]).unwrap();
        assert_eq!(
            cli.command,
            Command::Snapshots(snapshots::SnapshotsCommand::Verify { id: Some(7) })
        );
    }

    #[test]
    fn migrate_takes_a_strategy_and_a_timeout() {
        let cli = parse(&[
            "migrate",
            "--to",
            "b",
            "--strategy",
            "stop-and-copy",
            "--timeout",
            "500ms",
        ])
        .unwrap();
        let Command::Migrate(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.strategy, migrate::StrategyArg::StopAndCopy);
        assert_eq!(args.timeout, std::time::Duration::from_millis(500));
        assert_eq!(args.from, None);
        assert!(parse(&["migrate", "--to", "b", "--strategy", "teleport"]).is_err());
        assert!(parse(&["migrate"]).is_err(), "--to is required");
    }

    #[test]
    fn replay_needs_offsets_or_all_but_not_both() {
        let cli = parse(&[
            "dead-letters",
            "replay",
            "--topic",
            "dlq",
            "--offset",
            "2:5",
            "--offset",
            "7",
        ])
        .unwrap();
        let Command::DeadLetters(dead_letters::DeadLettersCommand::Replay { offsets, all, .. }) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((offsets, all), (vec![(2, 5), (0, 7)], false));
        assert!(parse(&["dead-letters", "replay", "--topic", "dlq"]).is_err());
        assert!(parse(&["dead-letters", "replay", "--topic", "dlq", "--all", "--offset", "1"]).is_err());
        assert!(parse(&["dead-letters", "replay", "--topic", "dlq", "--all"]).is_ok());
    }

    #[test]
    fn a_malformed_property_is_a_usage_error() {
        let e = parse(&["status", "-X", "no-equals"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
    }
}
