use ms2m_core::ServiceState;

// Reported together with the attribute error below, and no "trait not
// implemented" follows at the use in `main`.
#[derive(ServiceState)]
#[state(version = 1, upgrade(from = 1, via = u8))]
struct Wrapper<T> {
    inner: T,
}

#[derive(ServiceState)]
#[state(version = 1)]
struct Borrowed<'a> {
    name: &'a str,
}

fn needs_state<S: ServiceState>() {}

fn main() {
    needs_state::<Wrapper<u8>>();
    needs_state::<Borrowed<'static>>();
}
