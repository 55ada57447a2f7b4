//! Example ms2m microservices, shared by the runnable examples, the demo,
//! the benchmarks and the tests.
