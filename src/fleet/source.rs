//! Where the fleet comes from: static metrics URLs, the A/AAAA records of a headless Service,
//! or a Prometheus server's HTTP API; and the HTTP reads behind them, each bounded in time and
//! size.
//!
//! Prometheus mode sends two instant queries (`GET <url>/api/v1/query?query=...`) per refresh:
//! - [`SERIES_QUERY`] reads every series the fleet needs in one round trip; the answer is
//!   grouped per pod by `node_id` and the `instance` label (the `pod` label names it when
//!   present).
//! - [`TARGETS_QUERY`] tells, for every target that exported egress metrics in the last ten
//!   minutes, whether Prometheus still scrapes it. A pod whose series vanished while its `up` is
//!   0 is a failing scrape (kept, as in the other modes); a pod whose `up` series is gone too
//!   was deleted (dropped); a pod still `up` under another `node_id` was restarted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::Url;
use serde::Deserialize;

use super::parse::{ParseError, PodMetrics, SeriesReader, parse_pod_metrics};

/// The instant query reading every series the fleet needs, from all pods at once.
pub const SERIES_QUERY: &str = r#"{__name__=~"livekit_egress_(available|can_accept_request|is_terminating|is_disabled|requests)|livekit_node_cpu_load"}"#;

/// The instant query giving `up` for every target that exported egress metrics lately.
pub const TARGETS_QUERY: &str =
    "up and on (instance) last_over_time(livekit_egress_available[10m])";

/// Where the fleet observer finds the egress pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetSource {
    /// No source: zero pods, always fresh (scale from zero, nothing observed).
    None,
    /// Fixed pod metrics URLs (`--egress-metrics`, repeatable).
    Static(Vec<String>),
    /// The A/AAAA records of a headless Service, each a pod at `http://ADDR:PORT/metrics`.
    Dns {
        /// Service host name, re-resolved on every refresh.
        host: String,
        /// The egress `prometheus_port`.
        port: u16,
    },
    /// The same series read from a Prometheus server's HTTP API.
    Prometheus {
        /// Base URL of the server, e.g. `http://prometheus:9090`.
        url: String,
    },
}

/// A fleet setting is malformed or contradicts another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetConfigError {
    /// More than one of `--egress-metrics`, `--egress-dns`, `--prometheus-url` was given.
    #[error(
        "--egress-metrics, --egress-dns and --prometheus-url exclude each other: choose one fleet source"
    )]
    ConflictingSources,
    /// A URL does not parse or is not `http(s)://`.
    #[error("{flag}: invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The flag that carried it.
        flag: &'static str,
        /// The value given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--egress-dns` is not `HOST:PORT`.
    #[error("--egress-dns: expected HOST:PORT with a port of 1-65535, got {0:?}")]
    InvalidDns(String),
    /// An option is out of range.
    #[error("fleet option {name}: {reason}")]
    InvalidOption {
        /// The option.
        name: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl FleetSource {
    /// Builds the source from the `serve` flags, of which at most one kind may be given.
    pub fn from_flags(
        egress_metrics: &[String],
        egress_dns: Option<&str>,
        prometheus_url: Option<&str>,
    ) -> Result<FleetSource, FleetConfigError> {
        let given = usize::from(!egress_metrics.is_empty())
            + usize::from(egress_dns.is_some())
            + usize::from(prometheus_url.is_some());
        let source = if given > 1 {
            return Err(FleetConfigError::ConflictingSources);
        } else if let Some(dns) = egress_dns {
            let (host, port) = parse_host_port(dns)?;
            FleetSource::Dns { host, port }
        } else if let Some(url) = prometheus_url {
            FleetSource::Prometheus {
                url: url.to_owned(),
            }
        } else if !egress_metrics.is_empty() {
            FleetSource::Static(egress_metrics.to_vec())
        } else {
            FleetSource::None
        };
        source.validate()?;
        Ok(source)
    }

    /// Checks URLs and host names, so that a bad flag fails before any port is bound.
    pub fn validate(&self) -> Result<(), FleetConfigError> {
        match self {
            FleetSource::None => Ok(()),
            FleetSource::Static(urls) => urls
                .iter()
                .try_for_each(|url| http_url("--egress-metrics", url).map(drop)),
            FleetSource::Dns { host, port } => {
                if host.is_empty() || *port == 0 || host.contains(['/', ' ']) {
                    Err(FleetConfigError::InvalidDns(format!("{host}:{port}")))
                } else {
                    Ok(())
                }
            }
            FleetSource::Prometheus { url } => http_url("--prometheus-url", url).map(drop),
        }
    }

    /// Short name for logs: `none`, `static`, `dns`, `prometheus`.
    pub fn kind(&self) -> &'static str {
        match self {
            FleetSource::None => "none",
            FleetSource::Static(_) => "static",
            FleetSource::Dns { .. } => "dns",
            FleetSource::Prometheus { .. } => "prometheus",
        }
    }
}

