use ms2m_core::ServiceState;

#[derive(ServiceState)]
#[state(version = 1)]
#[state(version = 2)]
struct Counter {
    total: u64,
}

fn main() {}
