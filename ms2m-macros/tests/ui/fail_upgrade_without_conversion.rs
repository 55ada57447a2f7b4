use ms2m_core::ServiceState;

#[derive(serde::Deserialize)]
struct V1 {
    total: u32,
}

struct NotDecodable;

#[derive(ServiceState)]
#[state(version = 2, upgrade(from = 1, via = V1))]
#[state(upgrade(from = 0, via = NotDecodable))]
struct Counter {
    total: u64,
}

impl From<NotDecodable> for Counter {
    fn from(_: NotDecodable) -> Self {
        Counter { total: 0 }
    }
}

fn main() {}