/// Splits `HOST:PORT`; an IPv6 literal goes in brackets (`[fd00::1]:9090`).
fn parse_host_port(value: &str) -> Result<(String, u16), FleetConfigError> {
    let invalid = || FleetConfigError::InvalidDns(value.to_owned());
    let (host, port) = value.rsplit_once(':').ok_or_else(invalid)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if host.is_empty() || port == 0 {
        return Err(invalid());
    }
    Ok((host.to_owned(), port))
}

fn http_url(flag: &'static str, url: &str) -> Result<Url, FleetConfigError> {
    let invalid = |reason: String| FleetConfigError::InvalidUrl {
        flag,
        url: url.to_owned(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid(
            "expected an http:// or https:// URL with a host".to_owned(),
        ));
    }
    Ok(parsed)
}

/// Resolves the headless Service name to pod addresses (injectable for tests).
pub trait Resolver: Send + Sync {
    /// The addresses behind `host`. A name that does not resolve (NXDOMAIN, or no address
    /// records) is an error of kind [`std::io::ErrorKind::NotFound`]: the observer counts it
    /// as zero pods and warns, while any other error makes the source fail.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>>;
}

/// The system resolver (`getaddrinfo` through `tokio::net::lookup_host`), bounded in time.
///
/// Kubernetes DNS answers NXDOMAIN for a headless Service without ready endpoints, so "name
/// not known" and "no address" are `NotFound` here (zero pods, with a warning, because a
/// mistyped name looks the same); a timeout, a server failure or a temporary failure stays an
/// error.
#[derive(Debug, Clone)]
pub struct SystemResolver {
    timeout: Duration,
}

impl SystemResolver {
    /// A resolver giving up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        SystemResolver { timeout }
    }
}

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let lookup = tokio::net::lookup_host((host, port));
            match tokio::time::timeout(self.timeout, lookup).await {
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("resolving {host} timed out after {:?}", self.timeout),
                )),
                Ok(Ok(addrs)) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|addr: SocketAddr| addr.ip()).collect();
                    ips.sort();
                    ips.dedup();
                    Ok(ips)
                }
                Ok(Err(e)) if is_no_records(&e) => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host} does not resolve: {e}"),
                )),
                Ok(Err(e)) => Err(e),
            }
        })
    }
}

/// Whether a resolver's error means that the name does not resolve: `NotFound`, or the text
/// of `getaddrinfo`'s "no such name" from a resolver that passes it on.
pub(crate) fn is_no_such_name(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::NotFound || is_no_records(error)
}

/// `getaddrinfo`'s EAI_NONAME / EAI_NODATA, as std reports them (only as text), for glibc
/// and musl.
fn is_no_records(error: &std::io::Error) -> bool {
    const NO_RECORDS: [&str; 4] = [
        "Name or service not known",
        "No address associated with hostname",
        "Name does not resolve",
        "Name has no usable address",
    ];
    let text = error.to_string();
    NO_RECORDS.iter().any(|marker| text.contains(marker))
}

/// The bounded reason of a failed read, the `reason` label of the scrape error counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScrapeErrorReason {
    /// No answer within the scrape timeout.
    Timeout,
    /// Connection refused, reset or otherwise broken.
    Connect,
    /// An HTTP status other than 2xx.
    Status,
    /// The body exceeded the size limit.
    TooLarge,
    /// The body is not egress metrics.
    Parse,
    /// The DNS source failed.
    Dns,
    /// The Prometheus source failed.
    Prometheus,
}

impl ScrapeErrorReason {
    /// Every reason, for metrics.
    pub const ALL: [ScrapeErrorReason; 7] = [
        ScrapeErrorReason::Timeout,
        ScrapeErrorReason::Connect,
        ScrapeErrorReason::Status,
        ScrapeErrorReason::TooLarge,
        ScrapeErrorReason::Parse,
        ScrapeErrorReason::Dns,
        ScrapeErrorReason::Prometheus,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ScrapeErrorReason::Timeout => "timeout",
            ScrapeErrorReason::Connect => "connect",
            ScrapeErrorReason::Status => "status",
            ScrapeErrorReason::TooLarge => "too_large",
            ScrapeErrorReason::Parse => "parse",
            ScrapeErrorReason::Dns => "dns",
            ScrapeErrorReason::Prometheus => "prometheus",
        }
    }
}

