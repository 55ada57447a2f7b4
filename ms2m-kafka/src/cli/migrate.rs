//! `ms2m migrate` and `ms2m recover`: the CLI as the migration's
//! coordinator. The source and target are running service processes; the
//! CLI only drives the protocol over the control topic
//! ([`Coordinator`]), shows its progress, and prints the report. `recover`
//! is the coordinator restarted: it decides every migration a dead
//! coordinator left open, by the same channel-order rule as every party.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use ms2m_core::migration::{Coordinator, MigrationConfig, MigrationPlan, MigrationReport, Recovered, Strategy};
use ms2m_core::{Progress, ProgressListener};
use serde::Serialize;

use super::config::parse_duration;
use super::error::CliError;
use super::output::{self, line};
use super::status::{open_control, undecided};
use crate::KafkaCluster;

/// The strategies, as spelled on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyArg {
    /// MS2M: the target catches up while the source serves
    Ms2m,
    /// MS2M with the threshold cutoff (bounded total time)
    Ms2mThreshold,
    /// MS2M without a checkpoint: a target node keeps its standby state (one without restores the newest snapshot)
    Ms2mFromStandby,
    /// Baseline: stop, snapshot, restore
    StopAndCopy,
    /// Baseline: stop, rebuild the target from the whole log
    ColdStart,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Ms2m => Strategy::Ms2m,
            StrategyArg::Ms2mThreshold => Strategy::Ms2mThreshold,
            StrategyArg::Ms2mFromStandby => Strategy::Ms2mFromStandby,
            StrategyArg::StopAndCopy => Strategy::StopAndCopy,
            StrategyArg::ColdStart => Strategy::ColdStart,
        }
    }
}

/// `ms2m migrate …`
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct MigrateArgs {
    /// Instance id of the source (default: the owner recorded on the control topic)
    #[arg(long, value_name = "ID")]
    pub from: Option<String>,
    /// Instance id of the standby target
    #[arg(long, value_name = "ID")]
    pub to: String,
    /// The migration procedure
    #[arg(long, value_enum, default_value_t = StrategyArg::Ms2m)]
    pub strategy: StrategyArg,
    /// How long to wait for any one answer before rolling back
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
    /// Cut over when the target is at most this many messages behind
    #[arg(long, value_name = "MESSAGES")]
    pub max_lag: Option<u64>,
    /// The migration id (default: cli-{unix ms})
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
}

/// `ms2m recover …`
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoverArgs {
    /// Decide only this migration (default: every undecided one)
    #[arg(long = "migration", value_name = "ID")]
    pub migration: Option<String>,
    /// How long the target gets to take over when the source may have stopped
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
}

/// Runs `ms2m migrate`.
pub async fn migrate(cluster: &KafkaCluster, args: &MigrateArgs, json: bool) -> Result<(), CliError> {
    let control = open_control(cluster).await?.ok_or_else(|| CliError::MissingTopic {
        topic: cluster.config().control_topic(),
        hint: "start the source and target first (they create it), or check --service / --control-topic",
    })?;
    let control = Arc::new(control);
    let service = cluster.config().service().to_string();
    let source = match &args.from {
        Some(s) => s.clone(),
        None => {
            ms2m_core::migration::current_owner(&*control, &service)
                .await?
                .ok_or(CliError::NoOwner)?
                .instance_id
        }
    };
    let plan = MigrationPlan {
        migration_id: args.id.clone().unwrap_or_else(|| format!("cli-{}", output::now_ms())),
        service,
        source,
        target: args.to.clone(),
        strategy: args.strategy.into(),
    };
    let mut config = MigrationConfig {
        phase_timeout: args.timeout,
        ..MigrationConfig::default()
    };
    if args.max_lag.is_some() {
        config.cutover.max_lag = args.max_lag;
    }
    let bar = Bar::new(json, &plan);
    let result = Coordinator::new(control, config).migrate(&plan, &bar).await;
    bar.0.finish_and_clear();
    let report = result?;
    output::print(json, &report, |out| report_text(out, &report));
    Ok(())
}

/// A progress bar on stderr: phase, lag, rate, ETA (hidden with `--json`
/// and when stderr is not a terminal).
struct Bar(ProgressBar);

impl Bar {
    fn new(json: bool, plan: &MigrationPlan) -> Self {
        let bar = if json {
            ProgressBar::hidden()
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix} {wide_msg}")
                .expect("a valid template"),
        );
        bar.set_prefix(format!("{} {} -> {}", plan.strategy, plan.source, plan.target));
        bar.set_message("starting");
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(bar)
    }
}

impl ProgressListener for Bar {
    fn on_progress(&self, p: &Progress) {
        let eta = p.eta.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()));
        self.0.set_message(format!(
            "{:?}: lag {} applied {} at {:.0} msg/s, ETA {eta}",
            p.phase, p.remaining, p.applied, p.rate
        ));
    }
}

