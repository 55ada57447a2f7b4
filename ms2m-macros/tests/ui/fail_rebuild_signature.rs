use ms2m_core::ServiceState;

#[derive(ServiceState)]
#[state(version = 1)]
struct Counter {
    items: Vec<u32>,
    #[state(skip, rebuild = Counter::sum)]
    sum: u64,
}

impl Counter {
    fn sum(items: &[u32]) -> u64 {
        items.iter().map(|&i| u64::from(i)).sum()
    }
}

fn main() {}