/// Why one HTTP read failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScrapeError {
    /// No complete answer within the timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// A non-2xx answer.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body was larger than the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The body is not egress metrics.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

impl ScrapeError {
    /// The bounded label for metrics.
    pub fn reason(&self) -> ScrapeErrorReason {
        match self {
            ScrapeError::Timeout(_) => ScrapeErrorReason::Timeout,
            ScrapeError::Connect(_) => ScrapeErrorReason::Connect,
            ScrapeError::Status(_) => ScrapeErrorReason::Status,
            ScrapeError::TooLarge(_) => ScrapeErrorReason::TooLarge,
            ScrapeError::Parse(_) => ScrapeErrorReason::Parse,
        }
    }
}

/// Bounded HTTP reads: one shared connection pool, a timeout per read and a body size limit.
#[derive(Debug, Clone)]
pub(crate) struct HttpReader {
    client: reqwest::Client,
    timeout: Duration,
    max_body_bytes: usize,
}

impl HttpReader {
    pub(crate) fn new(
        timeout: Duration,
        max_body_bytes: usize,
        use_env_proxy: bool,
    ) -> Result<Self, FleetConfigError> {
        // reqwest is built without a rustls provider of its own; without one it panics.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(2)
            .user_agent(concat!("egress-scaler/", env!("CARGO_PKG_VERSION")));
        if !use_env_proxy {
            // Pods are cluster addresses: never send their scrapes through a proxy.
            builder = builder.no_proxy();
        }
        let client = builder
            .build()
            .map_err(|_| FleetConfigError::InvalidOption {
                name: "http client",
                reason: "the HTTP client could not be built",
            })?;
        Ok(HttpReader {
            client,
            timeout,
            max_body_bytes,
        })
    }

    /// GETs `url` and returns its 2xx body, or the failure. The timeout covers connecting,
    /// the headers and the whole body.
    pub(crate) async fn get(
        &self,
        url: Url,
        accept: &'static str,
    ) -> Result<(u16, Vec<u8>), ScrapeError> {
        let read = async {
            let mut response = self
                .client
                .get(url)
                .header(reqwest::header::ACCEPT, accept)
                .send()
                .await
                .map_err(transport_error)?;
            let status = response.status().as_u16();
            if let Some(length) = response.content_length()
                && length > self.max_body_bytes as u64
            {
                return Err(ScrapeError::TooLarge(self.max_body_bytes));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
                if body.len() + chunk.len() > self.max_body_bytes {
                    return Err(ScrapeError::TooLarge(self.max_body_bytes));
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| ScrapeError::Timeout(self.timeout))?
    }

    /// Scrapes one egress pod's metrics endpoint.
    pub(crate) async fn scrape(&self, url: &Url) -> Result<PodMetrics, ScrapeError> {
        // Ask for the text format: a Go exporter would otherwise be free to pick protobuf.
        let (status, body) = self
            .get(url.clone(), "text/plain;version=0.0.4;q=1,*/*;q=0.1")
            .await?;
        if !(200..300).contains(&status) {
            return Err(ScrapeError::Status(status));
        }
        Ok(parse_pod_metrics(&body)?)
    }
}

/// A reqwest error as a scrape error, with the innermost cause (such as "Connection refused").
fn transport_error(error: reqwest::Error) -> ScrapeError {
    if error.is_timeout() {
        // The client's own connect timeout.
        return ScrapeError::Connect("connect timed out".to_owned());
    }
    let mut cause: &dyn std::error::Error = &error;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    ScrapeError::Connect(cause.to_string())
}

/// One pod as read from Prometheus.
#[derive(Debug, Clone)]
pub(crate) struct PrometheusPod {
    /// The `pod` label, else the `instance` label.
    pub(crate) address: String,
    /// The `instance` label, to match `up`.
    pub(crate) instance: Option<String>,
    /// Its series, read as a pod's own metrics would be.
    pub(crate) metrics: Result<PodMetrics, ParseError>,
}

/// What Prometheus knows of the fleet at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct PrometheusFleet {
    /// Pods by identity (`node_id@instance`).
    pub(crate) pods: BTreeMap<String, PrometheusPod>,
    /// `up` by `instance`, for targets that exported egress metrics lately.
    pub(crate) targets_up: HashMap<String, bool>,
}

/// Reads the fleet from a Prometheus server's HTTP API.
#[derive(Debug, Clone)]
pub(crate) struct PrometheusReader {
    http: HttpReader,
    query_url: Url,
}

/// A failure of the Prometheus source.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum PrometheusError {
    /// The HTTP read failed.
    #[error("prometheus query failed: {0}")]
    Read(#[from] ScrapeError),
    /// Prometheus answered with an error.
    #[error("prometheus answered HTTP {status}: {message}")]
    Answer { status: u16, message: String },
    /// The answer is not the JSON of an instant vector.
    #[error("prometheus answer unreadable: {0}")]
    Unreadable(String),
}

#[derive(Debug, Deserialize)]
struct ApiAnswer {
    status: String,
    #[serde(default)]
    data: Option<ApiData>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ApiData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct ApiSample {
    metric: HashMap<String, String>,
    value: (f64, String),
}

impl PrometheusReader {
    pub(crate) fn new(base: &str, http: HttpReader) -> Result<Self, FleetConfigError> {
        let mut query_url = http_url("--prometheus-url", base)?;
        let path = format!("{}/api/v1/query", query_url.path().trim_end_matches('/'));
        query_url.set_path(&path);
        query_url.set_query(None);
        Ok(PrometheusReader { http, query_url })
    }

