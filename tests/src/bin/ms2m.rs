//! The `ms2m` CLI, built with the tests so the process tests can run it.

fn main() -> std::process::ExitCode {
    ms2m_kafka::cli::main()
}
