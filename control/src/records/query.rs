//! The analytics answers of seed 003, computed from stored calls: a project's overview, its
//! recent calls, and statistics per UTC day.
//!
//! Invariant: pure functions of their arguments (the caller reads the database and the clock).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::{time, StoredCall, Summary};

/// Longest `transcriptPreview`, characters (an ellipsis marks a cut).
pub const PREVIEW_CHARS: usize = 100;

/// How a status counts in `callsByStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `completed`.
    Completed,
    /// Nobody took the call: `no-answer`, `busy`, `canceled`.
    Missed,
    /// `failed`.
    Failed,
    /// Not over yet: `queued`, `initiated`, `ringing`, `in-progress`.
    Active,
}

impl Outcome {
    /// The outcome of a Twilio call status.
    pub fn of(status: &str) -> Self {
        match status {
            "completed" => Self::Completed,
            "no-answer" | "busy" | "canceled" => Self::Missed,
            "failed" => Self::Failed,
            _ => Self::Active,
        }
    }
}

/// Counts and durations over a set of calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Every call.
    pub total: u64,
    /// Completed calls.
    pub completed: u64,
    /// Missed calls (no answer, busy, canceled).
    pub missed: u64,
    /// Failed calls.
    pub failed: u64,
    /// Calls not over yet.
    pub active: u64,
    /// Sum of the durations of the calls that have one, seconds.
    pub duration_secs: u64,
    /// How many calls have a duration.
    pub timed: u64,
    /// Calls by intent (`unknown` when none is known).
    pub by_intent: BTreeMap<String, u64>,
    /// Function calls the calls' agents made.
    pub function_calls: u64,
}

impl Totals {
    /// The totals of `calls`.
    pub fn of<'a>(calls: impl IntoIterator<Item = &'a Summary>) -> Self {
        let mut t = Self::default();
        for call in calls {
            t.total += 1;
            match Outcome::of(&call.status) {
                Outcome::Completed => t.completed += 1,
                Outcome::Missed => t.missed += 1,
                Outcome::Failed => t.failed += 1,
                Outcome::Active => t.active += 1,
            }
            if let Some(d) = call.duration_secs {
                t.duration_secs += d;
                t.timed += 1;
            }
            t.function_calls += call.function_calls;
            *t.by_intent.entry(call.intent.clone().unwrap_or_else(|| "unknown".to_owned())).or_default() += 1;
        }
        t
    }

    /// Mean duration of the calls that have one, whole seconds (0 when none has).
    pub fn average_secs(&self) -> u64 {
        (self.duration_secs + self.timed / 2).checked_div(self.timed).unwrap_or(0)
    }

    /// Failed calls as a percentage of all calls, two decimals (0 when there are none).
    pub fn error_rate(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            (self.failed as f64 * 10_000.0 / self.total as f64).round() / 100.0
        }
    }
}

/// `GET /analytics/project/:projectId`: the overview of the calls created in `from_ms..=to_ms`.
pub fn overview(project_id: &str, project_name: &str, from_ms: u64, to_ms: u64, calls: &[(u64, Summary)]) -> Value {
    let t = Totals::of(calls.iter().map(|(_, s)| s));
    let by_intent: Map<String, Value> = t.by_intent.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "projectId": project_id,
        "projectName": project_name,
        "dateRange": { "start": time::format(from_ms), "end": time::format(to_ms) },
        "totalCalls": t.total,
        "completedCalls": t.completed,
        "missedCalls": t.missed,
        "failedCalls": t.failed,
        "averageDuration": t.average_secs(),
        "totalDuration": t.duration_secs,
        // Counted by the owner core as Realtime agents call tools.
        "totalFunctionCalls": t.function_calls,
        "errorRate": t.error_rate(),
        "callsByStatus": {
            "completed": t.completed,
            "missed": t.missed,
            "failed": t.failed,
            "active": t.active,
        },
        "callsByIntent": by_intent,
    })
}

/// `GET /analytics/project/:projectId/statistics`: totals and calls per UTC day (days without
/// calls are left out), of the calls created in the range the caller read.
pub fn statistics(calls: &[(u64, Summary)]) -> Value {
    let t = Totals::of(calls.iter().map(|(_, s)| s));
    let mut by_day: BTreeMap<u64, u64> = BTreeMap::new();
    for (created_ms, _) in calls {
        *by_day.entry(created_ms / time::DAY_MS).or_default() += 1;
    }
    let days: Vec<Value> =
        by_day.iter().map(|(day, count)| json!({ "date": time::date(day * time::DAY_MS), "count": count })).collect();
    json!({
        "totalCalls": t.total,
        "completedCalls": t.completed,
        "averageCallDuration": t.average_secs(),
        // Minutes with two decimals: short calls still show.
        "totalMinutes": (t.duration_secs as f64 / 60.0 * 100.0).round() / 100.0,
        "callsByDay": days,
    })
}

