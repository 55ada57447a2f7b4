//! Compile-time behaviour of `#[derive(ServiceState)]`: every misuse gives
//! a spanned error and nothing else; valid uses compile and run.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass_*.rs");
    t.compile_fail("tests/ui/fail_*.rs");
}
