use ms2m_core::ServiceState;

struct Handle(std::fs::File);

#[derive(ServiceState)]
#[state(version = 1)]
struct Service {
    total: u64,
    #[state(skip)]
    handle: Handle,
    #[state(skip, rebuild = Service::handle)]
    other: Handle,
}

impl Service {
    fn handle(&self) -> Handle {
        unimplemented!()
    }
}

fn main() {}
