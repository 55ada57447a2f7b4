//! Telemetry of the Kafka clients, and (feature `prometheus`) an HTTP
//! endpoint for metrics and health probes.
//!
//! # librdkafka statistics and errors
//!
//! librdkafka reports what it sees (broker round trips, messages sent and
//! received, a consumer's offsets) in a statistics JSON every
//! `statistics.interval.ms`, and errors that belong to no call (a broker
//! down, an authentication failure) to a callback. Without a context of
//! ours both went to the `log` crate at best. [`ClientTelemetry`] is the
//! [`ClientContext`] of the input log's consumer and the output sink's
//! producer: it turns the statistics into the `ms2m_kafka_*` metrics of
//! [`ms2m_core::metrics`], and logs each error with `tracing` and counts it
//! in [`KAFKA_CLIENT_ERRORS`] by
//! kind. Statistics are off unless
//! [`KafkaConfig::statistics_interval`](crate::KafkaConfig::statistics_interval)
//! turns them on. (The snapshot store's and control channel's clients keep
//! librdkafka's default context: they are idle most of the time.)
//!
//! # Prometheus (feature `prometheus`)
//!
//! `serve_prometheus` installs a Prometheus recorder as the process's
//! global `metrics` recorder and serves, on one small HTTP/1 listener:
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | the Prometheus text format |
//! | `/health/live` | 200 if the [`Health`](ms2m_core::Health) is live, else 503 |
//! | `/health/ready` | 200 if it is ready, else 503 (503 while no health is set) |
//!
//! The exporter's own hyper-based listener is not used: it serves only the
//! metrics, and the probes belong on the same port. The listener here reads
//! one request line per connection and answers with `Connection: close`,
//! which is all a scraper or a kubelet needs.

use metrics::{counter, gauge};
use ms2m_core::metrics::{
    KAFKA_BROKER_RTT_SECONDS, KAFKA_CLIENT_ERRORS, KAFKA_CONSUMER_LAG, KAFKA_RX_MESSAGES, KAFKA_TX_MESSAGES, SERVICE,
};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError as RdKafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tracing::warn;

#[cfg(feature = "prometheus")]
pub use self::prometheus::{serve_prometheus, PrometheusServer};

/// The [`ClientContext`] of the backends' main clients: librdkafka
/// statistics to metrics, errors to `tracing` and a counter (see
/// [the module docs](self)).
#[derive(Clone, Debug)]
pub struct ClientTelemetry {
    service: String,
    client: &'static str,
}

impl ClientTelemetry {
    /// The context of `service`'s client in role `client` (`log`, `sink`, …).
    pub fn new(service: impl Into<String>, client: &'static str) -> Self {
        Self {
            service: service.into(),
            client,
        }
    }

    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![(SERVICE, self.service.clone()), ("client", self.client.to_string())]
    }

    fn with(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut labels = self.labels();
        labels.extend_from_slice(extra);
        labels
    }

    /// Records one statistics report.
    pub fn record(&self, stats: &Statistics) {
        let labels = self.labels();
        counter!(KAFKA_TX_MESSAGES, &labels).absolute(stats.txmsgs.max(0) as u64);
        counter!(KAFKA_RX_MESSAGES, &labels).absolute(stats.rxmsgs.max(0) as u64);
        for broker in stats.brokers.values() {
            if let Some(rtt) = broker.rtt.as_ref().filter(|w| w.cnt > 0) {
                let l = self.with(&[("broker", broker.name.clone())]);
                gauge!(KAFKA_BROKER_RTT_SECONDS, &l).set(rtt.avg as f64 / 1e6);
            }
        }
        for (topic, t) in &stats.topics {
            for (partition, p) in t.partitions.iter().filter(|(id, _)| **id >= 0) {
                if let Some(lag) = consumer_lag(p.ls_offset, p.hi_offset, p.app_offset) {
                    let l = self.with(&[("topic", topic.clone()), ("partition", partition.to_string())]);
                    gauge!(KAFKA_CONSUMER_LAG, &l).set(lag as f64);
                }
            }
        }
    }
}

/// A consumer's lag on a partition it reads: the end it may read to (the
/// last stable offset under `read_committed`, else the high watermark) minus
/// the next offset handed to the application. `None` for partitions it
/// does not consume (a producer's statistics list them too).
fn consumer_lag(last_stable: i64, high: i64, next: i64) -> Option<i64> {
    let end = if last_stable >= 0 { last_stable } else { high };
    (next >= 0 && end >= 0).then(|| (end - next).max(0))
}

impl ClientContext for ClientTelemetry {
    fn stats(&self, statistics: Statistics) {
        self.record(&statistics);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        let kind = error
            .rdkafka_error_code()
            .map_or_else(|| "other".to_string(), |code| format!("{code:?}"));
        warn!(service = %self.service, client = self.client, %kind, %error, reason, "librdkafka error");
        counter!(KAFKA_CLIENT_ERRORS, &self.with(&[("kind", kind)])).increment(1);
    }
}

