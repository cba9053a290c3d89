//! ISO 8601 dates and times as the analytics endpoints take and give them, in ms since the epoch.
//!
//! Invariant: pure arithmetic on the proleptic Gregorian calendar in UTC; no clock, no time zone
//! database (offsets such as `+02:00` are applied, names are not understood).

/// Milliseconds in a day.
pub const DAY_MS: u64 = 86_400_000;

/// Which end of a range a date-only value (`2025-01-15`) stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The first millisecond of that day.
    Start,
    /// The last millisecond of that day, so that `endDate=2025-01-16` includes the 16th.
    End,
}

/// The last millisecond of 9999-12-31 UTC: the latest time RFC 3339 (and [`format()`]) can write.
pub const MAX_MS: u64 = 253_402_300_799_999;

/// Parses an ISO 8601 date (`2025-01-15`) or date-time (`2025-01-15T10:30:00Z`,
/// `2025-01-15T10:30:00.123+02:00`, `2025-01-15 10:30`; no zone means UTC) into ms since the
/// epoch. `None` for anything else, or for a time before 1970 or after [`MAX_MS`] (an offset can
/// push 9999-12-31 past it).
pub fn parse(s: &str, bound: Bound) -> Option<u64> {
    parse_any(s, bound).filter(|ms| *ms <= MAX_MS)
}

fn parse_any(s: &str, bound: Bound) -> Option<u64> {
    let s = s.trim();
    // Checked: byte 10 of arbitrary input may fall inside a multi-byte character.
    let (date, rest) = if s.len() > 10 { s.split_at_checked(10)? } else { (s, "") };
    let days = parse_date(date)?;
    let day_ms = u64::try_from(days).ok()?.checked_mul(DAY_MS)?;
    if rest.is_empty() {
        return Some(match bound {
            Bound::Start => day_ms,
            Bound::End => day_ms + DAY_MS - 1,
        });
    }
    let rest = rest.strip_prefix(['T', 't', ' '])?;
    let (time, offset_ms) = split_zone(rest)?;
    let time_ms = i64::try_from(parse_time(time)?).ok()?;
    let total = i64::try_from(day_ms).ok()? + time_ms - offset_ms;
    u64::try_from(total).ok()
}

/// `ms` as RFC 3339 in UTC, with milliseconds only when there are any (`2025-01-15T10:30:00Z`);
/// times past [`MAX_MS`] are written as it.
pub fn format(ms: u64) -> String {
    let ms = ms.min(MAX_MS);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(at).to_string()
    } else {
        humantime::format_rfc3339_millis(at).to_string()
    }
}

