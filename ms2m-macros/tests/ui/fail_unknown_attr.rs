use ms2m_core::ServiceState;

#[derive(ServiceState)]
#[state(verison = 1, version = 1, upgrade(frm = 0, via = u8))]
struct Counter {
    #[state(skp)]
    total: u64,
    #[state(skip, rebuilt = Counter::f)]
    cache: u64,
}

fn needs_state<S: ServiceState>() {}

fn main() {
    needs_state::<Counter>();
}
