//! The `ms2m` operator CLI; everything is in [`ms2m_kafka::cli`].
//! Install with `cargo install --path ms2m-kafka --features cli`.

fn main() -> std::process::ExitCode {
    ms2m_kafka::cli::main()
}
