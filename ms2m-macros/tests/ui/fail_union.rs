use ms2m_core::ServiceState;

#[derive(ServiceState)]
#[state(version = 1)]
union Bits {
    int: u32,
    float: f32,
}

fn needs_state<S: ServiceState>() {}

fn main() {
    needs_state::<Bits>();
}
