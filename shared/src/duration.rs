//! Durations as people write them in config: `30s`, `500ms`, `2m`, `1h`, or a bare number
//! of seconds.

use std::time::Duration;

use crate::limits::{MAX_DURATION, MAX_SECONDS};

/// The text is not a duration Thaw accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadDuration {
    #[error("expected a duration like 30s, 500ms or 2m, got {0:?}")]
    Syntax(String),
    #[error("{0:?} is longer than the most accepted, {max}h", max = MAX_SECONDS / 3600)]
    TooLong(String),
}

/// Parses `<number><unit>` with unit `ms`, `s`, `m` or `h`; a bare number means seconds.
/// Fractions are allowed (`1.5s`); negative values are not.
pub fn parse_duration(text: &str) -> Result<Duration, BadDuration> {
    let t = text.trim();
    let bad = || BadDuration::Syntax(text.to_owned());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    if secs.is_finite() && secs > MAX_DURATION.as_secs_f64() {
        return Err(BadDuration::TooLong(text.to_owned()));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_would_overflow_a_deadline() {
        assert_eq!(parse_duration("8760h"), Ok(MAX_DURATION));
        for long in ["8761h", "18446744073709551615", "99999999999999999999999m"] {
            assert_eq!(
                parse_duration(long),
                Err(BadDuration::TooLong(long.to_owned())),
                "{long}"
            );
        }
        assert!(parse_duration("8761h")
            .unwrap_err()
            .to_string()
            .contains("8760h"));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "-1s", "10x", "1..2s", "ten seconds", "5 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            parse_duration("10x").unwrap_err().to_string(),
            "expected a duration like 30s, 500ms or 2m, got \"10x\""
        );
    }
}