    /// Runs one instant query; the samples of the vector it returns.
    async fn query(&self, query: &str) -> Result<Vec<ApiSample>, PrometheusError> {
        let mut url = self.query_url.clone();
        url.query_pairs_mut().append_pair("query", query);
        let (status, body) = self.http.get(url, "application/json").await?;
        let answer: Result<ApiAnswer, _> = serde_json::from_slice(&body);
        if !(200..300).contains(&status) {
            let message = match answer {
                Ok(ApiAnswer {
                    error_type, error, ..
                }) => format!(
                    "{}: {}",
                    error_type.unwrap_or_default(),
                    error.unwrap_or_default()
                ),
                Err(_) => "no Prometheus API answer".to_owned(),
            };
            return Err(PrometheusError::Answer { status, message });
        }
        let answer = answer.map_err(|e| PrometheusError::Unreadable(e.to_string()))?;
        if answer.status != "success" {
            return Err(PrometheusError::Answer {
                status,
                message: format!(
                    "{}: {}",
                    answer.error_type.unwrap_or_default(),
                    answer.error.unwrap_or_default()
                ),
            });
        }
        let data = answer
            .data
            .ok_or_else(|| PrometheusError::Unreadable("no data".to_owned()))?;
        if data.result_type != "vector" {
            return Err(PrometheusError::Unreadable(format!(
                "expected a vector, got {}",
                data.result_type
            )));
        }
        serde_json::from_value(data.result).map_err(|e| PrometheusError::Unreadable(e.to_string()))
    }

    /// Both queries, grouped per pod.
    pub(crate) async fn read_fleet(&self) -> Result<PrometheusFleet, PrometheusError> {
        let (series, targets) =
            futures::future::try_join(self.query(SERIES_QUERY), self.query(TARGETS_QUERY)).await?;
        Ok(group_series(series, targets))
    }
}

fn group_series(series: Vec<ApiSample>, targets: Vec<ApiSample>) -> PrometheusFleet {
    struct Group {
        address: String,
        instance: Option<String>,
        reader: SeriesReader,
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for sample in series {
        let (Some(name), Ok(value)) = (
            sample.metric.get("__name__"),
            parse_prometheus_float(&sample.value.1),
        ) else {
            continue;
        };
        let node_id = sample.metric.get("node_id").map(String::as_str);
        let instance = sample.metric.get("instance");
        let pod = sample.metric.get("pod");
        let place = instance.or(pod).map(String::as_str).unwrap_or_default();
        let key = PodKey { node_id, place }.to_string();
        let group = groups.entry(key).or_insert_with(|| Group {
            address: pod
                .or(instance)
                .cloned()
                .unwrap_or_else(|| node_id.map_or_else(|| "unlabelled".to_owned(), str::to_owned)),
            instance: instance.cloned(),
            reader: SeriesReader::default(),
        });
        group
            .reader
            .add(name, |label| sample.metric.get(label).cloned(), value);
    }
    let pods = groups
        .into_iter()
        .map(|(key, group)| {
            (
                key,
                PrometheusPod {
                    address: group.address,
                    instance: group.instance,
                    metrics: group.reader.finish(),
                },
            )
        })
        .collect();
    let mut targets_up = HashMap::new();
    for sample in targets {
        if let (Some(instance), Ok(value)) = (
            sample.metric.get("instance"),
            parse_prometheus_float(&sample.value.1),
        ) {
            let up = targets_up.entry(instance.clone()).or_insert(false);
            *up |= value >= 0.5;
        }
    }
    PrometheusFleet { pods, targets_up }
}

/// Identity of a pod in Prometheus mode.
struct PodKey<'a> {
    node_id: Option<&'a str>,
    place: &'a str,
}

impl fmt::Display for PodKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.node_id.unwrap_or(""), self.place)
    }
}

