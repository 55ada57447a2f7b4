use std::collections::HashSet;

use ms2m_core::ServiceState;

#[derive(ServiceState)]
#[state(version = 1)]
struct Counter {
    #[state(rebuild = Counter::len)]
    a: usize,
    #[state(default = Vec::new)]
    b: Vec<u8>,
    #[state(skip, unordered)]
    c: HashSet<u8>,
    #[state(skip, skip)]
    d: u8,
}

impl Counter {
    fn len(&self) -> usize {
        0
    }
}

fn main() {}
