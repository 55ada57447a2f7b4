// An enum state with two upgrade paths, one through a serde-only old type.
use ms2m_core::ServiceState;

#[derive(serde::Deserialize)]
enum V1 {
    Off,
    On(u8),
}

#[derive(serde::Serialize, serde::Deserialize)]
enum V2 {
    Off,
    On(u16),
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, ServiceState)]
#[state(version = 3, upgrade(from = 1, via = V1))]
#[state(upgrade(from = 2, via = V2))]
enum Switch {
    Off,
    On { level: u32 },
}

impl From<V1> for Switch {
    fn from(v: V1) -> Self {
        match v {
            V1::Off => Switch::Off,
            V1::On(l) => Switch::On { level: l.into() },
        }
    }
}

impl From<V2> for Switch {
    fn from(v: V2) -> Self {
        match v {
            V2::Off => Switch::Off,
            V2::On(l) => Switch::On { level: l.into() },
        }
    }
}

fn main() {
    let v2 = ms2m_core::codec::encode(&V2::On(300)).unwrap();
    assert_eq!(Switch::restore(2, &v2).unwrap(), Switch::On { level: 300 });
    let s = Switch::On { level: 9 };
    assert_eq!(Switch::restore(3, &s.snapshot().unwrap()).unwrap(), s);
}
