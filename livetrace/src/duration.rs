//! Parsing of the duration arguments (`-d`, `-i`, `--min-block`, `--slow`): plain seconds (`30`,
//! `1.5`) or a number with a unit (`250us`, `10ms`, `1.5s`, `2m`).

use std::time::Duration;

/// Parses `30`, `1.5`, `250ns`, `250us`, `10ms`, `1.5s`, `2m`. Rejects negatives, NaN, zero-free
/// garbage and values too large to represent, with a message that names the input.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    // Values that start with '-' reach here (so that -d -1 is not taken for an option).
    if let Some(rest) = trimmed.strip_prefix('-') {
        return Err(
            if rest.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
                format!("'{text}' is negative: give a duration of zero or more (30, 1.5s, 250ms)")
            } else {
                format!("'{text}' is not a duration: give one before it (30, 1.5s, 250ms)")
            },
        );
    }
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "'{text}' has an unknown unit '{other}': use ns, us, ms, s, m or h (e.g. 250ms)"
            ));
        }
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("'{text}' is not a duration: give seconds (30, 1.5) or a value with a unit (250ms)")
    })?;
    Duration::try_from_secs_f64(value * scale)
        .map_err(|_| format!("'{text}' is out of range for a duration"))
}

/// Parses a duration that must be longer than zero (`-d 0` would capture nothing).
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!(
            "'{text}' is zero: give a duration longer than zero"
        ));
    }
    Ok(duration)
}

/// A duration as a person would write it: "10m", "1h30m", "2.5s".
pub fn describe(duration: Duration) -> String {
    // Rounded to what a person reads: milliseconds under a second, then tenths of a second.
    if duration < Duration::from_secs(1) {
        return format!("{}ms", duration.as_millis());
    }
    let tenths = (duration.as_millis() + 50) / 100;
    if !tenths.is_multiple_of(10) {
        return format!("{:.1}s", tenths as f64 / 10.0);
    }
    let secs = (tenths / 10) as u64;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut text = String::new();
    for (value, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if value > 0 {
            text.push_str(&format!("{value}{unit}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain numbers are seconds, and every documented unit scales correctly.
    #[test]
    fn parses_seconds_and_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("100ns"), Ok(Duration::from_nanos(100)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 3 s "), Ok(Duration::from_secs(3)));
    }

    /// Garbage, negatives, unknown units and overflow are errors that quote the input.
    #[test]
    fn rejects_bad_input_naming_it() {
        for bad in ["banana", "", "-1", "1.2.3", "5 parsecs", "1e400", ".", "s"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
        assert!(parse_positive_duration("0").is_err());
        assert!(parse_positive_duration("0ms").is_err());
    }

    #[test]
    fn durations_described_as_written() {
        assert_eq!(describe(Duration::from_secs(600)), "10m");
        assert_eq!(describe(Duration::from_secs(5400)), "1h30m");
        assert_eq!(describe(Duration::from_millis(2500)), "2.5s");
        assert_eq!(describe(Duration::from_nanos(4_501_874_426)), "4.5s");
        assert_eq!(describe(Duration::from_millis(250)), "250ms");
    }
}
