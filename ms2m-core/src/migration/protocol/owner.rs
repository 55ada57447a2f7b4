//! Ownership outside migrations: the first claim, the owner's lease and a
//! standby's takeover when it expires. Pure, like the other machines: time
//! arrives as `now` (a monotonic clock's reading, as a `Duration` since any
//! origin the driver picks), and what to publish comes back as a value.
//!
//! ```text
//!              first start: Claim{expired: None}        lease expired: Claim{expired: Some(term)}
//!  (no owner) ───────────────────────────────────▶ Owner ◀───────────────────────────────────── Standby
//!                                                    │  Renew every `interval`;                    ▲
//!                                                    │  emits only while its lease is valid        │
//!                                                    └── a higher claim or a Takeover names another ┘
//! ```
//!
//! # The rule
//!
//! Every record is folded by [`Decisions`]: a `Claim` wins when nobody owns
//! the service yet, or when the lease it names (the owner's epoch and its
//! latest renewal number) is still the current one and its epoch is higher.
//! A renewal that lands first voids the claim; a claim that lands first
//! voids every later renewal of the old epoch. Standbys racing claim the
//! same term: the first on the channel wins, the others change nothing.
//!
//! # Why the owner never emits after a takeover
//!
//! Let ρ bound the rate error of every node's monotonic clock (a local
//! interval `d` lasts between `d·(1−ρ)` and `d·(1+ρ)` of real time;
//! [`LeaseConfig::max_drift`]). The owner notes `s`, its clock, just before
//! it publishes renewal `n`; once it reads `n` back on the channel with no
//! winning claim before it, it may emit until `s + V` on its clock, with
//! `V = timeout·(1−ρ)/(1+ρ) − margin` ([`LeaseConfig::owner_validity`]):
//! at most `s + timeout/(1+ρ) − margin/(1+ρ)` in real time. A standby reads `n`
//! after it was published, so after `s`, and claims only once its own clock
//! says `timeout` passed since: at least `s + timeout/(1+ρ)` in real time. A
//! claim naming an older renewal loses to `n`. Two conditions make "reads
//! `n` back" mean what the argument needs: the record read must be this
//! keeper's own (renewals carry a random `incarnation` per keeper, so one
//! a crashed process of the same instance id left in flight, sent
//! earlier, never counts), and folding it must have raised the term (a
//! record of the same number that landed first started the standbys'
//! timers earlier). Likewise a claim dates the lease from its sending
//! only if folding it made this node the owner. So a claim that wins lands
//! after the owner's last permitted emit, by at least `margin` — the bound
//! on the time between the owner's check and the moment its step's outputs
//! leave the process. A process paused inside that window (SIGSTOP between
//! the check and the send) is the one case a lease cannot cover: there the
//! exactly-once sink's producer fencing (`init_transactions` on the new
//! owner's claim) is what stops the outputs, on a broker with transactions.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Decisions;
use crate::control::{ControlBody, ControlMessage, LeaseTerm, Role};
use crate::migration::Owner;

/// How leases are kept and judged. The defaults fail a dead owner over in
/// 10 s, well inside Kafka's default `session.timeout.ms` of 45 s (the time
/// a consumer group takes to notice a dead member), while tolerating four
/// lost renewals in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseConfig {
    /// How often the owner renews. Default: 2 s.
    pub interval: Duration,
    /// How long after the last renewal it read a standby waits before it
    /// claims the service. Default: 10 s.
    pub timeout: Duration,
    /// The bound on clock rate error, in parts per million. Default: 10,000
    /// (1%), far above what quartz clocks drift; the owner gives up its
    /// lease `2ρ` of the timeout early to allow for it.
    pub max_drift_ppm: u32,
    /// The longest time between the owner's lease check and its outputs
    /// leaving the process (one step of the apply loop). Default: 1 s.
    pub margin: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            max_drift_ppm: 10_000,
            margin: Duration::from_secs(1),
        }
    }
}

