//! Where the CLI's Kafka settings come from. An operator's tool has to
//! work from a shell, a container's environment and a checked-in file at
//! once, so each setting is taken from the first of:
//!
//! 1. flags (`--bootstrap-servers`, `--service`, the topic flags, then
//!    `-X key=value`: `--bootstrap-servers` beats `-X bootstrap.servers`);
//! 2. the environment (`MS2M_BOOTSTRAP_SERVERS`, `MS2M_SERVICE`);
//! 3. the file given by `--config` (or `MS2M_CONFIG`): librdkafka-style
//!    `KEY=VALUE` lines as for kcat's `-F` (`#` comments), where the
//!    `ms2m.*` keys name the service and topics and every other key is a
//!    librdkafka property (security settings included);
//! 4. [`KafkaConfig`]'s defaults (topic names derived from the service).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::error::CliError;
use crate::KafkaConfig;

/// File key naming the service.
pub const FILE_SERVICE: &str = "ms2m.service";
/// File key naming the control topic.
pub const FILE_CONTROL_TOPIC: &str = "ms2m.control.topic";
/// File key naming the snapshot topic.
pub const FILE_SNAPSHOT_TOPIC: &str = "ms2m.snapshot.topic";
/// File key listing the input topics (comma-separated).
pub const FILE_INPUT_TOPICS: &str = "ms2m.input.topics";
/// File key naming the service's consumer group.
pub const FILE_GROUP_ID: &str = "ms2m.group.id";
/// Environment variable for the bootstrap servers.
pub const ENV_BOOTSTRAP: &str = "MS2M_BOOTSTRAP_SERVERS";
/// Environment variable for the service name.
pub const ENV_SERVICE: &str = "MS2M_SERVICE";
/// Environment variable for the configuration file.
pub const ENV_CONFIG: &str = "MS2M_CONFIG";

/// The options every command takes.
#[derive(Args, Clone, Debug, Default, PartialEq, Eq)]
#[command(next_help_heading = "Connection and naming (every command)")]
pub struct GlobalArgs {
    /// Kafka brokers, HOST:PORT[,HOST:PORT…] [env: MS2M_BOOTSTRAP_SERVERS]
    #[arg(long, short = 'b', global = true, value_name = "HOSTS")]
    pub bootstrap_servers: Option<String>,
    /// The service: its StatefulService::NAME, which names its topics and
    /// filters the control channel [env: MS2M_SERVICE]
    #[arg(long, short = 's', global = true, value_name = "NAME")]
    pub service: Option<String>,
    /// A KEY=VALUE properties file: librdkafka properties plus ms2m.service,
    /// ms2m.control.topic, ms2m.snapshot.topic, ms2m.input.topics, ms2m.group.id
    /// [env: MS2M_CONFIG]
    #[arg(long, short = 'F', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A librdkafka property passed to every client (repeatable), e.g.
    /// -X security.protocol=SASL_SSL -X sasl.username=ops (put passwords in
    /// the --config file: arguments show in the process list)
    #[arg(short = 'X', global = true, value_name = "KEY=VALUE", value_parser = parse_property)]
    pub property: Vec<(String, String)>,
    /// Control topic (default: {service}.control)
    #[arg(long, global = true, value_name = "TOPIC")]
    pub control_topic: Option<String>,
    /// Snapshot topic (default: {service}.snapshots)
    #[arg(long, global = true, value_name = "TOPIC")]
    pub snapshot_topic: Option<String>,
    /// Input topic (repeatable); `status` reports its lag (default: the
    /// topics of the latest snapshot's position)
    #[arg(long = "input-topic", global = true, value_name = "TOPIC")]
    pub input_topics: Vec<String>,
    /// Consumer group of the service's committed input offsets (default: {service})
    #[arg(long, global = true, value_name = "GROUP")]
    pub group_id: Option<String>,
    /// Timeout of one broker operation (e.g. 30s, 500ms)
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub operation_timeout: Option<Duration>,
}

/// Parses `-X key=value`.
pub fn parse_property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!(
            "expected KEY=VALUE (a librdkafka property, e.g. security.protocol=SASL_SSL), found `{text}`"
        )),
    }
}

/// Parses a bare number of seconds (`1.5`) or what `humantime` reads
/// (`250ms`, `30s`, `2m`, `1m 30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"));
    }
    humantime::parse_duration(t).map_err(|e| format!("expected a duration such as 30s or 500ms, found `{text}`: {e}"))
}

