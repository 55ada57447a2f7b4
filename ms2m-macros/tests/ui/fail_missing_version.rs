use ms2m_core::ServiceState;

#[derive(ServiceState)]
struct Counter {
    total: u64,
}

#[derive(ServiceState)]
#[state(version = "2", crate = ms2m_core)]
struct Quoted {
    total: u64,
}

#[derive(ServiceState)]
#[state(version = 4294967296, upgrade(from = -1, via = u8))]
struct TooBig {
    total: u64,
}

fn main() {}