impl LeaseConfig {
    /// A lease renewed every `interval` that expires after `timeout`, with
    /// the default drift bound and margin.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            ..Self::default()
        }
    }

    /// ρ, as a fraction.
    pub fn max_drift(&self) -> f64 {
        f64::from(self.max_drift_ppm) / 1e6
    }

    /// How long after sending a renewal (that it then read back) the owner
    /// may emit: `timeout·(1−ρ)/(1+ρ) − margin`.
    pub fn owner_validity(&self) -> Duration {
        let rho = self.max_drift();
        self.timeout
            .mul_f64((1.0 - rho) / (1.0 + rho))
            .saturating_sub(self.margin)
    }

    /// Checks that the owner can renew before its validity runs out.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_drift_ppm >= 1_000_000 {
            return Err(format!("max_drift_ppm {} must be below 1,000,000", self.max_drift_ppm));
        }
        if self.interval.is_zero() || self.interval >= self.owner_validity() {
            return Err(format!(
                "lease interval {:?} must be positive and below the owner's validity {:?} (timeout {:?}, margin {:?})",
                self.interval,
                self.owner_validity(),
                self.timeout,
                self.margin
            ));
        }
        Ok(())
    }
}

/// A lease record read off the channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeaseRecord<'a> {
    Claim {
        owner: &'a str,
        epoch: u64,
        expired: Option<LeaseTerm>,
    },
    Renew {
        owner: &'a str,
        epoch: u64,
        renewal: u64,
        incarnation: u64,
    },
}

/// `m` as a lease record, if it is one (only nodes send them).
pub(crate) fn lease_record(m: &ControlMessage) -> Option<LeaseRecord<'_>> {
    match (&m.body, m.from) {
        (ControlBody::Claim { owner, epoch, expired }, Role::Node) => Some(LeaseRecord::Claim {
            owner,
            epoch: *epoch,
            expired: *expired,
        }),
        (
            ControlBody::Renew {
                owner,
                epoch,
                renewal,
                incarnation,
            },
            Role::Node,
        ) => Some(LeaseRecord::Renew {
            owner,
            epoch: *epoch,
            renewal: *renewal,
            incarnation: *incarnation,
        }),
        _ => None,
    }
}

/// The owner's side: when to renew, and whether it may emit now.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseKeeper {
    me: String,
    /// Marks this keeper's renewals (see [`ControlBody::Renew`]).
    incarnation: u64,
    config: LeaseConfig,
    /// The highest renewal number of this owner's term read so far: a
    /// renewal read back counts only if it raised the term, as standbys
    /// time the lease from the record that raised it.
    highest_read: u64,
    /// Renewals published and not yet read back: number → when sent.
    sent: BTreeMap<u64, Duration>,
    /// The next renewal's number.
    next: u64,
    last_sent: Option<Duration>,
    /// The owner emits only before this.
    valid_until: Option<Duration>,
    fenced: Option<Owner>,
}

impl LeaseKeeper {
    /// The lease of owner `me`. `granted_at`: a reading taken before the
    /// record that made it the owner was published (its claim, or its
    /// `Takeover`), if known; otherwise it emits only after its first
    /// renewal is read back. Its renewals carry a random incarnation.
    pub fn new(me: impl Into<String>, config: LeaseConfig, granted_at: Option<Duration>) -> Self {
        Self {
            me: me.into(),
            incarnation: random_incarnation(),
            config,
            highest_read: 0,
            sent: BTreeMap::new(),
            next: 1,
            last_sent: None,
            valid_until: granted_at.map(|at| at + config.owner_validity()),
            fenced: None,
        }
    }

