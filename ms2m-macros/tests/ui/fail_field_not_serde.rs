use ms2m_core::ServiceState;

struct Opaque;

#[derive(ServiceState)]
#[state(version = 1)]
struct Service {
    total: u64,
    opaque: Opaque,
}

fn main() {}
