//! # Schema upgrade: a v1 snapshot restored by v2 code
//!
//! Version 1 of a loyalty service stored points per customer. Version 2
//! adds tiers and keeps a derived total that is not stored but rebuilt on
//! restore. The v2 code declares how to upgrade a v1 snapshot; a snapshot
//! from a version it does not know would be a typed error, never a garbled
//! state. Runs on the embedded broker:
//!
//! ```text
//! cargo run --example schema_upgrade
//! ```

use std::collections::BTreeMap;
use std::convert::Infallible;

use ms2m_core::{codec::Json, ApplyContext, Delivery, Instance, InstanceConfig, ServiceState, StatefulService};
use ms2m_examples::support::{produce_json, producer, BoxError};
use ms2m_kafka::{KafkaCluster, KafkaConfig};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Purchase {
    customer: String,
    cents: u64,
}

/// Version 1, as it was deployed.
#[derive(Default, ServiceState, Deserialize)]
#[state(version = 1)]
struct LoyaltyV1 {
    points: BTreeMap<String, u64>,
}

#[async_trait::async_trait]
impl StatefulService for LoyaltyV1 {
    const NAME: &'static str = "loyalty";
    type Message = Purchase;
    type Format = Json;
    type Error = Infallible;
    async fn apply(&mut self, p: Purchase, _: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        *self.points.entry(p.customer).or_default() += p.cents / 100;
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
enum Tier {
    #[default]
    Bronze,
    Gold,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Account {
    points: u64,
    tier: Tier,
}

/// Version 2: tiers, plus a derived total rebuilt on restore.
#[derive(Default, ServiceState)]
#[state(version = 2, upgrade(from = 1, via = LoyaltyV1))]
struct Loyalty {
    accounts: BTreeMap<String, Account>,
    #[state(skip, rebuild = Loyalty::sum_points)]
    total_points: u64,
}

impl Loyalty {
    fn sum_points(&self) -> u64 {
        self.accounts.values().map(|a| a.points).sum()
    }
}

fn tier(points: u64) -> Tier {
    if points >= 100 {
        Tier::Gold
    } else {
        Tier::Bronze
    }
}

impl From<LoyaltyV1> for Loyalty {
    fn from(v1: LoyaltyV1) -> Self {
        let accounts = v1
            .points
            .into_iter()
            .map(|(c, points)| {
                (
                    c,
                    Account {
                        points,
                        tier: tier(points),
                    },
                )
            })
            .collect();
        Loyalty {
            accounts,
            total_points: 0, // rebuilt by `sum_points` after the upgrade
        }
    }
}

#[async_trait::async_trait]
impl StatefulService for Loyalty {
    const NAME: &'static str = "loyalty";
    type Message = Purchase;
    type Format = Json;
    type Error = Infallible;
    async fn apply(&mut self, p: Purchase, _: &mut ApplyContext<'_>) -> Result<(), Infallible> {
        let a = self.accounts.entry(p.customer).or_default();
        a.points += p.cents / 100;
        a.tier = tier(a.points);
        self.total_points += p.cents / 100;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    ms2m_examples::support::init_logging();
    let cluster = KafkaCluster::embedded(KafkaConfig::new("loyalty").input_topic("purchases"))?;
    cluster.create_topic("purchases", 1, &[]).await?;
    let purchases = |range: std::ops::Range<u64>| {
        range
            .map(|i| {
                let customer = ["ada", "grace", "linus"][(i % 3) as usize].to_string();
                (
                    customer.clone().into_bytes(),
                    Purchase {
                        customer,
                        cents: 1_250 + i * 10,
                    },
                )
            })
            .collect()
    };
    let producer = producer(&cluster)?;
    produce_json(&producer, "purchases", purchases(0..30)).await?;

    // v1 runs and stops gracefully: its final snapshot is a v1 snapshot.
    let config = || InstanceConfig::new("loyalty-1");
    let mut v1 = Instance::<LoyaltyV1, _, _, _>::recover(
        cluster.backends(Delivery::ExactlyOnce).await?,
        config(),
        &*ms2m_core::no_progress(),
    )
    .await?;
    while v1.position().total() < 30 {
        v1.step().await?;
    }
    v1.shutdown().await?;
    println!(
        "v1 stopped with {} customers, snapshot at schema version 1",
        v1.state().points.len()
    );

    // v2 is deployed: it restores the v1 snapshot through the upgrade, then goes on.
    produce_json(&producer, "purchases", purchases(30..45)).await?;
    let mut v2 = Instance::<Loyalty, _, _, _>::recover(
        cluster.backends(Delivery::ExactlyOnce).await?,
        config(),
        &*ms2m_core::no_progress(),
    )
    .await?;
    assert_eq!(
        v2.stats().applied_replay + v2.stats().applied_live,
        0,
        "restored from the snapshot"
    );
    while v2.position().total() < 45 {
        v2.step().await?;
    }
    for (customer, account) in &v2.state().accounts {
        println!("{customer}: {} points, {:?}", account.points, account.tier);
    }
    println!("total points (rebuilt, never stored): {}", v2.state().total_points);
    assert_eq!(v2.state().total_points, v2.state().sum_points());
    v2.shutdown().await?;
    Ok(())
}
