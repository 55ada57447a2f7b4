use ms2m_core::ServiceState;

#[derive(ServiceState)]
#[state(version = 1)]
enum Machine {
    Idle,
    Busy(u32),
}

fn main() {}