impl ConsumerContext for ClientTelemetry {}

#[cfg(feature = "prometheus")]
mod prometheus {
    //! The recorder and the listener (see the parent module).

    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use ms2m_core::Health;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tracing::{debug, info};

    use crate::error::{KafkaError, Result};

    /// The recorder this crate installed, shared by every server.
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// A running `/metrics` and `/health/*` listener; stops when dropped.
    #[derive(Debug)]
    pub struct PrometheusServer {
        addr: SocketAddr,
        handle: PrometheusHandle,
        health: Arc<Mutex<Option<Health>>>,
        task: JoinHandle<()>,
    }

    impl PrometheusServer {
        /// The address it listens on (the bound port when asked for port 0).
        pub fn local_addr(&self) -> SocketAddr {
            self.addr
        }

        /// Serves `health` on `/health/live` and `/health/ready` from now on
        /// (an instance's [`health`](ms2m_core::Instance::health), or a node's).
        pub fn set_health(&self, health: Health) {
            *self.health.lock().unwrap_or_else(|p| p.into_inner()) = Some(health);
        }

        /// The metrics in the Prometheus text format, as `/metrics` serves them.
        pub fn render(&self) -> String {
            self.handle.render()
        }
    }

    impl Drop for PrometheusServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Installs the Prometheus recorder (once per process; later calls
    /// reuse it) and serves `/metrics`, `/health/live` and `/health/ready`
    /// on `addr` (port 0: any free port, see
    /// [`local_addr`](PrometheusServer::local_addr)). `health`, if given,
    /// answers the probes; [`set_health`](PrometheusServer::set_health)
    /// sets or replaces it later.
    ///
    /// # Errors
    ///
    /// [`KafkaError::Config`] if another `metrics` recorder is installed
    /// or `addr` cannot be bound.
    pub async fn serve_prometheus(addr: SocketAddr, health: Option<Health>) -> Result<PrometheusServer> {
        let handle = recorder()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| KafkaError::Config(format!("cannot listen on {addr} for metrics: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| KafkaError::Config(format!("metrics listener address: {e}")))?;
        let health = Arc::new(Mutex::new(health));
        let task = tokio::spawn(serve(listener, handle.clone(), health.clone()));
        info!(%addr, "serving /metrics, /health/live and /health/ready");
        Ok(PrometheusServer {
            addr,
            handle,
            health,
            task,
        })
    }

    fn recorder() -> Result<PrometheusHandle> {
        if let Some(handle) = HANDLE.get() {
            return Ok(handle.clone());
        }
        let handle = PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| KafkaError::Config(format!("cannot install the Prometheus recorder: {e}")))?;
        ms2m_core::metrics::describe();
        Ok(HANDLE.get_or_init(|| handle).clone())
    }

    /// Accepts connections until aborted; runs the recorder's upkeep
    /// (draining histograms) every few seconds.
    async fn serve(listener: TcpListener, handle: PrometheusHandle, health: Arc<Mutex<Option<Health>>>) {
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep.tick() => handle.run_upkeep(),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let (handle, health) = (handle.clone(), health.clone());
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, &handle, &health).await {
                                debug!(error = %e, "metrics request failed");
                            }
                        });
                    }
                    Err(e) => debug!(error = %e, "metrics listener accept failed"),
                },
            }
        }
    }

    /// Reads the request head, writes one response, closes.
    async fn answer(
        mut stream: TcpStream,
        handle: &PrometheusHandle,
        health: &Mutex<Option<Health>>,
    ) -> std::io::Result<()> {
        let path = read_path(&mut stream).await?;
        let health = health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (status, content_type, body) = match path.as_str() {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
            "/health/live" => probe(health.as_ref().is_some_and(Health::is_live)),
            "/health/ready" => probe(health.as_ref().is_some_and(Health::is_ready)),
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    }

    fn probe(ok: bool) -> (&'static str, &'static str, String) {
        match ok {
            true => ("200 OK", "text/plain", "ok\n".to_string()),
            false => ("503 Service Unavailable", "text/plain", "unavailable\n".to_string()),
        }
    }

    /// The path of the request line (`GET /path HTTP/1.x`), reading the
    /// head up to its blank line (at most 8 KiB, 5 s).
    async fn read_path(stream: &mut TcpStream) -> std::io::Result<String> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        let read = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        let line = String::from_utf8_lossy(&head);
        let target = line.split_whitespace().nth(1).unwrap_or("/");
        Ok(target.split('?').next().unwrap_or("/").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_lag_is_the_readable_end_minus_the_next_offset() {
        assert_eq!(consumer_lag(10, 12, 3), Some(7), "last stable offset first");
        assert_eq!(consumer_lag(-1, 12, 3), Some(9), "else the high watermark");
        assert_eq!(
            consumer_lag(10, 12, -1001),
            None,
            "not consumed (a producer's partition)"
        );
        assert_eq!(consumer_lag(3, 3, 5), Some(0));
    }
}
