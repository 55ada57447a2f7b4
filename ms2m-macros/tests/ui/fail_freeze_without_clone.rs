use ms2m_core::ServiceState;

/// `freeze` clones the state: it must be `Clone`.
#[derive(ServiceState)]
#[state(version = 1, freeze)]
struct NotClone {
    total: u64,
}

#[derive(Clone, ServiceState)]
#[state(version = 1, freeze, freeze)]
struct Twice {
    total: u64,
}

fn main() {}
