//! The `ms2m` CLI, built with the tests (as `ms2m_cli`, beside ms2m-kafka's
//! own `ms2m`) so the process tests can run it.

fn main() -> std::process::ExitCode {
    ms2m_kafka::cli::main()
}
