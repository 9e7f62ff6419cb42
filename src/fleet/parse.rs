//! Egress pod metric text (DESIGN.md 2.2) -> [`PodMetrics`].
//!
//! The text is read with `prometheus-parse`, which handles HELP/TYPE lines, comments,
//! Go-style float values and timestamps. Its label splitter, though, cuts on every `,` and `=`
//! and stops at the first `}`, so an escaped label value (`cluster_id="a \"b\", c"`) would be
//! misread or the whole sample dropped. Each sample line of interest is therefore first
//! rewritten: its label block is read here with the escapes of the text format and written
//! back with the few characters that confuse the splitter percent-encoded, and the label
//! values the fleet reads are decoded again afterwards. Lines of other metrics are skipped
//! before parsing: a real egress pod also exports the Go runtime metrics, which we never read.

use std::borrow::Cow;
use std::collections::BTreeMap;

use prometheus_parse::{Scrape, Value};
use serde::Serialize;

/// `livekit_egress_available`: 1 only when the pod has no active egress.
pub const AVAILABLE: &str = "livekit_egress_available";
/// `livekit_egress_can_accept_request`: 1 when one more video composite fits now.
pub const CAN_ACCEPT_REQUEST: &str = "livekit_egress_can_accept_request";
/// `livekit_egress_requests{type}`: active egress by type.
pub const REQUESTS: &str = "livekit_egress_requests";
/// `livekit_egress_is_terminating`: draining after SIGTERM.
pub const IS_TERMINATING: &str = "livekit_egress_is_terminating";
/// `livekit_egress_is_disabled`: disabled by its config.
pub const IS_DISABLED: &str = "livekit_egress_is_disabled";
/// `livekit_node_cpu_load`: measured CPU load, 0..1.
pub const CPU_LOAD: &str = "livekit_node_cpu_load";

/// The single-valued series a current egress pod always exports. `livekit_egress_requests`
/// is not among them: its per-type series only appear once a job of that type ran.
const EXPECTED: [&str; 5] = [
    AVAILABLE,
    CAN_ACCEPT_REQUEST,
    IS_TERMINATING,
    IS_DISABLED,
    CPU_LOAD,
];

/// The `type` reported for a pod that says it is busy (`livekit_egress_available` 0) while no
/// `livekit_egress_requests` series explains it: a job accepted but not started yet, or an
/// egress version without that series. It is charged as a room composite (the safe side).
pub const UNREPORTED_TYPE: &str = "unreported";

/// What one egress pod reported about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PodMetrics {
    /// The `node_id` label, the egress instance's own id.
    pub node_id: Option<String>,
    /// The `cluster_id` label; open-source livekit-server sends no job to a pod that sets it.
    pub cluster_id: Option<String>,
    /// Active egress by the `type` label of `livekit_egress_requests`, zero counts left out.
    pub active: BTreeMap<String, u64>,
    /// `livekit_egress_available`.
    pub available: Option<bool>,
    /// `livekit_egress_can_accept_request`.
    pub can_accept_request: Option<bool>,
    /// `livekit_egress_is_terminating`.
    pub is_terminating: Option<bool>,
    /// `livekit_egress_is_disabled`.
    pub is_disabled: Option<bool>,
    /// `livekit_node_cpu_load`, 0..1.
    pub cpu_load: Option<f64>,
    /// Series (and `node_id`) a current egress exports but this pod did not.
    pub missing_series: Vec<String>,
}

/// The text is not egress pod metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The body is not UTF-8 text.
    #[error("metrics body is not UTF-8 text")]
    NotText,
    /// No `livekit_egress_*` sample at all: not an egress pod, or not metrics.
    #[error("no livekit_egress_* series in the metrics body")]
    NoEgressSeries,
}

/// Parses the metric text of one egress pod.
pub fn parse_pod_metrics(body: &[u8]) -> Result<PodMetrics, ParseError> {
    let text = std::str::from_utf8(body).map_err(|_| ParseError::NotText)?;
    let lines = text
        .lines()
        .filter_map(rewrite_line)
        .map(|line| Ok(line.into_owned()));
    // The iterator never yields an error, so neither does the parser.
    let scrape = Scrape::parse(lines).map_err(|_| ParseError::NotText)?;
    let mut reader = SeriesReader::default();
    for sample in &scrape.samples {
        let value = match sample.value {
            Value::Gauge(v) | Value::Untyped(v) | Value::Counter(v) => v,
            Value::Histogram(_) | Value::Summary(_) => continue,
        };
        reader.add(
            &sample.metric,
            |name| sample.labels.get(name).map(decode_label_value),
            value,
        );
    }
    reader.finish()
}