/// One entry of `GET /analytics/project/:projectId/recent`.
pub fn recent_call(call: &StoredCall) -> Value {
    json!({
        "id": call.id,
        "callSid": call.id,
        "status": call.status,
        "durationSec": call.duration_secs,
        "intent": call.intent.as_deref().unwrap_or("unknown"),
        "fromNumber": call.from,
        "createdAt": time::format(call.created_ms),
        "transcriptPreview": preview(&call.transcript),
        "node": call.node,
    })
}

/// The start of a transcript on one line: utterances joined by spaces, at most
/// [`PREVIEW_CHARS`] characters.
pub fn preview(transcript: &str) -> String {
    let joined = transcript.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
    if joined.chars().count() <= PREVIEW_CHARS {
        return joined;
    }
    let mut cut: String = joined.chars().take(PREVIEW_CHARS - 3).collect();
    cut.push_str("...");
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(status: &str, duration: Option<u64>, intent: Option<&str>) -> Summary {
        Summary { status: status.into(), duration_secs: duration, intent: intent.map(Into::into), function_calls: 0 }
    }

    /// Every status lands in one bucket; averages, totals and the error rate follow seed 003;
    /// `totalFunctionCalls` sums the calls' counts.
    #[test]
    fn overview_counts() {
        let day = time::DAY_MS;
        let calls = vec![
            (day, Summary { function_calls: 3, ..s("completed", Some(100), Some("emergency")) }),
            (day + 1, s("completed", Some(201), None)),
            (2 * day, s("no-answer", None, Some("routine"))),
            (2 * day, s("busy", None, None)),
            (2 * day, s("canceled", None, None)),
            (3 * day, Summary { function_calls: 1, ..s("failed", Some(0), None) }),
            (3 * day, s("in-progress", None, Some("emergency"))),
            (3 * day, s("queued", None, None)),
        ];
        let v = overview("p", "Plumbing", 0, 4 * day - 1, &calls);
        assert_eq!(
            v,
            json!({
                "projectId": "p", "projectName": "Plumbing",
                "dateRange": { "start": "1970-01-01T00:00:00Z", "end": "1970-01-04T23:59:59.999Z" },
                "totalCalls": 8, "completedCalls": 2, "missedCalls": 3, "failedCalls": 1,
                "averageDuration": 100, "totalDuration": 301, "totalFunctionCalls": 4, "errorRate": 12.5,
                "callsByStatus": { "completed": 2, "missed": 3, "failed": 1, "active": 2 },
                "callsByIntent": { "emergency": 2, "routine": 1, "unknown": 5 },
            })
        );
        let empty = overview("p", "p", 0, 1, &[]);
        assert_eq!((empty["averageDuration"].clone(), empty["errorRate"].clone()), (json!(0), json!(0.0)));
    }

    /// Statistics bucket calls by their UTC creation day, ascending, skipping empty days.
    #[test]
    fn statistics_by_day() {
        let day = time::DAY_MS;
        let calls = vec![
            (20_000 * day + 5, s("completed", Some(90), None)),
            (20_000 * day + day - 1, s("completed", Some(30), None)),
            (20_002 * day, s("failed", None, None)),
        ];
        assert_eq!(
            statistics(&calls),
            json!({
                "totalCalls": 3, "completedCalls": 2, "averageCallDuration": 60, "totalMinutes": 2.0,
                "callsByDay": [{ "date": "2024-10-04", "count": 2 }, { "date": "2024-10-06", "count": 1 }],
            })
        );
    }

    /// Previews join utterances on one line and cut long ones with an ellipsis.
    #[test]
    fn previews() {
        assert_eq!(preview("user: my pipe burst\nagent: on our way\n"), "user: my pipe burst agent: on our way");
        assert_eq!(preview(""), "");
        let long = format!("user: {}", "é".repeat(200));
        let p = preview(&long);
        assert_eq!(p.chars().count(), PREVIEW_CHARS);
        assert!(p.ends_with("..."));
    }
}
