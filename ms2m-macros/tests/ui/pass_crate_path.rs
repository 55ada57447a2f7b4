// A user who renamed the dependency points the derive at it.
extern crate ms2m_core as my_ms2m;

use my_ms2m::ServiceState;

#[derive(ServiceState)]
#[state(version = 1, crate = "my_ms2m")]
struct Renamed {
    n: u8,
}

fn main() {
    assert_eq!(Renamed::restore(1, &Renamed { n: 3 }.snapshot().unwrap()).unwrap().n, 3);
}
