use ms2m_core::ServiceState;

#[derive(serde::Serialize, serde::Deserialize, ServiceState)]
#[state(version = 1)]
enum Machine {
    Idle,
    #[state(skip)]
    Busy {
        #[state(skip)]
        cache: Vec<u8>,
    },
}

fn main() {}