/// Collects the samples of one pod, from the text format or from a Prometheus query.
#[derive(Debug, Default)]
pub(crate) struct SeriesReader {
    node_id: Option<String>,
    cluster_id: Option<String>,
    requests: BTreeMap<String, f64>,
    available: Option<bool>,
    can_accept_request: Option<bool>,
    is_terminating: Option<bool>,
    is_disabled: Option<bool>,
    cpu_load: Option<f64>,
    egress_series: bool,
}

impl SeriesReader {
    /// Takes one sample; `label` looks up a label value by name.
    pub(crate) fn add(&mut self, name: &str, label: impl Fn(&str) -> Option<String>, value: f64) {
        if !name.starts_with("livekit_") {
            return;
        }
        if name.starts_with("livekit_egress_") {
            self.egress_series = true;
        }
        let known = matches!(
            name,
            AVAILABLE | CAN_ACCEPT_REQUEST | REQUESTS | IS_TERMINATING | IS_DISABLED | CPU_LOAD
        );
        if !known {
            return;
        }
        // The idle flag's labels are the pod's identity; other series fill gaps.
        if name == AVAILABLE || self.node_id.is_none() {
            if let Some(node_id) = label("node_id") {
                self.node_id = Some(node_id);
            }
            if let Some(cluster_id) = label("cluster_id") {
                self.cluster_id = Some(cluster_id);
            }
        }
        if value.is_nan() {
            return;
        }
        let flag = value >= 0.5;
        match name {
            AVAILABLE => self.available = Some(flag),
            CAN_ACCEPT_REQUEST => self.can_accept_request = Some(flag),
            IS_TERMINATING => self.is_terminating = Some(flag),
            IS_DISABLED => self.is_disabled = Some(flag),
            CPU_LOAD => self.cpu_load = Some(value),
            _ => {
                let kind = label("type").unwrap_or_default();
                // The same series seen twice (two Prometheus jobs scraping one pod) must not
                // double the load, so duplicates keep the larger value instead of adding up.
                let count = self.requests.entry(kind).or_insert(0.0);
                *count = count.max(value);
            }
        }
    }

    /// The pod's metrics, or an error when no egress series was seen at all.
    pub(crate) fn finish(self) -> Result<PodMetrics, ParseError> {
        if !self.egress_series {
            return Err(ParseError::NoEgressSeries);
        }
        let mut active: BTreeMap<String, u64> = self
            .requests
            .into_iter()
            .filter(|(_, count)| *count >= 0.5)
            .map(|(kind, count)| (kind, count.round().min(1e9) as u64))
            .collect();
        if active.is_empty() && self.available == Some(false) && self.is_disabled != Some(true) {
            active.insert(UNREPORTED_TYPE.to_owned(), 1);
        }
        let present = |name: &str| match name {
            AVAILABLE => self.available.is_some(),
            CAN_ACCEPT_REQUEST => self.can_accept_request.is_some(),
            IS_TERMINATING => self.is_terminating.is_some(),
            IS_DISABLED => self.is_disabled.is_some(),
            _ => self.cpu_load.is_some(),
        };
        let mut missing_series: Vec<String> = EXPECTED
            .into_iter()
            .filter(|name| !present(name))
            .map(str::to_owned)
            .collect();
        if self.node_id.is_none() {
            missing_series.push("node_id".to_owned());
        }
        Ok(PodMetrics {
            node_id: self.node_id,
            cluster_id: self.cluster_id,
            active,
            available: self.available,
            can_accept_request: self.can_accept_request,
            is_terminating: self.is_terminating,
            is_disabled: self.is_disabled,
            cpu_load: self.cpu_load,
            missing_series,
        })
    }
}

/// Rewrites one line of the text format for `prometheus-parse` (see the module comment), or
/// drops it: blank lines, comments, other metrics, and samples whose label block is malformed.
fn rewrite_line(line: &str) -> Option<Cow<'_, str>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    if line.starts_with('#') {
        // HELP, TYPE, `# EOF` and other comments: the series we read are plain gauges, so
        // their TYPE changes nothing, and each line would cost the parser three regexes.
        return None;
    }
    let name_len = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let (name, rest) = line.split_at(name_len);
    if !name.starts_with("livekit_") {
        return None;
    }
    let rest = rest.trim_start();
    let Some(block) = rest.strip_prefix('{') else {
        return Some(Cow::Borrowed(line));
    };
    let (labels, after) = read_label_block(block)?;
    let mut out = String::with_capacity(line.len() + 16);
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            encode_label_value(value, &mut out);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(after.trim_start());
    Some(Cow::Owned(out))
}