fn report_text(out: &mut String, r: &MigrationReport) {
    line!(
        out,
        "migration {} of {}: {} -> {} ({})",
        r.migration_id,
        r.service,
        r.source,
        r.target,
        r.strategy
    );
    line!(
        out,
        "  downtime      {:>10.1} ms (handover {:.1}, coordinator's cutover {:.1}, source stall {:.1})",
        r.downtime_ms,
        r.handover_ms,
        r.cutover_ms,
        r.source_stall_ms
    );
    line!(out, "  total         {:>10.1} ms", r.total_ms);
    line!(
        out,
        "  phases        checkpoint {:.1} / transfer {:.1} / restore {:.1} / replay {:.1} ms",
        r.checkpoint_ms,
        r.transfer_ms,
        r.restore_ms,
        r.replay_ms
    );
    line!(
        out,
        "  snapshot      {} (pause {:.1} ms)",
        output::bytes(r.snapshot_bytes),
        r.snapshot_pause_ms
    );
    line!(
        out,
        "  replayed      {} messages, final gap {}, lag at cutover {}",
        r.messages_replayed,
        r.final_gap,
        r.lag_at_cutover
    );
    line!(out, "  cutover rule  {:?}", r.cutover_reason);
    line!(out, "  P0            {}", output::position(&r.p0));
    line!(out, "  Pf            {}", output::position(&r.pf));
    let verdict = if r.digest_match { "match" } else { "DIFFER" };
    line!(
        out,
        "  digests       {verdict} at {}",
        output::position(&r.digest_position)
    );
}

/// What `recover` did with one migration.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverOutcome {
    /// Migration id.
    pub migration_id: String,
    /// Source instance.
    pub source: String,
    /// Target instance.
    pub target: String,
    /// `Completed` (the target owns it), `RolledBack` (the source resumes),
    /// `Aborted` (the source never stopped) or `AlreadyFinished`.
    pub decided: Option<String>,
    /// Why it could not be decided.
    pub error: Option<String>,
}

/// Runs `ms2m recover`.
pub async fn recover(cluster: &KafkaCluster, args: &RecoverArgs, json: bool) -> Result<(), CliError> {
    let service = cluster.config().service().to_string();
    let Some(control) = open_control(cluster).await? else {
        output::print(json, &Vec::<RecoverOutcome>::new(), |out| {
            line!(
                out,
                "control topic {} does not exist: nothing to recover",
                cluster.config().control_topic()
            )
        });
        return Ok(());
    };
    let control = Arc::new(control);
    let history = ms2m_core::migration::read_history(&*control, &service).await?;
    let mut open = undecided(&history);
    if let Some(id) = &args.migration {
        open.retain(|u| &u.migration_id == id);
    }
    let config = MigrationConfig {
        phase_timeout: args.timeout,
        ..MigrationConfig::default()
    };
    let coordinator = Coordinator::new(control, config);
    let mut outcomes = Vec::with_capacity(open.len());
    for u in open {
        let result = coordinator.recover(service.as_str(), u.migration_id.as_str()).await;
        outcomes.push(RecoverOutcome {
            decided: result.as_ref().ok().map(|r| decided(*r).to_string()),
            error: result.err().map(|e| CliError::from(e).chain()),
            migration_id: u.migration_id,
            source: u.source,
            target: u.target,
        });
    }
    output::print(json, &outcomes, |out| recover_text(out, &outcomes));
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    if failed > 0 {
        return Err(CliError::RecoverFailed {
            failed,
            total: outcomes.len(),
        });
    }
    Ok(())
}

fn decided(r: Recovered) -> &'static str {
    match r {
        Recovered::AlreadyFinished => "AlreadyFinished",
        Recovered::Completed => "Completed",
        Recovered::RolledBack => "RolledBack",
        Recovered::Aborted => "Aborted",
    }
}

fn recover_text(out: &mut String, outcomes: &[RecoverOutcome]) {
    if outcomes.is_empty() {
        line!(out, "no undecided migrations");
    }
    for o in outcomes {
        let what = match (&o.decided, &o.error) {
            (Some(d), _) => match d.as_str() {
                "Completed" => format!("completed: {} owns the service", o.target),
                "RolledBack" => format!("rolled back: {} resumes as the owner", o.source),
                "Aborted" => format!("aborted before the stop: {} kept serving", o.source),
                _ => "already finished".to_string(),
            },
            (None, Some(e)) => format!("FAILED: {e}"),
            (None, None) => "?".to_string(),
        };
        line!(out, "{}  {} -> {}  {what}", o.migration_id, o.source, o.target);
    }
}