/// The settings of one invocation, all layers applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The service.
    pub service: String,
    /// The brokers.
    pub bootstrap_servers: String,
    /// librdkafka passthrough properties (without `bootstrap.servers`).
    pub properties: BTreeMap<String, String>,
    /// Control topic override.
    pub control_topic: Option<String>,
    /// Snapshot topic override.
    pub snapshot_topic: Option<String>,
    /// Input topics.
    pub input_topics: Vec<String>,
    /// Consumer group override.
    pub group_id: Option<String>,
    /// Operation timeout override.
    pub operation_timeout: Option<Duration>,
}

impl Settings {
    /// Resolves `args` against the process environment and the file it
    /// names (`--config`, else `MS2M_CONFIG`).
    pub fn resolve(args: &GlobalArgs) -> Result<Self, CliError> {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        let path = args.config.clone().or_else(|| env(ENV_CONFIG).map(PathBuf::from));
        let file = match &path {
            Some(p) => read_file(p)?,
            None => BTreeMap::new(),
        };
        Self::layer(args, &env, file)
    }

    /// Applies the layers: `args` over `env` over `file` (module docs).
    pub fn layer(
        args: &GlobalArgs,
        env: &dyn Fn(&str) -> Option<String>,
        mut file: BTreeMap<String, String>,
    ) -> Result<Self, CliError> {
        let mut take = |key: &str| file.remove(key).filter(|v| !v.is_empty());
        let file_service = take(FILE_SERVICE);
        let file_control = take(FILE_CONTROL_TOPIC);
        let file_snapshot = take(FILE_SNAPSHOT_TOPIC);
        let file_inputs = take(FILE_INPUT_TOPICS);
        let file_group = take(FILE_GROUP_ID);
        let file_bootstrap = take("bootstrap.servers");
        let mut properties = file;
        let mut flag_bootstrap = None;
        for (k, v) in &args.property {
            if k == "bootstrap.servers" {
                flag_bootstrap = Some(v.clone());
            } else {
                properties.insert(k.clone(), v.clone());
            }
        }
        let service = first([args.service.clone(), env(ENV_SERVICE), file_service]).ok_or(CliError::NoService)?;
        let bootstrap_servers = first([
            args.bootstrap_servers.clone(),
            flag_bootstrap,
            env(ENV_BOOTSTRAP),
            file_bootstrap,
        ])
        .ok_or(CliError::NoBroker)?;
        let input_topics = if args.input_topics.is_empty() {
            split_list(file_inputs.as_deref().unwrap_or(""))
        } else {
            args.input_topics.clone()
        };
        Ok(Self {
            service,
            bootstrap_servers,
            properties,
            control_topic: args.control_topic.clone().or(file_control),
            snapshot_topic: args.snapshot_topic.clone().or(file_snapshot),
            input_topics,
            group_id: args.group_id.clone().or(file_group),
            operation_timeout: args.operation_timeout,
        })
    }

    /// The library configuration these settings describe.
    pub fn kafka_config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(&self.service).bootstrap_servers(&self.bootstrap_servers);
        for (k, v) in &self.properties {
            c = c.set(k, v);
        }
        for t in &self.input_topics {
            c = c.input_topic(t);
        }
        if let Some(t) = &self.control_topic {
            c = c.control_topic_name(t);
        }
        if let Some(t) = &self.snapshot_topic {
            c = c.snapshot_topic_name(t);
        }
        if let Some(g) = &self.group_id {
            c = c.group_id_name(g);
        }
        if let Some(t) = self.operation_timeout {
            c = c.operation_timeout(t);
        }
        c
    }
}

fn first<const N: usize>(candidates: [Option<String>; N]) -> Option<String> {
    candidates.into_iter().flatten().find(|v| !v.trim().is_empty())
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

fn read_file(path: &Path) -> Result<BTreeMap<String, String>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::ConfigFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_properties(path, &text)
}

