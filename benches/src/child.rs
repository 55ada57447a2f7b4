//! The harness re-executed as a child process (a migration role, a fleet
//! node, a task host): `harness FLAG SPEC_JSON`, the spec's JSON as its
//! second argument, its stdout read line by line on a thread of the
//! parent. Closing the child's stdin asks it to stop ([`parent_gone`]
//! resolves in the child); dropping the [`Child`] kills it, on every exit
//! path of the parent.

use std::io::{BufRead, BufReader};
use std::process::{ChildStdin, Command, Stdio};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::BoxError;

/// A child process of the harness, seen from the parent.
#[derive(Debug)]
pub struct Child {
    process: std::process::Child,
    stdin: Option<ChildStdin>,
}

impl Child {
    /// Starts the harness again with `flag` and `spec` (and `env` added to
    /// its environment); each line the child prints goes to `on_line`, and
    /// `on_close` runs once its stdout closes.
    pub fn start(
        flag: &str,
        spec: &impl Serialize,
        env: &[(&str, &str)],
        mut on_line: impl FnMut(String) + Send + 'static,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<Self, BoxError> {
        let mut process = Command::new(std::env::current_exe()?)
            .arg(flag)
            .arg(serde_json::to_string(spec)?)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = process.stdout.take().ok_or("child stdout not captured")?;
        std::thread::Builder::new()
            .name(format!("ms2m-child{flag}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    on_line(line);
                }
                on_close();
            })?;
        Ok(Self {
            stdin: process.stdin.take(),
            process,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Closes the child's stdin: it stops.
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.process.try_wait(), Ok(Some(_)))
    }

    /// `SIGKILL`s the child and reaps it.
    pub fn kill(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.close_stdin();
        self.kill();
    }
}

/// In a child started with `flag`, its spec; `None` in any other process.
pub fn requested<S: DeserializeOwned>(flag: &str) -> Option<Result<S, BoxError>> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some(flag) {
        return None;
    }
    Some(match args.next() {
        Some(json) => serde_json::from_str(&json).map_err(BoxError::from),
        None => Err(format!("{flag}: missing the spec argument").into()),
    })
}

/// The exit code of a child's run, its error printed.
pub fn exit_code(what: &str, result: Result<(), BoxError>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{what}: {e}");
            1
        }
    }
}

/// In a child: resolves once the parent closed our stdin (or died).
pub async fn parent_gone() {
    let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink())).await;
}
