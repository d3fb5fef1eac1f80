//! Knative's `stdout` protocol: each finished span as one JSON line on stdout, where the
//! log lines also go. A span line is an object with a single top-level key, `"span"`,
//! which no log line has (log lines always carry `level` and `message`), so a reader
//! tells them apart by that key:
//!
//! ```json
//! {"span":{"name":"queue","kind":"server","traceId":"4bf9…","spanId":"de67…",
//!  "parentSpanId":"3fc0…","startTime":"2026-12-06T13:20:19.189418293Z",
//!  "endTime":"2026-12-06T13:20:19.190357565Z","attributes":{"url.path":"/",…},
//!  "status":{"code":"unset"},"resource":{"service.name":"hello",…}}}
//! ```
//!
//! `parentSpanId` is absent for a root span, `events` present only when the span has
//! some. Times are RFC 3339 in UTC with nanoseconds.

use std::io::Write;
use std::time::SystemTime;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use serde_json::{Map, Value as Json};

/// Writes spans to stdout, one line each. The batch processor calls it from its own
/// thread, so the request path never writes a span line.
#[derive(Debug, Default)]
pub(super) struct StdoutExporter {
    /// The process's resource attributes, the same in every line.
    resource: Map<String, Json>,
}

impl SpanExporter for StdoutExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut text = String::new();
        for span in &batch {
            text.push_str(&line(span, &self.resource));
            text.push('\n');
        }
        // One write under stdout's lock: a log line (written the same way) can come
        // before or after the batch, never inside one of its lines.
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| {
                OTelSdkError::InternalFailure(format!("cannot write spans to stdout: {e}"))
            })
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource
            .iter()
            .map(|(k, v)| (k.to_string(), value(v)))
            .collect();
    }
}

/// A span line's object, its fields in reading order (a map would sort them).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    span: LineSpan<'a>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LineSpan<'a> {
    name: &'a str,
    kind: &'static str,
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    start_time: String,
    end_time: String,
    attributes: Json,
    status: Json,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    events: Vec<Json>,
    resource: &'a Map<String, Json>,
}

/// One span's line, without the newline.
fn line(span: &SpanData, resource: &Map<String, Json>) -> String {
    let events = span
        .events
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name.as_ref(),
                "time": rfc3339(e.timestamp),
                "attributes": attributes(&e.attributes),
            })
        })
        .collect();
    let line = Line {
        span: LineSpan {
            name: span.name.as_ref(),
            kind: kind(&span.span_kind),
            trace_id: span.span_context.trace_id().to_string(),
            span_id: span.span_context.span_id().to_string(),
            parent_span_id: (span.parent_span_id != opentelemetry::trace::SpanId::INVALID)
                .then(|| span.parent_span_id.to_string()),
            start_time: rfc3339(span.start_time),
            end_time: rfc3339(span.end_time),
            attributes: attributes(&span.attributes),
            status: status(&span.status),
            events,
            resource,
        },
    };
    // Strings and JSON values always serialize; were one not to, an empty object keeps
    // stdout one JSON value per line.
    serde_json::to_string(&line).unwrap_or_else(|_| "{}".to_owned())
}

fn kind(kind: &SpanKind) -> &'static str {
    match kind {
        SpanKind::Client => "client",
        SpanKind::Server => "server",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
        SpanKind::Internal => "internal",
    }
}

fn status(status: &Status) -> Json {
    match status {
        Status::Unset => serde_json::json!({"code": "unset"}),
        Status::Ok => serde_json::json!({"code": "ok"}),
        Status::Error { description } if description.is_empty() => {
            serde_json::json!({"code": "error"})
        }
        Status::Error { description } => {
            serde_json::json!({"code": "error", "description": description.as_ref()})
        }
    }
}

fn attributes(list: &[KeyValue]) -> Json {
    Json::Object(
        list.iter()
            .map(|kv| (kv.key.to_string(), value(&kv.value)))
            .collect(),
    )
}

/// An attribute as JSON: numbers stay numbers, so `http.response.status_code` is `200`.
fn value(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::I64(i) => Json::from(*i),
        Value::F64(f) => Json::from(*f),
        Value::String(s) => Json::String(s.to_string()),
        Value::Array(Array::Bool(a)) => a.iter().copied().map(Json::Bool).collect(),
        Value::Array(Array::I64(a)) => a.iter().copied().map(Json::from).collect(),
        Value::Array(Array::F64(a)) => a.iter().copied().map(Json::from).collect(),
        Value::Array(Array::String(a)) => a.iter().map(|s| Json::String(s.to_string())).collect(),
        // Kinds newer than this code: their text is better than nothing.
        other => Json::String(other.to_string()),
    }
}

/// `2026-12-04T10:00:00.000123456Z`. A time before 1970 (a broken clock) reads as 1970.
fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_utc_with_nanoseconds() {
        let at =
            |secs: u64, nanos: u32| rfc3339(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (a leap day in a century leap year), 2100-03-01 (2100 is not one).
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000000Z");
        assert_eq!(
            at(1_796_386_930, 123_456_789),
            "2026-12-04T12:22:10.123456789Z"
        );
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000000000Z"
        );
    }

    fn span(parent: SpanId) -> SpanData {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_386_930);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "queue".into(),
            start_time: start,
            end_time: start + Duration::from_millis(3),
            attributes: vec![
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("http.response.status_code", 200i64),
                KeyValue::new("thaw.cold_start", true),
            ],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::error("upstream failed"),
            instrumentation_scope: Default::default(),
        }
    }

    #[test]
    fn a_span_line_has_one_top_level_span_object() {
        let mut exporter = StdoutExporter::default();
        exporter.set_resource(
            &Resource::builder_empty()
                .with_attributes([KeyValue::new("service.name", "hello")])
                .build(),
        );
        let text = line(
            &span(SpanId::from_hex("1111111111111111").unwrap()),
            &exporter.resource,
        );
        assert!(!text.contains('\n'));
        assert!(
            text.starts_with(r#"{"span":{"name":"queue","kind":"server","traceId":"#),
            "{text}"
        );
        let v: Json = serde_json::from_str(&text).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        assert_eq!(
            v["span"],
            serde_json::json!({
                "name": "queue",
                "kind": "server",
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "spanId": "00f067aa0ba902b7",
                "parentSpanId": "1111111111111111",
                "startTime": "2026-12-04T12:22:10.000000000Z",
                "endTime": "2026-12-04T12:22:10.003000000Z",
                "attributes": {
                    "http.request.method": "GET",
                    "http.response.status_code": 200,
                    "thaw.cold_start": true,
                },
                "status": {"code": "error", "description": "upstream failed"},
                "resource": {"service.name": "hello"},
            })
        );
        // A root span has no parent to name.
        let root: Json = serde_json::from_str(&line(&span(SpanId::INVALID), &Map::new())).unwrap();
        assert!(root["span"].get("parentSpanId").is_none(), "{root}");
    }
}
