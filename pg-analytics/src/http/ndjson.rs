//! `POST /v1/events` bodies: one JSON event per line.

use crate::model::{Event, RejectReason};
use crate::postgres::Rejected;

/// A body split into the events that parsed and the lines that did not.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ParsedBatch {
    /// The events, in body order.
    pub(super) events: Vec<Event>,
    /// For each event, its line (from 0): rejections are reported by line.
    pub(super) lines: Vec<usize>,
    /// Lines that are not an event, by line.
    pub(super) malformed: Vec<Rejected>,
}

impl ParsedBatch {
    /// The rows a body holds: its non-blank lines.
    pub(super) fn rows(&self) -> usize {
        self.events.len() + self.malformed.len()
    }
}

/// Splits `body` into lines (`\n`, optionally `\r\n`); blank lines are
/// skipped, every other line must be one JSON object with the fields of
/// [`Event`] (other fields are ignored).
pub(super) fn parse(body: &[u8]) -> ParsedBatch {
    let mut batch = ParsedBatch::default();
    for (line_no, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Event>(line) {
            Ok(event) => {
                batch.events.push(event);
                batch.lines.push(line_no);
            }
            Err(e) => batch.malformed.push(Rejected::new(
                line_no,
                &RejectReason::Malformed(format!("not an event: {e}")),
            )),
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_bad_and_blank_lines() {
        let body = b"{\"tenant_id\":1,\"created_at\":\"2026-01-02T03:04:05Z\",\"event_type\":\"login\",\"processing_time_ms\":1.5}\r\n\
            \n\
            {\"tenant_id\":\"x\"}\n\
            not json\n\
            {\"tenant_id\":2,\"created_at\":\"2026-01-02T03:04:05Z\",\"event_type\":\"login\",\"processing_time_ms\":2}";
        let batch = parse(body);
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.lines, vec![0, 4]);
        assert_eq!(
            batch
                .malformed
                .iter()
                .map(|r| (r.index, r.code))
                .collect::<Vec<_>>(),
            vec![(2, "malformed_row"), (3, "malformed_row")]
        );
        assert_eq!(batch.rows(), 4);
    }

    proptest! {
        /// Whatever the bytes, every non-blank line is either an event or a
        /// rejection, exactly once.
        #[test]
        fn every_line_is_accounted_for(body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let batch = parse(&body);
            let non_blank = body
                .split(|b| *b == b'\n')
                .filter(|l| !l.strip_suffix(b"\r").unwrap_or(l).iter().all(u8::is_ascii_whitespace))
                .count();
            prop_assert_eq!(batch.rows(), non_blank);
            prop_assert_eq!(batch.events.len(), batch.lines.len());
        }
    }
}