/// Prometheus writes sample values as strings, with `NaN`, `+Inf` and `-Inf`.
fn parse_prometheus_float(value: &str) -> Result<f64, std::num::ParseFloatError> {
    match value {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        other => other.parse(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_pick_one_source() {
        assert_eq!(
            FleetSource::from_flags(&[], None, None),
            Ok(FleetSource::None)
        );
        assert_eq!(
            FleetSource::from_flags(&[], Some("egress-metrics.livekit.svc:9090"), None),
            Ok(FleetSource::Dns {
                host: "egress-metrics.livekit.svc".to_owned(),
                port: 9090
            })
        );
        assert_eq!(
            FleetSource::from_flags(&[], Some("[fd00::1]:9090"), None),
            Ok(FleetSource::Dns {
                host: "fd00::1".to_owned(),
                port: 9090
            })
        );
        assert!(matches!(
            FleetSource::from_flags(&[], Some("no-port"), None),
            Err(FleetConfigError::InvalidDns(_))
        ));
        assert!(matches!(
            FleetSource::from_flags(&["ftp://x/metrics".to_owned()], None, None),
            Err(FleetConfigError::InvalidUrl { .. })
        ));
        assert_eq!(
            FleetSource::from_flags(&["http://a/metrics".to_owned()], None, Some("http://p")),
            Err(FleetConfigError::ConflictingSources)
        );
    }

    #[test]
    fn no_records_is_told_from_failures() {
        let nxdomain = std::io::Error::other(
            "failed to lookup address information: Name or service not known",
        );
        let servfail = std::io::Error::other(
            "failed to lookup address information: Temporary failure in name resolution",
        );
        assert!(is_no_records(&nxdomain));
        assert!(!is_no_records(&servfail));
        assert!(is_no_such_name(&nxdomain));
        assert!(is_no_such_name(&std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "egress.livekit.svc does not resolve"
        )));
        assert!(!is_no_such_name(&servfail));
    }

    #[test]
    fn prometheus_series_are_grouped_per_pod() {
        let sample = |labels: &[(&str, &str)], value: &str| ApiSample {
            metric: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: (1.0, value.to_owned()),
        };
        let series = vec![
            sample(
                &[
                    ("__name__", "livekit_egress_available"),
                    ("node_id", "EG_a"),
                    ("instance", "10.0.0.1:9090"),
                    ("pod", "egress-a"),
                ],
                "0",
            ),
            sample(
                &[
                    ("__name__", "livekit_egress_requests"),
                    ("node_id", "EG_a"),
                    ("instance", "10.0.0.1:9090"),
                    ("type", "track"),
                ],
                "2",
            ),
            // The same series from a second scrape job must not double the load.
            sample(
                &[
                    ("__name__", "livekit_egress_requests"),
                    ("node_id", "EG_a"),
                    ("instance", "10.0.0.1:9090"),
                    ("type", "track"),
                    ("job", "other"),
                ],
                "2",
            ),
            sample(
                &[
                    ("__name__", "livekit_egress_available"),
                    ("node_id", "EG_b"),
                    ("instance", "10.0.0.2:9090"),
                ],
                "1",
            ),
        ];
        let targets = vec![sample(
            &[("__name__", "up"), ("instance", "10.0.0.1:9090")],
            "1",
        )];
        let fleet = group_series(series, targets);
        assert_eq!(fleet.pods.len(), 2);
        let a = &fleet.pods["EG_a@10.0.0.1:9090"];
        assert_eq!(a.address, "egress-a");
        let metrics = a.metrics.as_ref().unwrap();
        assert_eq!(metrics.active.get("track"), Some(&2));
        assert_eq!(fleet.pods["EG_b@10.0.0.2:9090"].address, "10.0.0.2:9090");
        assert_eq!(fleet.targets_up.get("10.0.0.1:9090"), Some(&true));
    }
}