    /// The same keeper with its renewals marked `incarnation` instead of a
    /// random number (for deterministic tests and models); it must differ
    /// from every other keeper's of this instance id, and not be 0.
    pub fn with_incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = incarnation;
        self
    }

    /// Whether the owner may emit at `now`.
    pub fn may_emit(&self, now: Duration) -> bool {
        self.fenced.is_none() && self.valid_until.is_some_and(|until| now < until)
    }

    /// Until when the lease lets the owner emit (its own clock).
    pub fn valid_until(&self) -> Option<Duration> {
        self.valid_until
    }

    /// The owner that replaced this one, once the channel named another.
    pub fn fenced_by(&self) -> Option<&Owner> {
        self.fenced.as_ref()
    }

    /// The renewal to publish at `now`, if one is due: every `interval`,
    /// and at once while the lease does not let the owner emit (retried
    /// every `interval / 4`).
    pub fn renewal_due(&mut self, now: Duration, decisions: &Decisions) -> Option<ControlBody> {
        if self.fenced.is_some() {
            return None;
        }
        let owner = decisions.owner().filter(|o| o.instance_id == self.me)?;
        let every = if self.may_emit(now) {
            self.config.interval
        } else {
            self.config.interval / 4
        };
        if self.last_sent.is_some_and(|last| now.saturating_sub(last) < every) {
            return None;
        }
        // Numbers above every renewal on the channel, also after a restart.
        let renewal = self.next.max(decisions.lease().map_or(0, |l| l.renewal) + 1);
        self.next = renewal + 1;
        self.last_sent = Some(now);
        self.sent.insert(renewal, now);
        Some(ControlBody::Renew {
            owner: self.me.clone(),
            epoch: owner.epoch,
            renewal,
            incarnation: self.incarnation,
        })
    }

    /// A record read at `now`, after `decisions` folded it. Returns the new
    /// owner when the record fenced this one.
    pub fn on_record(&mut self, m: &ControlMessage, decisions: &Decisions) -> Option<Owner> {
        if self.fenced.is_some() {
            return None;
        }
        match decisions.owner() {
            Some(o) if o.instance_id == self.me => {}
            other => {
                self.fenced = Some(other.cloned().unwrap_or(Owner {
                    instance_id: String::new(),
                    epoch: 0,
                }));
                self.valid_until = None;
                return self.fenced.clone();
            }
        }
        let term = decisions.lease().map_or(0, |l| l.renewal);
        if let Some(LeaseRecord::Renew {
            owner,
            renewal,
            incarnation,
            ..
        }) = lease_record(m)
        {
            let mine = owner == self.me && incarnation == self.incarnation;
            if mine && term == renewal && renewal > self.highest_read {
                self.read_back(renewal);
            }
        }
        self.highest_read = self.highest_read.max(term);
        None
    }

    /// Renewal `n` counted: the lease runs from when it was sent.
    fn read_back(&mut self, n: u64) {
        let Some(sent_at) = self.sent.get(&n).copied() else {
            return;
        };
        self.sent.retain(|&k, _| k > n);
        let until = sent_at + self.config.owner_validity();
        self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
    }
}

/// A number that tells one keeper's renewals from another's: random per
/// call, never 0.
fn random_incarnation() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::hash::RandomState::new().hash_one(now) | 1
}

/// A standby's side: when the owner's lease expired, and the claim to
/// publish then.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseWatch {
    me: String,
    config: LeaseConfig,
    /// The lease last seen, and when it was first seen (this node's clock).
    seen: Option<(Option<LeaseTerm>, Duration)>,
    /// The lease this node already claimed against (never twice).
    claimed: Option<Option<LeaseTerm>>,
}

impl LeaseWatch {
    /// A standby `me` watching the owner's lease.
    pub fn new(me: impl Into<String>, config: LeaseConfig) -> Self {
        Self {
            me: me.into(),
            config,
            seen: None,
            claimed: None,
        }
    }

    /// Notes the lease after `decisions` folded a record read at `now`.
    pub fn observe(&mut self, now: Duration, decisions: &Decisions) {
        let term = decisions.lease();
        if self.seen.as_ref().is_none_or(|(seen, _)| *seen != term) {
            self.seen = Some((term, now));
        }
    }

    /// Whether the channel names this node the owner.
    pub fn won(&self, decisions: &Decisions) -> bool {
        decisions.owner().is_some_and(|o| o.instance_id == self.me)
    }