/// The UTC calendar day of `ms` (`2025-01-15`).
pub fn date(ms: u64) -> String {
    let days = i64::try_from(ms / DAY_MS).unwrap_or(i64::MAX);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD` → days since 1970-01-01 (negative before it).
fn parse_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i64 = digits(&s[0..4])?.into();
    let m = digits(&s[5..7])?;
    let d = digits(&s[8..10])?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// `hh:mm[:ss[.fff…]]` → ms into the day.
fn parse_time(s: &str) -> Option<u64> {
    let (hms, fraction) = match s.split_once(['.', ',']) {
        Some((hms, f)) => (hms, Some(f)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let h = parts.next().filter(|p| p.len() == 2).and_then(digits)?;
    let m = parts.next().filter(|p| p.len() == 2).and_then(digits)?;
    let sec = match parts.next() {
        Some(p) if p.len() == 2 => digits(p)?,
        Some(_) => return None,
        None => 0,
    };
    if parts.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let ms = match fraction {
        None => 0,
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            // Milliseconds: the first three digits, padded.
            let padded = format!("{f:0<3}");
            padded[..3].parse::<u64>().ok()?
        }
        Some(_) => return None,
    };
    Some(((u64::from(h) * 60 + u64::from(m)) * 60 + u64::from(sec.min(59))) * 1000 + ms)
}

/// Splits a time from its zone designator: `Z`, `±hh:mm`, `±hhmm`, `±hh` or none (UTC). The
/// offset is returned in ms east of UTC.
fn split_zone(s: &str) -> Option<(&str, i64)> {
    if let Some(time) = s.strip_suffix(['Z', 'z']) {
        return Some((time, 0));
    }
    let Some(at) = s.rfind(['+', '-']) else { return Some((s, 0)) };
    let (time, zone) = s.split_at(at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let zone = &zone[1..];
    // ASCII only, so that the byte slices below fall on character boundaries.
    if !zone.is_ascii() {
        return None;
    }
    let (h, m) = match zone.len() {
        2 => (digits(zone)?, 0),
        4 => (digits(&zone[..2])?, digits(&zone[2..])?),
        5 if zone.as_bytes()[2] == b':' => (digits(&zone[..2])?, digits(&zone[3..])?),
        _ => return None,
    };
    if h > 23 || m > 59 {
        return None;
    }
    Some((time, sign * (i64::from(h) * 60 + i64::from(m)) * 60_000))
}

/// A run of ASCII digits as a number.
fn digits(s: &str) -> Option<u32> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's algorithm, eras of 400 years).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dates, date-times with and without zones and fractions parse to the right instant;
    /// everything malformed is refused.
    /// The latest writable time parses and formats; an offset that pushes 9999-12-31 past it is
    /// refused (formatting it panicked), and formatting clamps rather than panics.
    #[test]
    fn year_9999_is_the_limit() {
        assert_eq!(parse("9999-12-31", Bound::End), Some(MAX_MS));
        assert_eq!(format(MAX_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(parse("9999-12-31T23:59:59-00:01", Bound::Start), None);
        assert_eq!(parse("9999-12-31T23:59:59+00:01", Bound::Start), Some(MAX_MS - 60_999));
        assert_eq!(format(u64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn parses_iso_8601() {
        let jan15 = 1_736_899_200_000; // 2025-01-15T00:00:00Z
        assert_eq!(parse("2025-01-15", Bound::Start), Some(jan15));
        assert_eq!(parse("2025-01-15", Bound::End), Some(jan15 + DAY_MS - 1));
        assert_eq!(parse("2025-01-15T10:30:00Z", Bound::Start), Some(jan15 + 37_800_000));
        assert_eq!(parse("2025-01-15T10:30:00.250Z", Bound::End), Some(jan15 + 37_800_250));
        assert_eq!(parse("2025-01-15T10:30:00.2Z", Bound::Start), Some(jan15 + 37_800_200));
        assert_eq!(parse("2025-01-15T10:30Z", Bound::Start), Some(jan15 + 37_800_000));
        assert_eq!(parse("2025-01-15 10:30:00", Bound::Start), Some(jan15 + 37_800_000));
        assert_eq!(parse("2025-01-15T12:30:00+02:00", Bound::Start), Some(jan15 + 37_800_000));
        assert_eq!(parse("2025-01-15T05:30:00-0500", Bound::Start), Some(jan15 + 37_800_000));
        assert_eq!(parse("1970-01-01T00:00:00Z", Bound::Start), Some(0));
        assert_eq!(parse("2024-02-29", Bound::Start), Some(1_709_164_800_000));
        for bad in [
            "",
            "yesterday",
            "2025-1-15",
            "2025-13-01",
            "2025-02-29",
            "2025-01-32",
            "2025-01-15T25:00:00Z",
            "2025-01-15T10:61Z",
            "2025-01-15T10",
            "2025-01-15X10:30:00Z",
            "2025-01-15T10:30:00+2:00",
            "2025-01-15T10:30:00.Z",
            "1969-12-31T00:00:00Z",
            "12345",
        ] {
            assert_eq!(parse(bad, Bound::Start), None, "{bad}");
        }
    }

    /// Formatting and calendar days round-trip with parsing, across leap days and eras.
    #[test]
    fn formats_and_days() {
        assert_eq!(format(1_736_937_000_000), "2025-01-15T10:30:00Z");
        assert_eq!(format(1_736_937_000_123), "2025-01-15T10:30:00.123Z");
        assert_eq!(date(1_736_937_000_000), "2025-01-15");
        assert_eq!(date(0), "1970-01-01");
        for day in [0, 59, 60, 365, 10_957, 11_016, 19_782, 30_000, 2_932_896] {
            let ms = day * DAY_MS;
            assert_eq!(parse(&date(ms), Bound::Start), Some(ms), "day {day}");
        }
    }
}
