//! B2 (replay throughput), B3 (live processing with outputs) and B6
//! (recovery from snapshot + tail vs cold start).

use std::time::{Duration, Instant};

use ms2m_core::{no_progress, Delivery, Instance, InstanceConfig, Position, ProgressPhase, StatefulService};
use ms2m_kafka::{KafkaConfig, KafkaLog, KafkaSink, KafkaSnapshotStore};

use crate::kafka::{fill, raw_live, raw_replay};
use crate::report::{ratios, Goal, Row, Stat};
use crate::services::{Echo, Tally};
use crate::{Bench, BoxError};

type KInstance<S> = Instance<S, KafkaLog, KafkaSnapshotStore, KafkaSink>;

/// An instance configuration with periodic snapshots off (they are
/// measured separately, in B4/B5).
fn no_snapshots(id: &str) -> InstanceConfig {
    InstanceConfig::new(id).snapshot_every(None).snapshot_interval(None)
}

/// Steps `instance` until its position reaches `end`.
async fn drain<S: StatefulService>(instance: &mut KInstance<S>, end: &Position) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !instance.position().reaches(end) {
        if Instant::now() > deadline {
            return Err(format!("instance stuck at {} (end {end})", instance.position()).into());
        }
        instance.step().await?;
    }
    Ok(())
}