/// Reads `name="value",...}` (the opening brace already taken) with the text format's escapes
/// (`\\`, `\"`, `\n`). Returns the labels and what follows the closing brace.
fn read_label_block(block: &str) -> Option<(Vec<(&str, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = block;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let key_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
        if key_len == 0 {
            return None;
        }
        let (key, after_key) = rest.split_at(key_len);
        let after_eq = after_key.trim_start().strip_prefix('=')?;
        let quoted = after_eq.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i + 1,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key, value));
        rest = quoted[end..].trim_start();
        if let Some(after_comma) = rest.strip_prefix(',') {
            rest = after_comma;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

/// Percent-encodes the characters that `prometheus-parse`'s label splitter cuts on.
fn encode_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '%' => out.push_str("%25"),
            ',' => out.push_str("%2C"),
            '=' => out.push_str("%3D"),
            '"' => out.push_str("%22"),
            '}' => out.push_str("%7D"),
            '\\' => out.push_str("%5C"),
            '\n' => out.push_str("%0A"),
            c => out.push(c),
        }
    }
}

/// Reverses [`encode_label_value`].
fn decode_label_value(value: &str) -> String {
    if !value.contains('%') {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3);
        let decoded = match code {
            Some("25") => Some('%'),
            Some("2C") => Some(','),
            Some("3D") => Some('='),
            Some("22") => Some('"'),
            Some("7D") => Some('}'),
            Some("5C") => Some('\\'),
            Some("0A") => Some('\n'),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[at + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GO_EXPORTER: &str = r#"# HELP go_gc_duration_seconds A summary of the pause duration of garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 2.1e-05
go_gc_duration_seconds{quantile="1"} 0.000123
go_gc_duration_seconds_sum 0.0042
go_gc_duration_seconds_count 31
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 87
# HELP livekit_egress_available
# TYPE livekit_egress_available gauge
livekit_egress_available{cluster_id="",node_id="EG_abc"} 0
# HELP livekit_egress_can_accept_request
# TYPE livekit_egress_can_accept_request gauge
livekit_egress_can_accept_request{cluster_id="",node_id="EG_abc"} 0
# HELP livekit_egress_is_disabled
# TYPE livekit_egress_is_disabled gauge
livekit_egress_is_disabled{cluster_id="",node_id="EG_abc"} 0
# HELP livekit_egress_is_terminating
# TYPE livekit_egress_is_terminating gauge
livekit_egress_is_terminating{cluster_id="",node_id="EG_abc"} 0
# HELP livekit_egress_requests
# TYPE livekit_egress_requests gauge
livekit_egress_requests{cluster_id="",node_id="EG_abc",type="room_composite"} 1
livekit_egress_requests{cluster_id="",node_id="EG_abc",type="track"} 2
livekit_egress_requests{cluster_id="",node_id="EG_abc",type="web"} 0
# HELP livekit_node_cpu_load
# TYPE livekit_node_cpu_load gauge
livekit_node_cpu_load{cluster_id="",node_id="EG_abc",node_type="EGRESS"} 0.73
# HELP promhttp_metric_handler_requests_total Total number of scrapes by HTTP status code.
# TYPE promhttp_metric_handler_requests_total counter
promhttp_metric_handler_requests_total{code="200"} 12
"#;

    #[test]
    fn reads_a_go_exporter_page() {
        let metrics = parse_pod_metrics(GO_EXPORTER.as_bytes()).unwrap();
        assert_eq!(metrics.node_id.as_deref(), Some("EG_abc"));
        assert_eq!(metrics.cluster_id.as_deref(), Some(""));
        assert_eq!(
            metrics.active,
            BTreeMap::from([("room_composite".to_owned(), 1), ("track".to_owned(), 2)])
        );
        assert_eq!(metrics.available, Some(false));
        assert_eq!(metrics.can_accept_request, Some(false));
        assert_eq!(metrics.is_terminating, Some(false));
        assert_eq!(metrics.is_disabled, Some(false));
        assert_eq!(metrics.cpu_load, Some(0.73));
        assert!(metrics.missing_series.is_empty());
    }

    #[test]
    fn label_order_escapes_timestamps_and_openmetrics_eof() {
        let text = concat!(
            "livekit_egress_available{node_id=\"EG_x\",cluster_id=\"\"} 1 1700000000000\n",
            "livekit_egress_requests{type=\"track\",cluster_id=\"a \\\"b\\\", c=d}\\\\\",node_id=\"EG_x\"} 3\n",
            "livekit_egress_requests{ node_id = \"EG_x\" , type = \"web\" , } 1\n",
            "livekit_egress_can_accept_request{node_id=\"EG_x\"} 1.0\n",
            "livekit_egress_is_terminating{node_id=\"EG_x\"} 0\n",
            "livekit_egress_is_disabled{} 0\n",
            "livekit_node_cpu_load 1.5e-1\n",
            "# EOF\n",
        );
        let metrics = parse_pod_metrics(text.as_bytes()).unwrap();
        assert_eq!(metrics.node_id.as_deref(), Some("EG_x"));
        assert_eq!(
            metrics.active,
            BTreeMap::from([("track".to_owned(), 3), ("web".to_owned(), 1)])
        );
        assert_eq!(metrics.available, Some(true));
        assert_eq!(metrics.is_disabled, Some(false));
        assert_eq!(metrics.cpu_load, Some(0.15));
        assert!(
            metrics.missing_series.is_empty(),
            "{:?}",
            metrics.missing_series
        );
    }

    #[test]
    fn escaped_node_id_is_decoded() {
        let text =
            "livekit_egress_available{cluster_id=\"x,y\",node_id=\"EG_\\\"q\\\"%25\\n}\"} 1\n";
        let metrics = parse_pod_metrics(text.as_bytes()).unwrap();
        assert_eq!(metrics.node_id.as_deref(), Some("EG_\"q\"%25\n}"));
        assert_eq!(metrics.cluster_id.as_deref(), Some("x,y"));
    }

    #[test]
    fn older_egress_without_some_series_says_what_is_missing() {
        let text = "livekit_egress_available{node_id=\"EG_old\"} 1\n";
        let metrics = parse_pod_metrics(text.as_bytes()).unwrap();
        assert_eq!(
            metrics.missing_series,
            vec![
                CAN_ACCEPT_REQUEST.to_owned(),
                IS_TERMINATING.to_owned(),
                IS_DISABLED.to_owned(),
                CPU_LOAD.to_owned()
            ]
        );
        assert_eq!(metrics.can_accept_request, None);
        assert!(metrics.active.is_empty());
    }

    #[test]
    fn busy_flag_without_request_counts_is_charged_as_unreported() {
        let text = "livekit_egress_available{node_id=\"EG_b\"} 0\n";
        let metrics = parse_pod_metrics(text.as_bytes()).unwrap();
        assert_eq!(
            metrics.active,
            BTreeMap::from([(UNREPORTED_TYPE.to_owned(), 1)])
        );
    }

    #[test]
    fn nan_values_and_malformed_lines_are_skipped() {
        let text = concat!(
            "livekit_egress_available{node_id=\"EG_n\"} 1\n",
            "livekit_node_cpu_load{node_id=\"EG_n\"} NaN\n",
            "livekit_egress_requests{node_id=\"EG_n\",type=\"track} 4\n",
            "livekit_egress_requests{node_id=\"EG_n\" type=\"web\"} 4\n",
            "livekit_egress_is_terminating{node_id=\"EG_n\"} not-a-number\n",
        );
        let metrics = parse_pod_metrics(text.as_bytes()).unwrap();
        assert!(metrics.active.is_empty());
        assert_eq!(metrics.cpu_load, None);
        assert_eq!(metrics.is_terminating, None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(
            parse_pod_metrics(b"<html><body>502 Bad Gateway</body></html>"),
            Err(ParseError::NoEgressSeries)
        );
        assert_eq!(
            parse_pod_metrics(b"\xff\xfe\x00garbage"),
            Err(ParseError::NotText)
        );
        assert_eq!(
            parse_pod_metrics(b"livekit_node_cpu_load 0.5\n"),
            Err(ParseError::NoEgressSeries)
        );
        assert_eq!(parse_pod_metrics(b""), Err(ParseError::NoEgressSeries));
    }

    #[test]
    fn label_values_round_trip_through_the_encoding() {
        let mut out = String::new();
        let original = "a%2C,b=c\"d}e\\f\ng%";
        encode_label_value(original, &mut out);
        assert!(!out.contains([',', '=', '"', '}', '\\', '\n']));
        assert_eq!(decode_label_value(&out), original);
        assert_eq!(decode_label_value("100%"), "100%");
    }
}
