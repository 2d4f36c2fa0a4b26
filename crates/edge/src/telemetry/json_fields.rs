//! The JSON log layer's span fields, written straight into the span's
//! string when the span opens.
//!
//! The fmt layer formats a span's fields when the span is created, whether
//! or not anything is logged inside it: every call's span pays for it.
//! tracing-subscriber's `JsonFields` collects them into a map of
//! `serde_json::Value`s first (an allocation per field) and then serializes
//! the map; in the broker's profile that was the log layer's largest cost
//! per call. [`JsonSpanFields`] writes the same JSON object (same keys, same
//! value types, same escaping) in one pass; lines logged inside the span
//! read it exactly as before.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, FormattedFields, format::Writer},
};

/// See the module docs: use with the JSON event format
/// (`fmt::layer().json().fmt_fields(JsonSpanFields)`).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        write_object(&mut writer, fields)
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.is_empty() {
            return write_object(&mut current.as_writer(), fields);
        }
        // A field recorded after the span opened (the broker's spans set
        // theirs up front): merge into the object already written, a later
        // value replacing an earlier one, as `JsonFields` does.
        let mut added = String::new();
        write_object(&mut Writer::new(&mut added), fields)?;
        let mut merged: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&current.fields).map_err(|_| fmt::Error)?;
        let added: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&added).map_err(|_| fmt::Error)?;
        merged.extend(added);
        current.fields = serde_json::to_string(&merged).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

/// `fields` as one JSON object.
fn write_object<R: RecordFields>(out: &mut Writer<'_>, fields: R) -> fmt::Result {
    let mut object = Object::open(out);
    fields.record(&mut object);
    object.close()
}

/// One JSON object being written: `{` on open, `"key":value` per field,
/// `}` on close (the first write error is kept and returned then).
struct Object<'a, 'w> {
    out: &'a mut Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl<'a, 'w> Object<'a, 'w> {
    fn open(out: &'a mut Writer<'w>) -> Self {
        let result = out.write_char('{');
        Self {
            out,
            empty: true,
            result,
        }
    }

    fn close(self) -> fmt::Result {
        self.result?;
        self.out.write_char('}')
    }

    /// Writes `"name":` then the value `write` writes.
    fn field(&mut self, name: &str, write: impl FnOnce(&mut Writer<'w>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        self.result = (|| {
            if !std::mem::take(&mut self.empty) {
                self.out.write_char(',')?;
            }
            json_string(self.out, name)?;
            self.out.write_char(':')?;
            write(self.out)
        })();
    }
}

impl Visit for Object<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's number format, `null` when not finite.
        self.field(field.name(), |w| {
            w.write_str(&serde_json::Value::from(value).to_string())
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field.name(), |w| {
            w.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field.name(), |w| {
            w.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field.name(), |w| {
            w.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field.name(), |w| json_string(w, value));
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        // An array of numbers, as serde_json writes a byte slice.
        self.field(field.name(), |w| {
            w.write_char('[')?;
            let mut digits = itoa::Buffer::new();
            for (i, b) in value.iter().enumerate() {
                if i > 0 {
                    w.write_char(',')?;
                }
                w.write_str(digits.format(*b))?;
            }
            w.write_char(']')
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        // Log metadata the JSON event format already writes (JsonFields
        // skips these too), and raw identifiers without their `r#`.
        if name.starts_with("log.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.field(name, |w| json_string(w, &format!("{value:?}")));
    }
}

/// `s` as a JSON string, escaped as serde_json escapes it (`"`, `\` and
/// control characters; everything else verbatim).
fn json_string(w: &mut impl fmt::Write, s: &str) -> fmt::Result {
    w.write_char('"')?;
    let needs = |b: &u8| *b < 0x20 || *b == b'"' || *b == b'\\';
    // Most values (paths, ids) need no escape: one check, one write.
    let Some(first) = s.as_bytes().iter().position(needs) else {
        w.write_str(s)?;
        return w.write_char('"');
    };
    let mut start = 0;
    for (i, b) in s.bytes().enumerate().skip(first) {
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x08 => Some("\\b"),
            0x0c => Some("\\f"),
            0x00..=0x1f => None,
            _ => continue,
        };
        w.write_str(&s[start..i])?;
        match escape {
            Some(e) => w.write_str(e)?,
            None => write!(w, "\\u{b:04x}")?,
        }
        start = i + 1;
    }
    w.write_str(&s[start..])?;
    w.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt as _};

    /// Lines a subscriber writes, kept.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Self;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[derive(Debug)]
    #[allow(dead_code)] // read through Debug
    struct Shape {
        name: &'static str,
    }

    /// One line logged inside a span with every kind of field, some
    /// recorded after it opened, as JSON.
    fn logged<N>(fields: N) -> serde_json::Value
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .fmt_fields(fields)
            .with_writer(lines.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let tricky = "quote \" backslash \\ newline \n tab \t bell \u{7} nul \u{0} é ✓";
            let outer = tracing::info_span!("outer", request_id = "r-1", n = 7u64);
            let _o = outer.enter();
            let span = tracing::info_span!(
                "grpc",
                otel.name = "/credbroker.v1.CredentialBroker/GetCredentials",
                text = tricky,
                neg = -42i64,
                big = u64::MAX,
                yes = true,
                ratio = 0.25f64,
                nan = f64::NAN,
                shape = ?Shape { name: "a \"b\"" },
                r#type = "raw",
                wide = 1u128 << 100,
                later = tracing::field::Empty,
                trace_id = None::<&str>,
            );
            span.record("later", "set after");
            span.record("neg", 5i64);
            let _s = span.enter();
            tracing::info!(answer = 42, "inside");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        serde_json::from_str(text.trim_end()).unwrap()
    }

    #[test]
    fn span_fields_are_the_json_object_tracing_subscriber_writes() {
        let ours = logged(JsonSpanFields);
        let theirs = logged(tracing_subscriber::fmt::format::JsonFields::new());
        assert_eq!(ours["span"], theirs["span"]);
        assert_eq!(ours["spans"], theirs["spans"]);
        // And the values are what was recorded (not merely equal mistakes).
        let span = &ours["span"];
        assert_eq!(
            span["text"],
            "quote \" backslash \\ newline \n tab \t bell \u{7} nul \u{0} é ✓"
        );
        assert_eq!(span["neg"], 5);
        assert_eq!(span["big"], u64::MAX);
        assert_eq!(span["yes"], true);
        assert_eq!(span["ratio"], 0.25);
        assert!(span["nan"].is_null());
        assert_eq!(span["shape"], "Shape { name: \"a \\\"b\\\"\" }");
        assert_eq!(span["type"], "raw");
        assert_eq!(span["later"], "set after");
        assert!(span.get("trace_id").is_none());
        assert_eq!(ours["spans"][0]["request_id"], "r-1");
        assert_eq!(ours["fields"]["answer"], 42);
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for s in ["", "plain", "\u{1f}\u{7f}\"\\/", "a\u{8}b\u{c}c", "日本語"] {
            let mut out = String::new();
            json_string(&mut out, s).unwrap();
            assert_eq!(out, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }
}