/// B2: messages applied per second during catch-up (replay mode, outputs
/// suppressed, trivial apply) vs a `BaseConsumer` loop over the same
/// partitions; and the same replay with input headers off
/// (`KafkaConfig::input_headers(false)`), informational.
pub async fn b2(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let (n, partitions, size) = if b.quick { (20_000, 4, 16) } else { (300_000, 8, 16) };
    let input = b.unique("b2-in");
    b.cluster.create_topic(&input, partitions, &[]).await?;
    let end = fill(&b.cluster, &input, partitions, 0, n, size).await?;
    let (mut ours, mut bare, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    // Every side's checksum of the payloads: they must all agree.
    let mut sums = std::collections::BTreeSet::new();
    for run in 0..b.runs {
        // Rotate the order so no side always runs on a warm cache.
        for side in (0..3).map(|i| (run + i) % 3) {
            let (rate, sum) = match side {
                0 => replay_rate(b, &input, &end, n, true).await?,
                1 => replay_rate(b, &input, &end, n, false).await?,
                _ => {
                    let r = raw_replay(&b.cluster, &b.unique("b2-raw"), &end).await?;
                    if r.messages != n {
                        return Err(format!("raw loop read {} of {n}", r.messages).into());
                    }
                    (n as f64 / r.elapsed.as_secs_f64(), r.sum)
                }
            };
            [&mut ours, &mut bare, &mut raw][side].push(rate);
            sums.insert(sum);
        }
    }
    if sums.len() > 1 {
        return Err(format!("the sides' payload checksums differ: {sums:?}").into());
    }
    let what = format!("({n} msgs × {size} B, {partitions} partitions)");
    let how = "`Instance::restore` (seek) then `replay_to`, timed from the seek / `assign` to the last message; outputs suppressed";
    Ok(vec![
        Row::new(
            "B2",
            format!("replay throughput, trivial apply {what}"),
            Stat::new(ours.clone(), "msg/s"),
            "rdkafka `BaseConsumer` loop",
            Some(Stat::new(raw.clone(), "msg/s")),
            Some(ratios(&ours, &raw)),
            "≥ 0.8",
            Goal::AtLeast(0.8),
            how,
        ),
        Row::new(
            "B2-no-headers",
            format!("replay throughput, input headers off (informational) {what}"),
            Stat::new(bare.clone(), "msg/s"),
            "rdkafka `BaseConsumer` loop",
            Some(Stat::new(raw.clone(), "msg/s")),
            Some(ratios(&bare, &raw)),
            "—",
            Goal::None,
            "as B2 with `KafkaConfig::input_headers(false)`: no per-message header parse",
        ),
    ])
}

/// Messages per second of one catch-up replay of `n` records up to `end`,
/// and the checksum of the payloads it applied.
async fn replay_rate(b: &Bench, input: &str, end: &Position, n: u64, headers: bool) -> Result<(f64, u64), BoxError> {
    let config = KafkaConfig::new(b.unique("b2-ours"))
        .input_topic(input)
        .input_headers(headers);
    let backends = b.cluster.for_service(config).backends(Delivery::AtLeastOnce).await?;
    let mut inst = KInstance::<Tally>::restore(backends, no_snapshots("replayer"), None).await?;
    let started = Instant::now();
    inst.replay_to(end, ProgressPhase::Recovery, &*no_progress()).await?;
    let elapsed = started.elapsed();
    if inst.state().count != n {
        return Err(format!("ms2m replayed {} of {n}", inst.state().count).into());
    }
    Ok((n as f64 / elapsed.as_secs_f64(), inst.state().sum))
}

/// B3: live processing with one output per message (at-least-once) vs a
/// consume → produce → commit loop doing the same work.
pub async fn b3(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let (n, partitions, size) = if b.quick { (20_000, 4, 64) } else { (200_000, 8, 64) };
    let input = b.unique("b3-in");
    let output = b.unique("b3-out");
    b.cluster.create_topic(&input, partitions, &[]).await?;
    b.cluster.create_topic(&output, partitions, &[]).await?;
    let end = fill(&b.cluster, &input, partitions, 0, n, size).await?;
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let mut eos = Vec::new();
    // Every run's checksum of the payloads: they must all agree.
    let mut sums = std::collections::BTreeSet::new();
    for run in 0..b.runs {
        for side in [run % 2, 1 - run % 2] {
            if side == 0 {
                let (rate, sum) = live_run(b, &input, &output, &end, n, Delivery::AtLeastOnce).await?;
                ours.push(rate);
                sums.insert(sum);
            } else {
                let r = raw_live(&b.cluster, &b.unique("b3-raw"), &output, &end).await?;
                if r.messages != n {
                    return Err(format!("raw loop processed {} of {n}", r.messages).into());
                }
                raw.push(n as f64 / r.elapsed.as_secs_f64());
                sums.insert(r.sum);
            }
        }
        if b.embedded() && run == 0 {
            let (rate, sum) = live_run(b, &input, &output, &end, n, Delivery::ExactlyOnce).await?;
            eos.push(rate);
            sums.insert(sum);
        }
    }
    if sums.len() > 1 {
        return Err(format!("the runs' payload checksums differ: {sums:?}").into());
    }
    let mut rows = vec![Row::new(
        "B3",
        format!("live processing, 1 output per input ({n} msgs × {size} B, {partitions} partitions)"),
        Stat::new(ours.clone(), "msg/s"),
        "rdkafka consume → produce → commit loop",
        Some(Stat::new(raw.clone(), "msg/s")),
        Some(ratios(&ours, &raw)),
        "≥ 0.9",
        Goal::AtLeast(0.9),
        "at-least-once both sides (commit every 1,000 msgs / 100 ms after all deliveries); backlog drained from the start",
    )];
    if !eos.is_empty() {
        rows.push(Row::new(
            "B3-eos",
            "live processing, exactly-once sink (informational)",
            Stat::new(eos, "msg/s"),
            "",
            None,
            None,
            "—",
            Goal::None,
            "one transaction per commit (1,000 msgs / 100 ms); the mock's commit_transaction costs a fixed ~100 ms, so this is a mock artefact",
        ));
    }
    Ok(rows)
}

async fn live_run(
    b: &Bench,
    input: &str,
    output: &str,
    end: &Position,
    n: u64,
    delivery: Delivery,
) -> Result<(f64, u64), BoxError> {
    let cluster = b.service(&b.unique("b3-ours"), input);
    let backends = cluster.backends(delivery).await?;
    let config = no_snapshots("live").output_topic(output.to_string());
    let mut inst = KInstance::<Echo>::recover(backends, config, &*no_progress()).await?;
    let started = Instant::now();
    drain(&mut inst, end).await?;
    inst.commit().await?;
    let elapsed = started.elapsed();
    if inst.state().count != n || inst.stats().outputs_emitted != n {
        return Err(format!(
            "ms2m processed {} and emitted {} of {n}",
            inst.state().count,
            inst.stats().outputs_emitted
        )
        .into());
    }
    Ok((n as f64 / elapsed.as_secs_f64(), inst.state().sum))
}

/// B6: a fresh instance recovering from a snapshot plus a tail vs a cold
/// start replaying the whole log.
pub async fn b6(b: &Bench) -> Result<Vec<Row>, BoxError> {
    let (total, tail, partitions) = if b.quick {
        (100_000u64, 1_000u64, 4)
    } else {
        (1_000_000, 10_000, 16)
    };
    let size = 8;
    let input = b.unique("b6-in");
    b.cluster.create_topic(&input, partitions, &[]).await?;
    fill(&b.cluster, &input, partitions, 0, total - tail, size).await?;
    // The owner that processed the head and snapshotted at its end.
    let service = b.unique("b6-svc");
    let cluster = b.service(&service, &input);
    let head_end = crate::kafka::end_position(&cluster, &input, partitions).await?;
    {
        let mut owner = KInstance::<Tally>::recover(
            cluster.backends(Delivery::AtLeastOnce).await?,
            no_snapshots("owner"),
            &*no_progress(),
        )
        .await?;
        drain(&mut owner, &head_end).await?;
        owner.commit().await?;
        owner.checkpoint().await?;
    }
    let end = fill(&b.cluster, &input, partitions, total - tail, tail, size).await?;
    let (mut recovery, mut cold) = (Vec::new(), Vec::new());
    for run in 0..b.runs {
        for side in [run % 2, 1 - run % 2] {
            let (cluster, samples) = if side == 0 {
                (b.service(&service, &input), &mut recovery)
            } else {
                (b.service(&b.unique("b6-cold"), &input), &mut cold)
            };
            let backends = cluster.backends(Delivery::AtLeastOnce).await?;
            let started = Instant::now();
            let mut inst = KInstance::<Tally>::recover(backends, no_snapshots("fresh"), &*no_progress()).await?;
            drain(&mut inst, &end).await?;
            let elapsed = started.elapsed();
            if inst.state().count != total {
                return Err(format!("recovered {} of {total}", inst.state().count).into());
            }
            samples.push(crate::ms(elapsed));
        }
    }
    let scaled = if b.quick { " (quick: scaled down)" } else { "" };
    Ok(vec![Row::new(
        "B6",
        format!("recovery: snapshot + {tail}-msg tail of a {total}-msg log{scaled}"),
        Stat::new(recovery.clone(), "ms"),
        "cold start replaying the whole log",
        Some(Stat::new(cold.clone(), "ms")),
        Some(ratios(&recovery, &cold)),
        "≤ 0.05",
        Goal::AtMost(0.05),
        format!("`Instance::recover` until caught up, at-least-once; {size}-B messages over {partitions} partitions; tiny state"),
    )])
}