    /// The claim to publish at `now`, if the service has no owner or the
    /// owner's lease expired (and this node did not claim against it yet).
    pub fn claim_due(&mut self, now: Duration, decisions: &Decisions) -> Option<ControlBody> {
        self.observe(now, decisions);
        let (term, since) = self.seen?;
        if self.won(decisions) || self.claimed == Some(term) {
            return None;
        }
        let epoch = match term {
            None => decisions.owner().map_or(1, |o| o.epoch + 1),
            Some(t) if now.saturating_sub(since) >= self.config.timeout => t.epoch + 1,
            Some(_) => return None,
        };
        self.claimed = Some(term);
        Some(ControlBody::Claim {
            owner: self.me.clone(),
            epoch,
            expired: term,
        })
    }

    /// How long until the lease seen expires (zero when it has, or when
    /// there is no owner).
    pub fn expires_in(&self, now: Duration) -> Duration {
        match self.seen {
            Some((Some(_), since)) => self.config.timeout.saturating_sub(now.saturating_sub(since)),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(body: ControlBody) -> ControlMessage {
        ControlMessage {
            service: "s".into(),
            migration_id: String::new(),
            from: Role::Node,
            sent_at_ms: 0,
            body,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn config() -> LeaseConfig {
        LeaseConfig {
            interval: secs(2),
            timeout: secs(10),
            max_drift_ppm: 0,
            margin: secs(1),
        }
    }

    #[test]
    fn the_first_claim_wins_and_a_second_first_claim_loses() {
        let mut d = Decisions::default();
        let (mut a, mut b) = (LeaseWatch::new("a", config()), LeaseWatch::new("b", config()));
        let claim_a = a.claim_due(secs(0), &d).expect("nobody owns the service");
        let claim_b = b.claim_due(secs(0), &d).expect("nobody owns the service");
        d.observe(&node(claim_a));
        d.observe(&node(claim_b));
        assert_eq!(d.owner().map(|o| (o.instance_id.as_str(), o.epoch)), Some(("a", 1)));
        assert!(b.claim_due(secs(1), &d).is_none(), "the lease is fresh");
    }

    #[test]
    fn a_standby_claims_only_after_the_timeout_since_the_last_renewal_it_read() {
        let mut d = Decisions::default();
        d.observe(&node(LeaseWatch::new("a", config()).claim_due(secs(0), &d).unwrap()));
        let mut keeper = LeaseKeeper::new("a", config(), Some(secs(0)));
        let mut standby = LeaseWatch::new("b", config());
        standby.observe(secs(0), &d);
        let renew = keeper.renewal_due(secs(2), &d).expect("renewal due");
        d.observe(&node(renew.clone()));
        keeper.on_record(&node(renew), &d);
        standby.observe(secs(3), &d);
        assert!(standby.claim_due(secs(12), &d).is_none(), "9 s since the renewal");
        let claim = standby.claim_due(secs(13), &d).expect("expired");
        assert!(keeper.may_emit(secs(10)), "validity: 2 s + 9 s");
        assert!(!keeper.may_emit(secs(11)), "the owner gave up before the claim");
        d.observe(&node(claim.clone()));
        assert_eq!(
            keeper.on_record(&node(claim), &d).map(|o| o.instance_id),
            Some("b".into())
        );
        assert!(!keeper.may_emit(secs(5)), "fenced");
    }

    #[test]
    fn a_renewal_that_lands_first_voids_the_claim() {
        let mut d = Decisions::default();
        d.observe(&node(LeaseWatch::new("a", config()).claim_due(secs(0), &d).unwrap()));
        let mut standby = LeaseWatch::new("b", config());
        standby.observe(secs(0), &d);
        let claim = standby.claim_due(secs(10), &d).expect("expired");
        let mut keeper = LeaseKeeper::new("a", config(), None);
        let renew = keeper.renewal_due(secs(10), &d).expect("renewal due");
        d.observe(&node(renew.clone()));
        keeper.on_record(&node(renew), &d);
        d.observe(&node(claim.clone()));
        assert_eq!(keeper.on_record(&node(claim), &d), None);
        assert_eq!(d.owner().map(|o| o.instance_id.as_str()), Some("a"));
        assert!(keeper.may_emit(secs(11)));
    }

    #[test]
    fn a_winning_claim_rolls_back_open_migrations() {
        let mut d = Decisions::default();
        d.observe(&node(LeaseWatch::new("a", config()).claim_due(secs(0), &d).unwrap()));
        let prepare = ControlMessage {
            migration_id: "m".into(),
            from: Role::Coordinator,
            body: ControlBody::Prepare {
                source: "a".into(),
                target: "c".into(),
                digest_policy: Default::default(),
                strategy: None,
            },
            ..node(ControlBody::Checkpoint)
        };
        d.observe(&prepare);
        assert_eq!(d.undecided().collect::<Vec<_>>(), ["m"]);
        let mut standby = LeaseWatch::new("b", config());
        standby.observe(secs(0), &d);
        let claim = node(standby.claim_due(secs(10), &d).unwrap());
        assert_eq!(
            d.observe_for(&claim, "m"),
            Observed::Decides(MigrationOutcome::RolledBack)
        );
        assert_eq!(d.undecided().count(), 0);
    }

    #[test]
    fn a_restarted_owner_numbers_its_renewals_above_the_channel_and_waits_for_one() {
        let mut d = Decisions::default();
        d.observe(&node(LeaseWatch::new("a", config()).claim_due(secs(0), &d).unwrap()));
        let mut before = LeaseKeeper::new("a", config(), Some(secs(0)));
        for t in [2, 4, 6] {
            d.observe(&node(before.renewal_due(secs(t), &d).unwrap()));
        }
        let mut restarted = LeaseKeeper::new("a", config(), None);
        assert!(!restarted.may_emit(secs(7)));
        let renew = restarted.renewal_due(secs(7), &d).unwrap();
        assert!(matches!(renew, ControlBody::Renew { renewal: 4, .. }));
        d.observe(&node(renew.clone()));
        restarted.on_record(&node(renew), &d);
        assert!(restarted.may_emit(secs(8)));
    }

    /// A renewal of the same number that a crashed process of this
    /// instance id left in flight (sent earlier) does not extend the
    /// restarted keeper's lease, and its own renewal that lands after it
    /// does not either: the standbys timed the term from the first.
    #[test]
    fn a_restarted_owner_counts_only_its_own_renewals_that_raised_the_term() {
        let mut d = Decisions::default();
        d.observe(&node(LeaseWatch::new("a", config()).claim_due(secs(0), &d).unwrap()));
        let mut dead = LeaseKeeper::new("a", config(), Some(secs(0))).with_incarnation(1);
        let orphan = dead.renewal_due(secs(0), &d).unwrap();
        let mut restarted = LeaseKeeper::new("a", config(), None).with_incarnation(2);
        let own = restarted.renewal_due(secs(5), &d).unwrap();
        d.observe(&node(orphan.clone()));
        restarted.on_record(&node(orphan), &d);
        assert!(!restarted.may_emit(secs(6)), "the dead process's renewal");
        d.observe(&node(own.clone()));
        restarted.on_record(&node(own), &d);
        assert!(!restarted.may_emit(secs(6)), "raised no term");
        let next = restarted.renewal_due(secs(7), &d).unwrap();
        assert!(matches!(next, ControlBody::Renew { renewal: 2, .. }));
        d.observe(&node(next.clone()));
        restarted.on_record(&node(next), &d);
        assert!(restarted.may_emit(secs(8)));
    }

    #[test]
    fn validity_allows_for_drift_and_margin() {
        let c = LeaseConfig::default();
        let v = c.owner_validity().as_secs_f64();
        assert!((v - (10.0 * 0.99 / 1.01 - 1.0)).abs() < 1e-6, "{v}");
        assert!(c.validate().is_ok());
        assert!(LeaseConfig::new(secs(9), secs(10)).validate().is_err());
    }

    use super::super::Observed;
    use crate::migration::MigrationOutcome;
}
