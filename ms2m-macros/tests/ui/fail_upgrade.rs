use ms2m_core::ServiceState;

#[derive(serde::Deserialize)]
struct Old {
    total: u32,
}

#[derive(ServiceState)]
#[state(version = 2, upgrade(from = 1, via = Old), upgrade(from = 1, via = Old))]
#[state(upgrade(from = 2, via = Old), upgrade(from = 5, via = Old))]
#[state(upgrade(from = 0))]
#[state(upgrade(from = 0, via = Self))]
struct Counter {
    total: u64,
}

fn main() {}