/// Parses a `KEY=VALUE` file: blank lines and `#` comments are skipped,
/// whitespace around keys and values trimmed, later lines win.
pub fn parse_properties(path: &Path, text: &str) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = parse_property(line).map_err(|_| CliError::ConfigLine {
            path: path.to_path_buf(),
            line: i + 1,
            text: line.to_string(),
        })?;
        out.insert(k, v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> BTreeMap<String, String> {
        parse_properties(Path::new("test.properties"), text).unwrap()
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| v.to_string())
    }

    const FILE: &str = "# a comment\n\
        bootstrap.servers = file:9092\n\
        ms2m.service=from-file\n\
        ms2m.input.topics = a, b\n\
        security.protocol=SASL_SSL\n\
        sasl.username=file-user\n";

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let env = env_of(&[(ENV_BOOTSTRAP, "env:9092"), (ENV_SERVICE, "from-env")]);
        let none = GlobalArgs::default();
        let s = Settings::layer(&none, &env, file(FILE)).unwrap();
        assert_eq!(
            (s.service.as_str(), s.bootstrap_servers.as_str()),
            ("from-env", "env:9092")
        );
        let flags = GlobalArgs {
            service: Some("from-flag".into()),
            bootstrap_servers: Some("flag:9092".into()),
            ..GlobalArgs::default()
        };
        let s = Settings::layer(&flags, &env, file(FILE)).unwrap();
        assert_eq!(
            (s.service.as_str(), s.bootstrap_servers.as_str()),
            ("from-flag", "flag:9092")
        );
        let s = Settings::layer(&none, &env_of(&[]), file(FILE)).unwrap();
        assert_eq!(
            (s.service.as_str(), s.bootstrap_servers.as_str()),
            ("from-file", "file:9092")
        );
        assert_eq!(s.input_topics, ["a", "b"]);
    }

    #[test]
    fn x_properties_override_the_file_and_bootstrap_via_x_beats_the_environment() {
        let args = GlobalArgs {
            property: vec![
                ("sasl.username".into(), "flag-user".into()),
                ("bootstrap.servers".into(), "x:9092".into()),
            ],
            ..GlobalArgs::default()
        };
        let s = Settings::layer(&args, &env_of(&[(ENV_BOOTSTRAP, "env:9092")]), file(FILE)).unwrap();
        assert_eq!(s.bootstrap_servers, "x:9092");
        assert_eq!(s.properties["sasl.username"], "flag-user");
        assert_eq!(s.properties["security.protocol"], "SASL_SSL");
        assert!(!s.properties.contains_key("bootstrap.servers") && !s.properties.contains_key(FILE_SERVICE));
        let explicit = GlobalArgs {
            bootstrap_servers: Some("flag:9092".into()),
            ..args
        };
        let s = Settings::layer(&explicit, &env_of(&[]), file(FILE)).unwrap();
        assert_eq!(s.bootstrap_servers, "flag:9092");
    }

    #[test]
    fn missing_service_or_broker_names_every_way_to_give_it() {
        let e = Settings::layer(&GlobalArgs::default(), &env_of(&[]), BTreeMap::new()).unwrap_err();
        assert!(
            matches!(e, CliError::NoService) && e.to_string().contains("MS2M_SERVICE"),
            "{e}"
        );
        assert_eq!(e.exit_code(), 2);
        let e = Settings::layer(&GlobalArgs::default(), &env_of(&[(ENV_SERVICE, "s")]), BTreeMap::new()).unwrap_err();
        assert!(
            matches!(e, CliError::NoBroker) && e.to_string().contains("--bootstrap-servers"),
            "{e}"
        );
    }

    #[test]
    fn the_kafka_config_carries_names_and_passthrough() {
        let args = GlobalArgs {
            control_topic: Some("ctl".into()),
            group_id: Some("grp".into()),
            ..GlobalArgs::default()
        };
        let s = Settings::layer(&args, &env_of(&[]), file(FILE)).unwrap();
        let c = s.kafka_config();
        assert_eq!(
            (c.control_topic(), c.snapshot_topic()),
            ("ctl".into(), "from-file.snapshots".into())
        );
        assert_eq!(c.group_id(), "grp");
        assert_eq!(c.configured_bootstrap_servers(), Some("file:9092"));
        assert!(c.settings().any(|(k, v)| k == "security.protocol" && v == "SASL_SSL"));
    }

    #[test]
    fn malformed_lines_and_properties_are_refused_with_their_place() {
        let e = parse_properties(Path::new("f"), "a=1\nno equals sign\n").unwrap_err();
        assert!(e.to_string().starts_with("f:2:"), "{e}");
        assert!(parse_property("=v").is_err());
        assert_eq!(parse_property("k=a=b").unwrap(), ("k".into(), "a=b".into()));
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("5 parsecs").is_err() && parse_duration("x").is_err());
    }
}
