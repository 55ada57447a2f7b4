//! A bank ledger that emits outputs: every accepted transaction emits the
//! new balance; an overdraft is rejected and emits a rejection. During
//! replay the runtime suppresses both, so a recovered or migrated ledger
//! never announces a balance twice.

use std::collections::BTreeMap;

use async_trait::async_trait;
use ms2m_core::codec::Json;
use ms2m_core::{ApplyContext, ServiceState, StatefulService};
use serde::{Deserialize, Serialize};

/// An input transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Transaction {
    /// Money in.
    Deposit {
        /// Account.
        account: String,
        /// Amount in cents.
        cents: u64,
    },
    /// Money out; rejected if it would overdraw the account.
    Withdraw {
        /// Account.
        account: String,
        /// Amount in cents.
        cents: u64,
    },
}

/// An output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LedgerEvent {
    /// The balance after an accepted transaction.
    BalanceUpdated {
        /// Account.
        account: String,
        /// New balance in cents.
        balance: u64,
    },
    /// A withdrawal that would have overdrawn the account.
    OverdraftRejected {
        /// Account.
        account: String,
        /// Amount asked for.
        cents: u64,
        /// Balance at the time.
        balance: u64,
    },
}

/// The ledger's state.
#[derive(Debug, Default, PartialEq, Eq, ServiceState)]
#[state(version = 1)]
pub struct Ledger {
    /// Balance per account, in cents.
    pub balances: BTreeMap<String, u64>,
    /// Withdrawals rejected so far.
    pub rejected: u64,
}

impl Ledger {
    /// Applies one transaction and returns the event it produces.
    pub fn book(&mut self, tx: &Transaction) -> LedgerEvent {
        match tx {
            Transaction::Deposit { account, cents } => {
                let balance = self.balances.entry(account.clone()).or_default();
                *balance += cents;
                LedgerEvent::BalanceUpdated {
                    account: account.clone(),
                    balance: *balance,
                }
            }
            Transaction::Withdraw { account, cents } => {
                let balance = self.balances.entry(account.clone()).or_default();
                if *balance < *cents {
                    self.rejected += 1;
                    return LedgerEvent::OverdraftRejected {
                        account: account.clone(),
                        cents: *cents,
                        balance: *balance,
                    };
                }
                *balance -= cents;
                LedgerEvent::BalanceUpdated {
                    account: account.clone(),
                    balance: *balance,
                }
            }
        }
    }
}

/// A domain error (none here: an overdraft is an output, not a failure).
pub type LedgerError = std::convert::Infallible;

#[async_trait]
impl StatefulService for Ledger {
    const NAME: &'static str = "ledger";
    type Message = Transaction;
    type Format = Json;
    type Error = LedgerError;

    async fn apply(&mut self, tx: Transaction, ctx: &mut ApplyContext<'_>) -> Result<(), LedgerError> {
        let event = self.book(&tx);
        let key = match &tx {
            Transaction::Deposit { account, .. } | Transaction::Withdraw { account, .. } => account.clone(),
        };
        ctx.emit_keyed(key, &event);
        Ok(())
    }
}

/// Deterministic workload: transaction `i`.
pub fn transaction(i: u64) -> Transaction {
    let account = format!("acct-{:02}", i % 10);
    if i % 4 == 3 {
        Transaction::Withdraw {
            account,
            cents: 700 + i % 500,
        }
    } else {
        Transaction::Deposit {
            account,
            cents: 100 + i % 300,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overdrafts_are_rejected_not_applied() {
        let mut l = Ledger::default();
        l.book(&Transaction::Deposit {
            account: "a".into(),
            cents: 100,
        });
        let e = l.book(&Transaction::Withdraw {
            account: "a".into(),
            cents: 150,
        });
        assert!(matches!(e, LedgerEvent::OverdraftRejected { balance: 100, .. }));
        assert_eq!(l.balances["a"], 100);
        assert_eq!(l.rejected, 1);
    }
}
